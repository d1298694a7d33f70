//! Unique sends against the real Redis: a second send of the same call is refused naming the
//! task that holds the lock, other arguments or another key are not, and the lock expires; a
//! task's `task_annotations` make every send of it unique; a canvas that starts with one task is
//! unique by that task. The worker's giving back is tested end to end in `tasks/tests/worker.rs`.

mod common;

use std::time::Duration;

use common::{redis_url, unique_queue};
use runtime::canvas::{group, Signature};
use runtime::client::{ApplyOptions, Client, SendOptions};
use runtime::config::TaskAnnotation;
use runtime::error::Error;
use runtime::CeleryConfig;
use serde_json::{json, Map, Value};

async fn client(result_backend: Option<String>) -> Client {
    annotated_client(result_backend, &[]).await
}

/// A client whose `task_annotations` make each of `unique_tasks` unique for a minute.
async fn annotated_client(result_backend: Option<String>, unique_tasks: &[&str]) -> Client {
    let annotation = TaskAnnotation {
        unique_for: Some(60.0),
        ..TaskAnnotation::default()
    };
    let config = CeleryConfig {
        broker_url: redis_url(),
        result_backend,
        task_annotations: unique_tasks
            .iter()
            .map(|task| (task.to_string(), annotation.clone()))
            .collect(),
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

#[tokio::test]
async fn a_task_s_annotation_makes_every_send_unique_and_the_same_task_id_is_the_same_send() {
    let task = task_name();
    let client = annotated_client(Some(redis_url()), &[&task]).await;
    let queue = unique_queue("unique-annotated");
    let on_queue = SendOptions {
        queue: Some(queue.clone()),
        ..SendOptions::default()
    };
    let first = send(&client, &task, json!([1]), on_queue.clone())
        .await
        .unwrap();
    let refused = send(&client, &task, json!([1]), on_queue.clone()).await;
    assert_eq!(holder(refused), first);
    // A key alone takes the annotation's duration.
    let key = format!("annotated-{}", uuid::Uuid::new_v4().simple());
    let keyed = SendOptions {
        unique_key: Some(key),
        ..on_queue.clone()
    };
    let keyed_first = send(&client, &task, json!([2]), keyed.clone())
        .await
        .unwrap();
    assert_eq!(
        holder(send(&client, &task, json!([3]), keyed).await),
        keyed_first
    );
    // Sending the holder's own task id again (an outbox's second publish) is the same send.
    let again = SendOptions {
        task_id: Some(first.clone()),
        ..on_queue
    };
    assert_eq!(
        send(&client, &task, json!([1]), again).await.unwrap(),
        first
    );
    done(client, &queue).await;
}

#[tokio::test]
async fn a_canvas_that_starts_with_one_task_is_unique_by_it_and_a_group_cannot_ask() {
    let annotated = task_name();
    let client = annotated_client(Some(redis_url()), &[&annotated]).await;
    let queue = unique_queue("unique-canvas");
    let step = |task: &str, n: i64| Signature::new(task, vec![n.into()]).on_queue(queue.clone());
    let plain = task_name();
    let asked = ApplyOptions {
        unique_for: Some(Duration::from_secs(60)),
        unique_key: None,
    };
    let first = step(&plain, 1);
    let first_id = first.option_str("task_id").unwrap();
    client
        .apply_with(&runtime::chain![first, step(&plain, 2)], asked.clone())
        .await
        .unwrap();
    let again = runtime::chain![step(&plain, 1), step(&plain, 2)];
    let refused = client.apply_with(&again, asked.clone()).await;
    assert_eq!(holder(refused.map(|_| String::new())), first_id);
    // The same single task sent alone names the same lock.
    let refused = send(&client, &plain, json!([1]), unique(&queue, 60, None)).await;
    assert_eq!(holder(refused), first_id);
    // Without asking, the annotation of the first task decides.
    client
        .apply(&runtime::chain![step(&annotated, 1), step(&plain, 3)])
        .await
        .unwrap();
    let refused = client.apply(&step(&annotated, 1)).await;
    assert!(
        matches!(refused, Err(Error::NotUnique { .. })),
        "{:?}",
        refused.err()
    );
    // A group starts with several tasks: asking is refused, the annotation is not applied.
    let members = group(vec![step(&annotated, 1), step(&plain, 4)]);
    let refused = client.apply_with(&members, asked).await;
    assert!(
        matches!(refused, Err(Error::InvalidOption(_))),
        "{:?}",
        refused.err()
    );
    client.apply(&members).await.unwrap();
    done(client, &queue).await;
}
