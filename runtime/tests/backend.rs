//! The Redis result backend against a real Redis.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::{redis_url, within};
use runtime::backend::{result_key, RedisBackend};
use runtime::protocol::result::{state, ResultMeta};
use serde_json::{json, Value};

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test]
async fn stores_with_expiry_and_never_overwrites_success() {
    let backend = RedisBackend::connect(&redis_url(), 600, None)
        .await
        .unwrap();
    let id = new_id();
    assert_eq!(backend.get(&id).await.unwrap(), None);
    let progress = ResultMeta::new(
        &id,
        state::PROGRESS,
        json!({"current": 1, "total": 2}),
        Utc::now(),
    );
    assert!(backend.store(&progress).await.unwrap());
    assert_eq!(backend.get(&id).await.unwrap(), Some(progress.clone()));
    let success = ResultMeta::new(&id, state::SUCCESS, json!(3), Utc::now());
    assert!(backend.store(&success).await.unwrap());
    assert!(
        !backend.store(&progress).await.unwrap(),
        "a late PROGRESS must not replace SUCCESS"
    );
    assert_eq!(backend.get(&id).await.unwrap(), Some(success));

    let client = redis::Client::open(redis_url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg(result_key(&id))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!((1..=600).contains(&ttl), "ttl {ttl}");
}

#[tokio::test]
async fn wait_wakes_on_the_published_final_state() {
    let backend = RedisBackend::connect(&redis_url(), 600, None)
        .await
        .unwrap();
    let id = new_id();
    let writer = backend.clone();
    let writer_id = id.clone();
    let waiting = tokio::spawn(async move { backend.wait(&id, Duration::from_secs(10)).await });
    // The waiter subscribes before reading; whichever comes first, it must see SUCCESS.
    let started = ResultMeta::new(&writer_id, state::STARTED, json!({}), Utc::now());
    writer.store(&started).await.unwrap();
    let done = ResultMeta::new(&writer_id, state::SUCCESS, json!("ok"), Utc::now());
    writer.store(&done).await.unwrap();
    let meta = within(15, "the result", waiting).await.unwrap().unwrap();
    assert_eq!(meta.status, state::SUCCESS);
    assert_eq!(meta.result, json!("ok"));
}

#[tokio::test]
async fn a_failed_chord_keeps_its_members_outcomes_and_completes_no_more() {
    use runtime::chord::{self, Join, Member};
    let backend = RedisBackend::connect(&redis_url(), 600, None)
        .await
        .unwrap();
    let chord_id = new_id();
    let member = |state: &str, result| Member {
        task_id: new_id(),
        state: state.into(),
        result,
    };
    let (ok, failed) = (
        member(state::SUCCESS, json!(3)),
        member(state::FAILURE, json!({"exc_type": "ValueError"})),
    );
    chord::open(Some(&backend), &chord_id, 2, None)
        .await
        .unwrap();
    let waiting = chord::count(&backend, &chord_id, Some(0), &ok)
        .await
        .unwrap();
    assert_eq!(waiting, Join::Waiting);
    let Join::Complete { claim, .. } = chord::count(&backend, &chord_id, Some(1), &failed)
        .await
        .unwrap()
    else {
        panic!("the second member completes the chord");
    };
    chord::finish_failed(&backend, &chord_id, &claim)
        .await
        .unwrap();

    // Where Celery's Redis backend keeps them, for whoever looks into the failure.
    let client = redis::Client::open(redis_url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let joined: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("celery-taskset-meta-{chord_id}.j"))
        .arg(0)
        .arg(-1)
        .query_async(&mut connection)
        .await
        .unwrap();
    let states: Vec<Value> = joined
        .iter()
        .map(|entry| serde_json::from_str::<Value>(entry).unwrap()[2].clone())
        .collect();
    assert_eq!(states, [json!(state::SUCCESS), json!(state::FAILURE)]);
    // A copy of a member that runs again later completes nothing.
    let again = chord::count(&backend, &chord_id, Some(1), &failed)
        .await
        .unwrap();
    assert_eq!(again, Join::Waiting);
}
