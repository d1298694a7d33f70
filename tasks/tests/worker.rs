//! The worker end to end on both brokers: our client sends, our worker runs the Rust tasks, and
//! results come back through the Redis backend.

// The crate's task macro implements `Task` inside a const block, which this lint flags.
#![allow(non_local_definitions)]

use std::time::Duration;

use runtime::canvas::{chord, Signature};
use runtime::client::{Client, SendOptions};
use runtime::protocol::result::state;
use runtime::worker::Worker;
use runtime::{CeleryConfig, Error};
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

const BROKERS: [&str; 2] = [
    "amqp://guest:guest@127.0.0.1:5672//",
    "redis://127.0.0.1:6379/0",
];

struct Running {
    client: Client,
    broker_url: String,
    queue: String,
    stop: oneshot::Sender<()>,
    cold: tokio_util::sync::CancellationToken,
    done: tokio::task::JoinHandle<runtime::Result<()>>,
}

async fn start(broker_url: &str, customize: impl FnOnce(&mut CeleryConfig)) -> Running {
    start_with(broker_url, tasks::registry(), customize).await
}

async fn start_with(
    broker_url: &str,
    registry: runtime::registry::Registry,
    customize: impl FnOnce(&mut CeleryConfig),
) -> Running {
    let queue = format!("test-worker-{}", uuid::Uuid::new_v4().simple());
    let mut config = CeleryConfig {
        broker_url: broker_url.into(),
        result_backend: Some("redis://127.0.0.1:6379/0".into()),
        task_default_queue: queue.clone(),
        task_track_started: true,
        result_extended: true,
        result_expires: 600,
        worker_concurrency: 4,
        ..CeleryConfig::default()
    };
    customize(&mut config);
    let worker = Worker::new(
        config.clone(),
        registry,
        // Node names are unique in a cluster (each owns its pidbox queue).
        format!("{queue}@host"),
        vec![queue.clone()],
    )
    .await
    .unwrap();
    let (stop, stopped) = oneshot::channel();
    let cold = worker.cold_shutdown();
    let done = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    let client = Client::connect(config).await.unwrap();
    Running {
        client,
        broker_url: broker_url.into(),
        queue,
        stop,
        cold,
        done,
    }
}

impl Running {
    /// Sends `name` with positional `args` and default options.
    async fn send(&self, name: &str, args: Value) -> runtime::client::AsyncResult {
        let args = args.as_array().cloned().unwrap_or_default();
        self.client
            .send_task(name, args, Map::new(), SendOptions::default())
            .await
            .unwrap()
    }

    async fn call(&self, name: &str, args: Value, kwargs: Value) -> runtime::Result<Value> {
        let args = args.as_array().cloned().unwrap_or_default();
        let kwargs: Map<String, Value> = kwargs.as_object().cloned().unwrap_or_default();
        let result = self
            .client
            .send_task(name, args, kwargs, SendOptions::default())
            .await?;
        result.get(Duration::from_secs(20)).await
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.done.await.unwrap().unwrap();
        self.client.close().await.unwrap();
        let broker = runtime::broker::connect(&self.broker_url).await.unwrap();
        broker.delete_queue(&self.queue).await.unwrap();
        broker.close().await.unwrap();
    }
}

/// Polls until every one of `results` is STARTED at the same moment (at most 20 s).
async fn wait_all_started(results: &[runtime::client::AsyncResult], what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut started = 0;
        for result in results {
            started += usize::from(result.state().await.unwrap() == state::STARTED);
        }
        if started == results.len() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn failure(result: runtime::Result<Value>) -> (String, String) {
    match result {
        Err(Error::TaskFailed { exc_type, message }) => (exc_type, message),
        other => panic!("expected a task failure, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_every_task_and_reports_failures_on_both_brokers() {
    for url in BROKERS {
        let worker = start(url, |_| {}).await;
        assert_eq!(
            worker
                .call("tasks.add", json!([1, 2]), json!({}))
                .await
                .unwrap(),
            json!(3),
            "{url}"
        );
        assert_eq!(
            worker
                .call("tasks.mul", json!([]), json!({"x": 6, "y": 7}))
                .await
                .unwrap(),
            json!(42)
        );
        assert_eq!(
            worker
                .call("tasks.xsum", json!([[1, 2, 3]]), json!({}))
                .await
                .unwrap(),
            json!(6)
        );
        let nested = json!({"a": [1, 2.5, null, "é"], "b": {"c": true}});
        assert_eq!(
            worker
                .call("tasks.echo", json!([nested.clone()]), json!({}))
                .await
                .unwrap(),
            nested
        );
        assert_eq!(
            worker
                .call("tasks.progress", json!([3, 10]), json!({}))
                .await
                .unwrap(),
            json!(3)
        );
        assert_eq!(
            failure(worker.call("tasks.fail", json!(["boom"]), json!({})).await),
            ("RuntimeError".into(), "boom".into())
        );
        assert_eq!(
            failure(worker.call("tasks.nope", json!([]), json!({})).await),
            ("NotRegistered".into(), "tasks.nope".into())
        );
        let (exc_type, message) =
            failure(worker.call("tasks.add", json!([1, 2, 3]), json!({})).await);
        assert_eq!(
            (exc_type.as_str(), message.as_str()),
            (
                "TypeError",
                "tasks.add() takes 2 positional arguments but 3 were given"
            )
        );
        let far = SendOptions {
            countdown: Some(1e13),
            ..SendOptions::default()
        };
        let refused = worker
            .client
            .send_task("tasks.add", vec![], Map::new(), far)
            .await;
        assert!(matches!(refused, Err(Error::InvalidOption(_))), "{url}");
        // The worker is still serving after every failure above.
        assert_eq!(
            worker
                .call("tasks.add", json!([2]), json!({"y": 2}))
                .await
                .unwrap(),
            json!(4)
        );
        worker.stop().await;
    }
}

/// A chord whose header fails fails its body as Celery's chord error handling does: stored
/// FAILURE with the errbacks it sent (one group) as its children, and counted in no chord it is a
/// member of, so an enclosing chord neither runs nor fails its own body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_chord_fails_its_body_with_its_errbacks_as_children_and_in_no_other_chord() {
    let worker = start(BROKERS[1], |_| {}).await;
    let immutable = |task: &str, args: Value| {
        Signature::new(task, args.as_array().cloned().unwrap()).set_immutable()
    };
    let inner_body = immutable("tasks.echo", json!(["inner body"]))
        .link_error(immutable("tasks.echo", json!(["errback"])));
    let inner_body_id = inner_body.option_str("task_id").unwrap();
    let inner = chord(vec![immutable("tasks.fail", json!(["boom"]))], inner_body);
    let outer = chord(
        vec![immutable("tasks.add", json!([1, 1])), inner],
        immutable("tasks.echo", json!(["outer body"])),
    );
    let outer_body = worker.client.apply(&outer).await.unwrap().remove(0);

    let inner_body = worker.client.result(&inner_body_id);
    let (exc_type, _) = failure(inner_body.get(Duration::from_secs(20)).await);
    assert_eq!(exc_type, "ChordError");
    let children = inner_body.meta().await.unwrap().unwrap().children;
    let errback_id = children[0][1][0][0][0]
        .as_str()
        .expect("[[group, null], [errback]]");
    let errback = worker.client.result(errback_id);
    assert_eq!(
        errback.get(Duration::from_secs(20)).await.unwrap(),
        json!("errback")
    );
    assert_eq!(outer_body.state().await.unwrap(), state::PENDING);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_result_max_bytes_is_stored_as_a_failure() {
    let worker = start(BROKERS[1], |c| c.result_max_bytes = 100).await;
    let small = "x".repeat(98); // 100 bytes of JSON with its quotes
    assert_eq!(
        worker
            .call("tasks.echo", json!([small.clone()]), json!({}))
            .await
            .unwrap(),
        json!(small)
    );
    let (exc_type, message) = failure(
        worker
            .call("tasks.echo", json!(["x".repeat(99)]), json!({}))
            .await,
    );
    assert_eq!(exc_type, "ValueError");
    assert!(
        message.contains("result of 101 bytes is over result_max_bytes (100)"),
        "{message}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_result_stores_nothing_and_acks_late_still_runs() {
    for url in BROKERS {
        let worker = start(url, |c| c.task_acks_late = true).await;
        let options = SendOptions {
            ignore_result: true,
            ..SendOptions::default()
        };
        let ignored = worker
            .client
            .send_task("tasks.add", vec![json!(1), json!(1)], Map::new(), options)
            .await
            .unwrap();
        // Tasks on one queue with concurrency run in any order, so wait on a later task that
        // also had to pass through: when it is done, the ignored one has been taken too.
        assert_eq!(
            worker
                .call("tasks.sleep", json!([0.2]), json!({}))
                .await
                .unwrap(),
            json!(0.2)
        );
        worker.stop().await;
        assert_eq!(ignored.state().await.unwrap(), state::PENDING, "{url}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_back_tasks_not_started() {
    for url in BROKERS {
        let worker = start(url, |_| {}).await;
        let later = SendOptions {
            countdown: Some(3600.0),
            ..SendOptions::default()
        };
        let held = worker
            .client
            .send_task("tasks.add", vec![json!(1), json!(2)], Map::new(), later)
            .await
            .unwrap();
        // Delivered in order: once the next task is done, the worker holds the countdown one.
        assert_eq!(
            worker
                .call("tasks.add", json!([0, 0]), json!({}))
                .await
                .unwrap(),
            json!(0)
        );
        let queue = worker.queue.clone();
        let stopping = tokio::time::timeout(Duration::from_secs(20), async {
            let _ = worker.stop.send(());
            worker.done.await.unwrap().unwrap();
        });
        stopping
            .await
            .expect("shutdown waited for a task due in an hour");
        let broker = runtime::broker::connect(url).await.unwrap();
        let mut deliveries = broker
            .consume(std::slice::from_ref(&queue), 1)
            .await
            .unwrap();
        let delivery = tokio::time::timeout(Duration::from_secs(10), deliveries.recv())
            .await
            .unwrap_or_else(|_| panic!("{url}: the held task is not back on {queue}"))
            .unwrap();
        let back = runtime::protocol::TaskRequest::decode(&delivery.message.unwrap()).unwrap();
        assert_eq!(back.id, held.id, "{url}");
        delivery.settle.ack().await.unwrap();
        worker.client.close().await.unwrap();
        broker.delete_queue(&queue).await.unwrap();
        broker.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_events_reach_celeryev_subscribers() {
    use runtime::broker::{Exchange, Subscription};
    for url in BROKERS {
        let listener = runtime::broker::connect(url).await.unwrap();
        let subscription = Subscription {
            queue: format!("test-events-{}", uuid::Uuid::new_v4().simple()),
            expires_ms: 60_000,
            message_ttl_ms: 5_000,
        };
        let mut events = listener
            .subscribe(&Exchange::EVENTS, "#", &subscription)
            .await
            .unwrap();
        let worker = start(url, |c| c.worker_send_task_events = true).await;
        let sent = worker.send("tasks.progress", json!([2, 10])).await;
        assert_eq!(sent.get(Duration::from_secs(20)).await.unwrap(), json!(2));
        // Other test runs share the exchange: keep only this task's events, in order.
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !seen
            .iter()
            .any(|(kind, _): &(String, Value)| kind == "task-succeeded")
        {
            let message = tokio::time::timeout_at(deadline, events.recv())
                .await
                .expect("events")
                .unwrap()
                .message;
            let event: Value = serde_json::from_slice(&message.body).unwrap();
            if event["uuid"] == json!(sent.id) {
                seen.push((event["type"].as_str().unwrap().to_string(), event));
            }
        }
        let kinds: Vec<&str> = seen.iter().map(|(kind, _)| kind.as_str()).collect();
        // Progress reports coalesce, so one or two `task-progress` come between.
        let (first, rest) = kinds.split_at(2);
        let (last, middle) = rest.split_last().unwrap();
        assert_eq!(
            (first, *last),
            (&["task-received", "task-started"][..], "task-succeeded"),
            "{url}: {kinds:?}"
        );
        assert!(
            !middle.is_empty() && middle.iter().all(|k| *k == "task-progress"),
            "{url}: {kinds:?}"
        );
        let (_, received) = &seen[0];
        assert_eq!(
            (&received["name"], &received["args"]),
            (&json!("tasks.progress"), &json!("(2, 10)"))
        );
        let (_, succeeded) = seen.last().unwrap();
        assert_eq!(succeeded["result"], json!("2"));
        assert!(succeeded["runtime"].as_f64().unwrap() > 0.0);
        assert!(succeeded["hostname"].as_str().unwrap().ends_with("@host"));
        worker.stop().await;
        listener.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_errors_retry_with_backoff_until_max_retries() {
    for url in BROKERS {
        let worker = start(url, |_| {}).await;
        // Two failures, then success on the third run (retries 0, 1, 2).
        let retried = worker.send("tasks.flaky", json!([2])).await;
        assert_eq!(
            retried.get(Duration::from_secs(30)).await.unwrap(),
            json!(2),
            "{url}"
        );
        let meta = retried.meta().await.unwrap().unwrap();
        assert_eq!(meta.extended.unwrap().retries, 2);
        assert_eq!(
            meta.parent_id.as_deref(),
            Some(retried.id.as_str()),
            "a retry's parent is itself"
        );
        // More failures than max_retries (3): the last error is the task's FAILURE.
        let (exc_type, message) = failure(worker.call("tasks.flaky", json!([9]), json!({})).await);
        assert_eq!(
            (exc_type.as_str(), message.as_str()),
            ("RuntimeError", "failing on purpose, attempt 4")
        );
        worker.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_time_limits_stop_async_and_blocking_tasks_and_free_their_slots() {
    let worker = start(BROKERS[1], |c| c.worker_concurrency = 2).await;
    let limited = SendOptions {
        time_limit: Some(1.0),
        ..SendOptions::default()
    };
    let mut stopped = Vec::new();
    // The blocking one outlives its limit by far: its failure must not wait for its thread.
    for (name, seconds) in [("tasks.sleep", 30.0), ("tasks.busy", 8.0)] {
        let sent = worker
            .client
            .send_task(name, vec![json!(seconds)], Map::new(), limited.clone())
            .await
            .unwrap();
        stopped.push(sent);
    }
    for sent in &stopped {
        let (exc_type, message) = failure(sent.get(Duration::from_secs(6)).await);
        assert_eq!(
            (exc_type.as_str(), message.as_str()),
            ("TimeLimitExceeded", "1")
        );
    }
    // Both slots are free again: two sleeps run side by side.
    let mut sleeps = Vec::new();
    for _ in 0..2 {
        sleeps.push(worker.send("tasks.sleep", json!([1.5])).await);
    }
    wait_all_started(&sleeps, "two sleeps running at once").await;
    for sent in sleeps {
        assert_eq!(sent.get(Duration::from_secs(20)).await.unwrap(), json!(1.5));
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_shutdown_returns_acks_late_tasks_to_the_broker() {
    // On Redis, a database of its own: a consumer with a 1 s visibility timeout restores every
    // message of its database unacked for longer, other tests' running tasks included.
    for url in [BROKERS[0], "redis://127.0.0.1:6379/12"] {
        let worker = start(url, |c| {
            c.task_acks_late = true;
            c.broker_transport_options.visibility_timeout = 1;
        })
        .await;
        let running = worker.send("tasks.sleep", json!([60])).await;
        wait_all_started(std::slice::from_ref(&running), url).await;
        let _ = worker.stop.send(());
        worker.cold.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(20), worker.done).await;
        stopped
            .expect("a cold shutdown waited for the running task")
            .unwrap()
            .unwrap();
        // The unfinished task's message is back: redelivered (AMQP) or restored (Redis).
        let broker = runtime::broker::connect_with(
            url,
            &runtime::config::TransportOptions {
                visibility_timeout: 1,
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
        let mut deliveries = broker
            .consume(std::slice::from_ref(&worker.queue), 1)
            .await
            .unwrap();
        let delivery = tokio::time::timeout(Duration::from_secs(15), deliveries.recv())
            .await
            .unwrap_or_else(|_| panic!("{url}: the abandoned task is not back"))
            .unwrap();
        let back = runtime::protocol::TaskRequest::decode(&delivery.message.unwrap()).unwrap();
        assert_eq!(back.id, running.id, "{url}");
        delivery.settle.ack().await.unwrap();
        worker.client.close().await.unwrap();
        broker.delete_queue(&worker.queue).await.unwrap();
        broker.close().await.unwrap();
    }
}

/// A cold shutdown gives running tasks `worker_soft_shutdown_timeout` to finish: a 1 s task sent
/// just before it ends SUCCESS on the worker going down, not back on the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_shutdown_waits_the_soft_shutdown_timeout_for_running_tasks() {
    let worker = start(BROKERS[0], |c| {
        c.task_acks_late = true;
        c.worker_soft_shutdown_timeout = 30.0;
    })
    .await;
    let running = worker.send("tasks.sleep", json!([1])).await;
    wait_all_started(std::slice::from_ref(&running), "the sleep").await;
    let _ = worker.stop.send(());
    worker.cold.cancel();
    tokio::time::timeout(Duration::from_secs(20), worker.done)
        .await
        .expect("the worker stopped once its task ended")
        .unwrap()
        .unwrap();
    assert_eq!(
        running.get(Duration::from_secs(5)).await.unwrap(),
        json!(1.0)
    );
    worker.client.close().await.unwrap();
    let broker = runtime::broker::connect(BROKERS[0]).await.unwrap();
    broker.delete_queue(&worker.queue).await.unwrap();
    broker.close().await.unwrap();
}

/// Runs of `panics_once` so far; it panics on the first.
static PANICKY_RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[celery::task(name = "test.panics_once")]
fn panics_once() -> celery::task::TaskResult<usize> {
    let run = PANICKY_RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    assert!(run > 1, "first run dies");
    Ok(run)
}

/// A panic is a lost run, as a dead pool process in Celery: by default FAILURE `WorkerLostError`;
/// with `task_acks_late` and `task_reject_on_worker_lost` the message goes back and runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_task_is_a_lost_run_requeued_only_when_asked() {
    use std::sync::atomic::Ordering;
    let registry = || runtime::registry::Registry::new().task::<panics_once>();
    for url in BROKERS {
        PANICKY_RUNS.store(0, Ordering::SeqCst);
        let worker = start_with(url, registry(), |c| c.task_acks_late = true).await;
        let (exc_type, message) =
            failure(worker.call("test.panics_once", json!([]), json!({})).await);
        assert_eq!(exc_type, "WorkerLostError", "{url}");
        assert!(message.contains("first run dies"), "{url}: {message}");
        assert_eq!(PANICKY_RUNS.load(Ordering::SeqCst), 1, "{url}");
        worker.stop().await;

        PANICKY_RUNS.store(0, Ordering::SeqCst);
        let worker = start_with(url, registry(), |c| {
            c.task_acks_late = true;
            c.task_reject_on_worker_lost = true;
        })
        .await;
        let second = worker.call("test.panics_once", json!([]), json!({})).await;
        assert_eq!(
            second.unwrap(),
            json!(2),
            "{url}: the requeued message ran again"
        );
        worker.stop().await;
    }
}

/// A failover `broker_url` and no result backend: the worker connects to the node of the list
/// that answers and consumes (the task app handle, which cannot read a list, is not given it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_list_without_a_result_backend_consumes_from_the_node_that_answers() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let queue = format!("test-worker-{}", uuid::Uuid::new_v4().simple());
    let config = CeleryConfig {
        broker_url: format!("amqp://guest:guest@127.0.0.1:{dead}//;{}", BROKERS[0]),
        result_backend: None,
        task_default_queue: queue.clone(),
        worker_concurrency: 1,
        ..CeleryConfig::default()
    };
    let worker = Worker::new(
        config,
        tasks::registry(),
        format!("{queue}@host"),
        vec![queue.clone()],
    )
    .await
    .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    let broker = runtime::broker::connect(BROKERS[0]).await.unwrap();
    let request =
        runtime::protocol::TaskRequest::new("tasks.add", vec![json!(1), json!(2)], Map::new());
    broker.publish(&queue, &request.encode()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while broker
        .depth(&queue)
        .await
        .unwrap()
        .is_some_and(|d| d.ready > 0)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker took nothing from {queue}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    done.await.unwrap().unwrap();
    broker.delete_queue(&queue).await.unwrap();
    broker.close().await.unwrap();
}

/// The demo tasks refuse to run longer than `MAX_DEMO_SECONDS`, with a task error that says so,
/// rather than hold a slot for as long as a message asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_tasks_refuse_runs_over_their_bound() {
    let worker = start(BROKERS[1], |_| {}).await;
    for (task, args, message) in [
        (
            "tasks.sleep",
            json!([1e9]),
            "tasks.sleep takes 0 to 600 seconds, not 1000000000",
        ),
        (
            "tasks.busy",
            json!([601]),
            "tasks.busy takes 0 to 600 seconds, not 601",
        ),
        (
            "tasks.sleep",
            json!([-1]),
            "tasks.sleep takes 0 to 600 seconds, not -1",
        ),
        (
            "tasks.progress",
            json!([10_000, 100]),
            "tasks.progress takes 0 to 600 seconds, not 1000",
        ),
    ] {
        assert_eq!(
            failure(worker.call(task, args, json!({})).await),
            ("RuntimeError".into(), message.into()),
            "{task}"
        );
    }
    assert_eq!(
        worker
            .call("tasks.sleep", json!([0.01]), json!({}))
            .await
            .unwrap(),
        json!(0.01)
    );
    worker.stop().await;
}

/// Sends `name` as unique under this run's lock `key` until it is accepted (at most 5 s);
/// returns it and how long the lock was still held after the first try.
async fn send_unique_when_free(
    worker: &Running,
    key: &str,
    name: &str,
    args: Value,
) -> (runtime::client::AsyncResult, Duration) {
    let began = tokio::time::Instant::now();
    loop {
        match worker.send_unique(key, name, args.clone()).await {
            Ok(sent) => return (sent, began.elapsed()),
            Err(Error::NotUnique { .. }) if began.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(error) => panic!("{name} still refused after 5 s: {error}"),
        }
    }
}

impl Running {
    /// Sends `name` as unique for a minute under lock `key` of this run.
    async fn send_unique(
        &self,
        key: &str,
        name: &str,
        args: Value,
    ) -> runtime::Result<runtime::client::AsyncResult> {
        let options = SendOptions {
            unique_for: Some(Duration::from_secs(60)),
            unique_key: Some(format!("{key}-{}", self.queue)),
            ..SendOptions::default()
        };
        let args = args.as_array().cloned().unwrap_or_default();
        self.client.send_task(name, args, Map::new(), options).await
    }
}

fn refused_by(refused: runtime::Result<runtime::client::AsyncResult>) -> String {
    match refused {
        Err(Error::NotUnique { holder, .. }) => holder,
        Err(error) => panic!("expected a refusal, got {error}"),
        Ok(sent) => panic!("expected a refusal, {} was sent", sent.id),
    }
}

/// A unique task's lock is held while it is queued, running and waiting for a retry, and given
/// back by the worker once it ends, in success or in failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_task_is_refused_until_it_ends_in_success_or_failure_but_not_at_a_retry() {
    for url in BROKERS {
        let worker = start(url, |_| {}).await;
        let running = worker
            .send_unique("sleep", "tasks.sleep", json!([0.5]))
            .await
            .unwrap();
        wait_all_started(std::slice::from_ref(&running), "the unique task").await;
        let refused = worker
            .send_unique("sleep", "tasks.sleep", json!([0.5]))
            .await;
        assert_eq!(refused_by(refused), running.id, "{url}");
        running.get(Duration::from_secs(20)).await.unwrap();
        let (again, held) =
            send_unique_when_free(&worker, "sleep", "tasks.sleep", json!([0.0])).await;
        eprintln!("{url}: lock held {held:?} after SUCCESS was readable");
        again.get(Duration::from_secs(20)).await.unwrap();

        let failing = worker
            .send_unique("fail", "tasks.fail", json!(["on purpose"]))
            .await
            .unwrap();
        failure(failing.get(Duration::from_secs(20)).await);
        let (_, held) = send_unique_when_free(&worker, "fail", "tasks.fail", json!(["x"])).await;
        eprintln!("{url}: lock held {held:?} after FAILURE was readable");

        // One failure, then a retry about a second later: the lock stays through the RETRY.
        let flaky = worker
            .send_unique("flaky", "tasks.flaky", json!([1]))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while flaky.state().await.unwrap() != state::RETRY {
            assert!(tokio::time::Instant::now() < deadline, "{url}: no RETRY");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let refused = worker.send_unique("flaky", "tasks.flaky", json!([1])).await;
        assert_eq!(refused_by(refused), flaky.id, "{url}: refused at the retry");
        assert_eq!(flaky.get(Duration::from_secs(20)).await.unwrap(), json!(1));
        send_unique_when_free(&worker, "flaky", "tasks.flaky", json!([0])).await;
        worker.stop().await;
    }
}
