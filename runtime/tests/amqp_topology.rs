//! RabbitMQ only: quorum queues, native delayed delivery and AMQP's name limits, through the
//! `Broker` the worker, the client and the web app's outbox publish with.

mod common;

use std::time::Instant;

use common::{amqp_url, unique_queue, within};
use runtime::broker::{self, Broker};
use runtime::config::QueueType;
use runtime::protocol::TaskRequest;
use runtime::CeleryConfig;
use serde_json::{json, Map};

/// A broker whose default queue `queue` is a quorum queue behind a topic exchange: Celery's
/// set-up for native delayed delivery.
async fn delaying_broker(queue: &str) -> std::sync::Arc<dyn Broker> {
    let config = CeleryConfig {
        broker_url: amqp_url(),
        task_default_queue: queue.to_string(),
        task_default_queue_type: QueueType::Quorum,
        task_default_exchange_type: "topic".into(),
        ..CeleryConfig::default()
    };
    broker::of(&config).await.unwrap()
}

#[tokio::test]
async fn an_eta_message_waits_in_the_delay_queues_then_arrives() {
    let queue = unique_queue("delayed");
    let broker = delaying_broker(&queue).await;
    let mut request = TaskRequest::new("tasks.add", vec![json!(1), json!(2)], Map::new());
    // 2.5 s rounds up to 3 s, binary 11: first 2 s in level 1, then 1 s in level 0.
    request.eta = Some(chrono::Utc::now() + chrono::Duration::milliseconds(2500));
    let sent = Instant::now();
    broker.publish(&queue, &request.encode()).await.unwrap();

    let declared = broker.declaration(&queue).unwrap();
    assert!(declared.is_quorum() && declared.exchange_type == "topic");
    let ready = |queue: String| {
        let broker = broker.clone();
        async move { broker.depth(&queue).await.unwrap().unwrap().ready }
    };
    assert_eq!(
        ready(queue.clone()).await,
        0,
        "published straight to its queue"
    );
    assert!(ready("celery_delayed_1".into()).await >= 1);

    let mut deliveries = broker
        .consume(std::slice::from_ref(&queue), 1)
        .await
        .unwrap();
    let delivery = within(15, "the delayed message", deliveries.recv())
        .await
        .unwrap();
    assert!(sent.elapsed().as_secs_f64() >= 2.0, "{:?}", sent.elapsed());
    let received = TaskRequest::decode(&delivery.message.unwrap()).unwrap();
    assert_eq!(received.id, request.id);
    delivery.settle.ack().await.unwrap();
    broker.delete_queue(&queue).await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test]
async fn a_message_due_now_or_on_a_direct_exchange_goes_straight_to_its_queue() {
    let queue = unique_queue("undelayed");
    let broker = delaying_broker(&queue).await;
    let mut due = TaskRequest::new("tasks.add", vec![json!(1), json!(2)], Map::new());
    due.eta = Some(chrono::Utc::now());
    broker.publish(&queue, &due.encode()).await.unwrap();
    // Another queue this broker creates gets the default direct exchange: no native delays.
    let direct = unique_queue("direct");
    let mut later = due.clone();
    later.eta = Some(chrono::Utc::now() + chrono::Duration::seconds(60));
    broker.publish(&direct, &later.encode()).await.unwrap();
    for queue in [&queue, &direct] {
        let depth = broker.depth(queue).await.unwrap().unwrap();
        assert_eq!(depth.ready, 1, "{queue}");
        broker.delete_queue(queue).await.unwrap();
    }
    broker.close().await.unwrap();
}

#[tokio::test]
async fn a_name_too_long_for_amqp_is_refused_and_the_connection_lives_on() {
    let broker = broker::connect(&amqp_url()).await.unwrap();
    let request = TaskRequest::new("tasks.add", vec![json!(1), json!(2)], Map::new());
    let long = "q".repeat(300);
    let error = broker.publish(&long, &request.encode()).await.unwrap_err();
    assert!(matches!(error, runtime::Error::InvalidName(_)), "{error}");
    let mut hostile = request.encode();
    hostile
        .headers
        .insert("h".repeat(300), json!("a header name too long"));
    let queue = unique_queue("names");
    let error = broker.publish(&queue, &hostile).await.unwrap_err();
    assert!(matches!(error, runtime::Error::InvalidName(_)), "{error}");
    // The shared connection and its publishing channel are whole.
    broker.publish(&queue, &request.encode()).await.unwrap();
    broker.check().await.unwrap();
    assert_eq!(broker.depth(&queue).await.unwrap().unwrap().ready, 1);
    broker.delete_queue(&queue).await.unwrap();
    broker.close().await.unwrap();
}

/// Far deeper than any header Celery sends, and still within what lapin encodes and parses on
/// its I/O thread's default stack (a thousand levels are not: the deepest a frame can carry is
/// tested on the worker binary, in interop/test_hostile.py).
const DEEP: usize = 100;

/// Publishes a task message whose headers hold a table nested [`DEEP`] levels.
fn publish_deep_headers(queue: &str, id: &str) {
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let (queue, id) = (queue.to_string(), id.to_string());
    std::thread::Builder::new()
        .spawn(move || {
            let mut nested = FieldTable::default();
            nested.insert("end".into(), AMQPValue::Boolean(true));
            for _ in 0..DEEP {
                let mut outer = FieldTable::default();
                outer.insert("n".into(), AMQPValue::FieldTable(nested));
                nested = outer;
            }
            let mut headers = FieldTable::default();
            headers.insert(
                "id".into(),
                AMQPValue::LongString(LongString::from(id.as_str())),
            );
            headers.insert("task".into(), AMQPValue::LongString("tasks.add".into()));
            headers.insert("deep".into(), AMQPValue::FieldTable(nested));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let connection =
                    lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
                        .await
                        .unwrap();
                let channel = connection.create_channel().await.unwrap();
                let properties = lapin::BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_content_encoding("utf-8".into())
                    .with_headers(headers);
                channel
                    .basic_publish(
                        "",
                        &queue,
                        BasicPublishOptions::default(),
                        b"[[1, 2], {}, {}]",
                        properties,
                    )
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                connection.close(200, "bye").await.unwrap();
            });
        })
        .unwrap()
        .join()
        .unwrap();
}

#[tokio::test]
async fn headers_nested_deep_are_refused_naming_the_task() {
    let queue = unique_queue("deep-headers");
    let broker = broker::connect(&amqp_url()).await.unwrap();
    let mut deliveries = broker
        .consume(std::slice::from_ref(&queue), 1)
        .await
        .unwrap();
    let id = uuid::Uuid::new_v4().to_string();
    publish_deep_headers(&queue, &id);
    let delivery = within(10, "the deep message", deliveries.recv())
        .await
        .unwrap();
    let error = delivery
        .message
        .expect_err("headers too deep are not a message");
    assert_eq!(error.task_id.as_deref(), Some(id.as_str()));
    assert!(error.reason.contains("deep"), "{}", error.reason);
    delivery.settle.reject(false).await.unwrap();
    // The connection goes on: a task after it arrives.
    let request = TaskRequest::new("tasks.add", vec![json!(1), json!(2)], Map::new());
    broker.publish(&queue, &request.encode()).await.unwrap();
    let next = within(10, "the next message", deliveries.recv())
        .await
        .unwrap();
    let next = TaskRequest::decode(&next.message.unwrap()).unwrap();
    assert_eq!(next.id, request.id);
    broker.delete_queue(&queue).await.unwrap();
}
