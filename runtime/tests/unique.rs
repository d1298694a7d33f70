//! Unique sends against the real Redis: a second send of the same call is refused naming the
//! task that holds the lock, other arguments or another key are not, and the lock expires. The
//! worker's giving back is tested end to end in `tasks/tests/worker.rs`.

mod common;

use std::time::Duration;

use common::{redis_url, unique_queue};
use runtime::client::{Client, SendOptions};
use runtime::error::Error;
use runtime::CeleryConfig;
use serde_json::{json, Map, Value};

async fn client(result_backend: Option<String>) -> Client {
    let config = CeleryConfig {
        broker_url: redis_url(),
        result_backend,
        ..CeleryConfig::default()
    };
    Client::connect(config).await.unwrap()
}

fn unique(queue: &str, seconds: u64, key: Option<&str>) -> SendOptions {
    SendOptions {
        queue: Some(queue.to_string()),
        unique_for: Some(Duration::from_secs(seconds)),
        unique_key: key.map(str::to_string),
        ..SendOptions::default()
    }
}

/// A task name no other run sends, so its lock is this run's alone.
fn task_name() -> String {
    format!("tests.unique_{}", uuid::Uuid::new_v4().simple())
}

async fn send(
    client: &Client,
    task: &str,
    args: Value,
    options: SendOptions,
) -> runtime::Result<String> {
    let args = args.as_array().cloned().unwrap_or_default();
    let sent = client.send_task(task, args, Map::new(), options).await?;
    Ok(sent.id)
}

/// Closes `client` and deletes the test's queue.
async fn done(client: Client, queue: &str) {
    client.close().await.unwrap();
    let broker = runtime::broker::connect(&redis_url()).await.unwrap();
    broker.delete_queue(queue).await.unwrap();
    broker.close().await.unwrap();
}

fn holder(refused: runtime::Result<String>) -> String {
    match refused {
        Err(Error::NotUnique { holder, .. }) => holder,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_second_send_of_the_same_call_is_refused_naming_the_first() {
    let client = client(Some(redis_url())).await;
    let queue = unique_queue("unique");
    let task = task_name();
    let first = send(&client, &task, json!([1, 2]), unique(&queue, 60, None))
        .await
        .unwrap();
    let refused = send(&client, &task, json!([1, 2]), unique(&queue, 60, None)).await;
    let message = format!("{:?}", refused.as_ref().err());
    assert_eq!(holder(refused), first, "{message}");
    // Other arguments are another lock; a send not asked to be unique takes none.
    send(&client, &task, json!([1, 3]), unique(&queue, 60, None))
        .await
        .unwrap();
    let plain = SendOptions {
        queue: Some(queue.clone()),
        ..SendOptions::default()
    };
    send(&client, &task, json!([1, 2]), plain).await.unwrap();
    done(client, &queue).await;
}

#[tokio::test]
async fn a_unique_key_is_one_lock_whatever_the_task_and_its_arguments() {
    let client = client(Some(redis_url())).await;
    let queue = unique_queue("unique-key");
    let key = format!("report-{}", uuid::Uuid::new_v4().simple());
    let first = send(
        &client,
        &task_name(),
        json!([1]),
        unique(&queue, 60, Some(&key)),
    )
    .await
    .unwrap();
    let refused = send(
        &client,
        &task_name(),
        json!([2]),
        unique(&queue, 60, Some(&key)),
    )
    .await;
    assert_eq!(holder(refused), first);
    done(client, &queue).await;
}

#[tokio::test]
async fn the_lock_expires_after_unique_for() {
    let client = client(Some(redis_url())).await;
    let queue = unique_queue("unique-expiry");
    let task = task_name();
    send(&client, &task, json!([]), unique(&queue, 1, None))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Redis expires a key within a millisecond of its time; allow it a few more tries.
    let mut accepted = None;
    for _ in 0..20 {
        match send(&client, &task, json!([]), unique(&queue, 1, None)).await {
            Ok(id) => {
                accepted = Some(id);
                break;
            }
            Err(Error::NotUnique { .. }) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(error) => panic!("{error}"),
        }
    }
    assert!(accepted.is_some(), "the lock never expired");
    done(client, &queue).await;
}

#[tokio::test]
async fn a_unique_send_needs_a_backend_and_a_key_needs_a_duration() {
    let without_backend = client(None).await;
    let queue = unique_queue("unique-invalid");
    let refused = send(
        &without_backend,
        &task_name(),
        json!([]),
        unique(&queue, 5, None),
    )
    .await;
    assert!(matches!(refused, Err(Error::NoBackend)), "{refused:?}");
    let key_only = SendOptions {
        unique_key: Some("k".into()),
        ..SendOptions::default()
    };
    let refused = send(&without_backend, &task_name(), json!([]), key_only).await;
    assert!(
        matches!(refused, Err(Error::InvalidOption(_))),
        "{refused:?}"
    );
    without_backend.close().await.unwrap();
}
