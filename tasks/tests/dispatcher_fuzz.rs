//! Random and mutated task messages through the real worker, on both brokers: after them the
//! worker still answers `ping` on its pidbox and runs a task. Each run makes its own queue and
//! node name. `cargo test` sends a few dozen messages a broker; `make fuzz` sends
//! `PROPTEST_CASES` of them.

use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use runtime::broker::{self, Exchange, Subscription};
use runtime::client::Client;
use runtime::protocol::message::TASK_HEADERS;
use runtime::protocol::{Message, Properties, TaskRequest};
use runtime::worker::Worker;
use runtime::CeleryConfig;
use serde_json::{json, Map, Value};

const BROKERS: [&str; 2] = [
    "amqp://guest:guest@127.0.0.1:5672//",
    "redis://127.0.0.1:6379/0",
];

/// Messages per broker unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 48;

/// How long the worker gets to answer after the last message.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// Arbitrary JSON, a few levels deep, with numbers at the edges of what clocks and counters take.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![0.0, -1.0, 1e-30, 1e20, f64::MAX, 0.5]).prop_map(|f| json!(f)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::String),
        prop::sample::select(vec![
            "2020-01-01T00:00:00",
            "9999-12-31T23:59:59+00:00",
            "now",
            ""
        ])
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Task names that end quickly whatever their arguments (the demo tasks that sleep or spin as
/// long as asked are left out: bounding them is the web app's part), unknown ones, and junk.
fn task_name() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![
            "tasks.add",
            "tasks.mul",
            "tasks.echo",
            "tasks.fail",
            "tasks.xsum",
            "tasks.nope",
            "",
        ])
        .prop_map(|name| json!(name)),
        json_value(),
    ]
}

/// A Celery task message with some of its headers replaced by anything, its body by anything
/// or by a mutation of a valid one, and any content type.
fn message() -> impl Strategy<Value = Message> {
    // The headers the decoder reads, and those of canvas and stamping it carries on.
    let names = prop::sample::select(
        TASK_HEADERS
            .iter()
            .chain(&["stamps", "chord", "callbacks"])
            .copied()
            .collect::<Vec<_>>(),
    );
    let bodies = prop_oneof![
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        (json_value(), json_value(), json_value())
            .prop_map(|(a, k, e)| serde_json::to_vec(&json!([a, k, e])).unwrap()),
        prop::collection::vec(any::<u8>(), 0..64),
    ];
    let content_types = prop::sample::select(vec![
        "application/json",
        "application/x-python-serialize",
        "text/plain",
        "",
    ]);
    (
        task_name(),
        prop::collection::btree_map(names, json_value(), 0..6),
        prop::option::of(bodies),
        content_types,
        any::<u8>(),
    )
        .prop_map(|(task, replaced, body, content_type, cut)| {
            let request = TaskRequest::new("tasks.add", vec![json!(1), json!(2)], Map::new());
            let mut message = request.encode();
            message.headers.insert("task".into(), task);
            for (name, value) in replaced {
                message.headers.insert(name.into(), value);
            }
            match body {
                Some(body) => message.body = body,
                // A valid body cut short.
                None => message
                    .body
                    .truncate(usize::from(cut) % message.body.len().max(1)),
            }
            message.content_type = content_type.into();
            message
        })
}

/// Adds (`SADD`) or removes (`SREM`) the Redis binding of `queue` to the reply exchange with
/// routing key `ticket`, in kombu's binding table.
async fn reply_binding(broker_url: &str, command: &str, ticket: &str, queue: &str) {
    let mut redis = redis::Client::open(broker_url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd(command)
        .arg("_kombu.binding.reply.celery.pidbox")
        .arg(format!("{ticket}\x06\x16\x06\x16{queue}"))
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
}

/// The worker's answer to `ping`, asked on its pidbox as Celery's `inspect ping` does.
async fn ping(broker_url: &str, node: &str) -> Value {
    let broker = broker::connect(broker_url).await.unwrap();
    let ticket = uuid::Uuid::new_v4().to_string();
    let replies = Subscription {
        queue: format!("{ticket}.reply.celery.pidbox"),
        expires_ms: 10_000,
        message_ttl_ms: 10_000,
    };
    let mut answers = if broker_url.starts_with("redis") {
        // kombu's Redis transport has no private queues for a direct exchange: a list bound
        // to it in kombu's binding table, as Celery's client binds its reply queue.
        reply_binding(broker_url, "SADD", &ticket, &replies.queue).await;
        let mut deliveries = broker
            .consume(std::slice::from_ref(&replies.queue), 1)
            .await
            .unwrap();
        let (sender, answers) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(delivery) = deliveries.recv().await {
                let _ = delivery.settle.ack().await;
                if let Ok(message) = delivery.message {
                    let _ = sender.send(message).await;
                }
            }
        });
        answers
    } else {
        let mut broadcasts = broker
            .subscribe(&Exchange::REPLY, &ticket, &replies)
            .await
            .unwrap();
        let (sender, answers) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(broadcast) = broadcasts.recv().await {
                let _ = sender.send(broadcast.message).await;
            }
        });
        answers
    };
    let request = json!({
        "method": "ping", "arguments": {}, "destination": [node], "pattern": null, "matcher": null,
        "ticket": ticket, "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": ticket},
    });
    let message = Message {
        content_type: "application/json".into(),
        content_encoding: "utf-8".into(),
        headers: Map::new(),
        properties: Properties::default(),
        body: serde_json::to_vec(&request).unwrap(),
    };
    // The pidbox drops what comes before its queue exists: ask again until answered.
    let answer = tokio::time::timeout(ANSWER_WITHIN, async {
        loop {
            broker
                .publish_to(&Exchange::CONTROL, "", &message)
                .await
                .unwrap();
            if let Ok(Some(answer)) =
                tokio::time::timeout(Duration::from_secs(1), answers.recv()).await
            {
                break serde_json::from_slice::<Value>(&answer.body).unwrap();
            }
        }
    })
    .await
    .expect("the worker answers ping");
    if broker_url.starts_with("redis") {
        broker.delete_queue(&replies.queue).await.unwrap();
        reply_binding(broker_url, "SREM", &ticket, &replies.queue).await;
    }
    broker.close().await.unwrap();
    answer
}

async fn fuzz_the_worker_on(broker_url: &str) {
    let queue = format!("test-fuzz-{}", uuid::Uuid::new_v4().simple());
    let node = format!("{queue}@host");
    let config = CeleryConfig {
        broker_url: broker_url.into(),
        result_backend: Some("redis://127.0.0.1:6379/0".into()),
        task_default_queue: queue.clone(),
        result_expires: 600,
        worker_concurrency: 4,
        ..CeleryConfig::default()
    };
    let worker = Worker::new(
        config.clone(),
        tasks::registry(),
        node.clone(),
        vec![queue.clone()],
    )
    .await
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    let broker = broker::of(&config).await.unwrap();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let mut runner = TestRunner::new(Config::default());
    let strategy = message();
    let mut sent = 0;
    for _ in 0..cases {
        let message = strategy.new_tree(&mut runner).unwrap().current();
        // What a broker refuses to take (AMQP: a header it cannot carry) never reaches a worker.
        if broker.publish(&queue, &message).await.is_ok() {
            sent += 1;
        }
    }
    assert!(
        sent * 2 >= cases,
        "only {sent} of {cases} messages were sent"
    );

    assert_eq!(
        ping(broker_url, &node).await,
        json!({ node.clone(): {"ok": "pong"} })
    );
    let client = Client::connect(config).await.unwrap();
    let result = client
        .send_task(
            "tasks.add",
            vec![json!(20), json!(22)],
            Map::new(),
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(result.get(ANSWER_WITHIN).await.unwrap(), json!(42));
    assert!(!running.is_finished(), "the worker stopped");

    stop.send(()).unwrap();
    // Messages still held (far ETAs) go back to the queue, which goes with them.
    tokio::time::timeout(ANSWER_WITHIN, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    broker.delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_mutated_messages_leave_the_worker_serving() {
    for broker_url in BROKERS {
        fuzz_the_worker_on(broker_url).await;
    }
}
