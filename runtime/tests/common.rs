//! Shared by the integration tests: the local services, and names no other run uses.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

/// RabbitMQ of the local machine (override with `TEST_AMQP_URL`).
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672//".into())
}

/// Redis of the local machine (override with `TEST_REDIS_URL`).
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A Redis database of its own for tests whose consumers use a short visibility timeout: such a
/// consumer restores every message of its database unacked for longer, so in the shared database
/// it would re-run other tests' work, and it would share kombu's restore mutex with them
/// (override with `TEST_ISOLATED_REDIS_URL`).
pub fn isolated_redis_url() -> String {
    std::env::var("TEST_ISOLATED_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/12".into())
}

/// Both broker URLs, so each behaviour is checked on each transport.
pub fn broker_urls() -> [String; 2] {
    [amqp_url(), redis_url()]
}

/// A queue name of this test run alone.
pub fn unique_queue(prefix: &str) -> String {
    format!("test-{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Awaits `future` for at most `seconds`, failing the test with `what` on timeout.
pub async fn within<T>(seconds: u64, what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(seconds), future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {seconds}s waiting for {what}"))
}

/// Declares `queue` on RabbitMQ `url` as a queue that holds one message and refuses (nacks)
/// every publish beyond; returns the connection that declared it.
pub async fn declare_full_after_one(url: &str, queue: &str) -> lapin::Connection {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let connection = lapin::Connection::connect(url, Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(1));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue, durable, arguments)
        .await
        .unwrap();
    connection
}
