//! Task execution through the registry: blocking code stays off the async threads.

// The crate's macro implements `Task` inside a const block, which this lint flags.
#![allow(non_local_definitions)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use celery::error::TaskError;
use celery::task::TaskResult;
use runtime::progress::TaskContext;
use runtime::protocol::TaskRequest;
use runtime::registry::{Outcome, Registry};
use runtime::worker::app_handle;
use runtime::CeleryConfig;
use serde_json::{json, Map};

static RELEASED: AtomicBool = AtomicBool::new(false);

/// Blocks its thread until the async side sets `RELEASED` (or 10 s pass).
#[celery::task(name = "test.wait_for_release")]
fn wait_for_release() -> TaskResult<bool> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !RELEASED.load(Ordering::SeqCst) {
        if Instant::now() > deadline {
            return Err(TaskError::UnexpectedError(
                "never released: the async side was blocked".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(true)
}

#[tokio::test(flavor = "current_thread")]
async fn blocking_tasks_leave_the_async_thread_free() {
    let config = CeleryConfig {
        broker_url: common::redis_url(),
        ..CeleryConfig::default()
    };
    let app = app_handle(&config).await.unwrap();
    let registry = Registry::new().blocking_task::<wait_for_release>();
    let handler = registry.get("test.wait_for_release").unwrap();
    let request = TaskRequest::new("test.wait_for_release", vec![], Map::new());
    let (context, _updates) = TaskContext::new(&request);
    // On a one-thread runtime the release below can only run if the task is elsewhere.
    let (outcome, ()) = tokio::join!(handler.run(app, &request, "test@host", context), async {
        tokio::task::yield_now().await;
        RELEASED.store(true, Ordering::SeqCst);
    });
    assert_eq!(outcome, Outcome::Success(json!(true)));
}
