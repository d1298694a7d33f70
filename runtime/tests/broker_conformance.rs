//! One behaviour, both transports: every test here runs against RabbitMQ and Redis, so the
//! brokers cannot drift apart.

mod common;

use common::{broker_urls, unique_queue, within};
use runtime::broker::{self, Delivery, QueueDepth};
use runtime::error::Error;
use runtime::protocol::TaskRequest;
use serde_json::{json, Map};

fn request(n: i64) -> TaskRequest {
    TaskRequest::new("tasks.add", vec![json!(n), json!(1)], Map::new())
}

async fn next(deliveries: &mut tokio::sync::mpsc::Receiver<Delivery>) -> Delivery {
    within(10, "a delivery", deliveries.recv())
        .await
        .expect("consumer stopped")
}

#[tokio::test]
async fn published_messages_arrive_intact_and_acks_remove_them() {
    for url in broker_urls() {
        let queue = unique_queue("roundtrip");
        let broker = broker::connect(&url).await.unwrap();
        let sent = request(1);
        broker.publish(&queue, &sent.encode()).await.unwrap();
        let mut deliveries = broker
            .consume(std::slice::from_ref(&queue), 4)
            .await
            .unwrap();
        let delivery = next(&mut deliveries).await;
        assert_eq!(delivery.queue, queue, "{url}");
        let received = TaskRequest::decode(&delivery.message.unwrap()).unwrap();
        assert_eq!(
            (&received.id, &received.args),
            (&sent.id, &sent.args),
            "{url}"
        );
        delivery.settle.ack().await.unwrap();
        broker.delete_queue(&queue).await.unwrap();
        broker.close().await.unwrap();
    }
}

#[tokio::test]
async fn a_requeued_message_is_delivered_again() {
    for url in broker_urls() {
        let queue = unique_queue("requeue");
        let broker = broker::connect(&url).await.unwrap();
        let sent = request(2);
        broker.publish(&queue, &sent.encode()).await.unwrap();
        let mut deliveries = broker
            .consume(std::slice::from_ref(&queue), 1)
            .await
            .unwrap();
        next(&mut deliveries)
            .await
            .settle
            .reject(true)
            .await
            .unwrap();
        let again = next(&mut deliveries).await;
        let received = TaskRequest::decode(&again.message.unwrap()).unwrap();
        assert_eq!(received.id, sent.id, "{url}");
        again.settle.ack().await.unwrap();
        broker.delete_queue(&queue).await.unwrap();
        broker.close().await.unwrap();
    }
}

#[tokio::test]
async fn prefetch_bounds_what_is_held_unsettled() {
    for url in broker_urls() {
        let queue = unique_queue("prefetch");
        let broker = broker::connect(&url).await.unwrap();
        for n in 0..3 {
            broker.publish(&queue, &request(n).encode()).await.unwrap();
        }
        let mut deliveries = broker
            .consume(std::slice::from_ref(&queue), 2)
            .await
            .unwrap();
        let first = next(&mut deliveries).await;
        let second = next(&mut deliveries).await;
        // With two unsettled, the third must wait; settling one lets it through.
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(1500), deliveries.recv()).await;
        assert!(
            early.is_err(),
            "{url}: a third message arrived past prefetch 2"
        );
        first.settle.ack().await.unwrap();
        let third = next(&mut deliveries).await;
        second.settle.ack().await.unwrap();
        third.settle.ack().await.unwrap();
        broker.delete_queue(&queue).await.unwrap();
        broker.close().await.unwrap();
    }
}

#[tokio::test]
async fn messages_are_consumed_from_every_named_queue() {
    for url in broker_urls() {
        let queues = [unique_queue("multi-a"), unique_queue("multi-b")];
        let broker = broker::connect(&url).await.unwrap();
        for queue in &queues {
            broker.publish(queue, &request(3).encode()).await.unwrap();
        }
        let mut deliveries = broker.consume(&queues, 4).await.unwrap();
        let mut seen = vec![next(&mut deliveries).await, next(&mut deliveries).await];
        seen.sort_by(|a, b| a.queue.cmp(&b.queue));
        let mut expected = queues.to_vec();
        expected.sort();
        assert_eq!(
            seen.iter().map(|d| d.queue.clone()).collect::<Vec<_>>(),
            expected,
            "{url}"
        );
        for delivery in seen {
            delivery.settle.ack().await.unwrap();
        }
        for queue in &queues {
            broker.delete_queue(queue).await.unwrap();
        }
        broker.close().await.unwrap();
    }
}

/// Messages sent without waiting for their confirmations are all taken once the confirmations
/// are in, and arrive in the order sent.
#[tokio::test]
async fn sent_messages_are_confirmed_behind_them_in_order() {
    const SENT: usize = 200;
    for url in broker_urls() {
        let queue = unique_queue("pipelined");
        let broker = broker::connect(&url).await.unwrap();
        let sent: Vec<TaskRequest> = (0..SENT as i64).map(request).collect();
        let mut confirmations = Vec::new();
        for request in &sent {
            confirmations.push(broker.send(&queue, &request.encode()).await.unwrap());
        }
        for confirmation in confirmations {
            within(10, "a confirmation", confirmation).await.unwrap();
        }
        let depth = broker.depth(&queue).await.unwrap().unwrap();
        assert_eq!(depth.ready, SENT as u64, "{url}");
        let mut deliveries = broker
            .consume(std::slice::from_ref(&queue), 32)
            .await
            .unwrap();
        for expected in &sent {
            let delivery = next(&mut deliveries).await;
            let received = TaskRequest::decode(delivery.message.as_ref().unwrap()).unwrap();
            assert_eq!(received.id, expected.id, "{url}");
            delivery.settle.ack().await.unwrap();
        }
        broker.delete_queue(&queue).await.unwrap();
        broker.close().await.unwrap();
    }
}

/// A message RabbitMQ refuses (its queue is full and rejects publishes) is told on its own
/// confirmation, the message before it confirmed; `publish` reports the same refusal.
#[tokio::test]
async fn a_refused_message_is_told_on_its_own_confirmation() {
    let url = common::amqp_url();
    let queue = unique_queue("full");
    let declarer = common::declare_full_after_one(&url, &queue).await;
    let broker = broker::connect(&url).await.unwrap();
    let (first, second) = (request(1), request(2));
    let taken = broker.send(&queue, &first.encode()).await.unwrap();
    let refused = broker.send(&queue, &second.encode()).await.unwrap();
    within(10, "the first confirmation", taken).await.unwrap();
    match within(10, "the second confirmation", refused).await {
        Err(Error::NotConfirmed(id)) => assert_eq!(id, second.id),
        other => panic!("a publish to a full queue answered {other:?}"),
    }
    let third = broker.publish(&queue, &request(3).encode()).await;
    assert!(matches!(third, Err(Error::NotConfirmed(_))), "{third:?}");
    broker.delete_queue(&queue).await.unwrap();
    broker.close().await.unwrap();
    let _ = declarer.close(200, "done").await;
}

/// Redis answers the push itself: a push it refuses (the queue's key holds another type) fails
/// the send, with no confirmation left to wait for.
#[tokio::test]
async fn redis_tells_a_refused_push_at_the_send() {
    let url = common::redis_url();
    let queue = unique_queue("wrongtype");
    let mut redis = raw_redis(&url).await;
    redis::cmd("SET")
        .arg(&queue)
        .arg("not a list")
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
    let broker = broker::connect(&url).await.unwrap();
    let sent = broker.send(&queue, &request(1).encode()).await;
    assert!(matches!(sent, Err(Error::Redis(_))), "{sent:?}");
    broker.delete_queue(&queue).await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test]
async fn a_queue_python_declared_with_other_arguments_is_used_as_it_is() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let url = common::amqp_url();
    let queue = unique_queue("priority");
    // What a Python app with `task_queue_max_priority = 10` declares.
    let python = lapin::Connection::connect(&url, Default::default())
        .await
        .unwrap();
    let channel = python.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(10));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(&queue, durable, arguments)
        .await
        .unwrap();

    let broker = broker::connect(&url).await.unwrap();
    let sent = request(4);
    broker.publish(&queue, &sent.encode()).await.unwrap();
    let mut deliveries = broker
        .consume(std::slice::from_ref(&queue), 1)
        .await
        .unwrap();
    let delivery = next(&mut deliveries).await;
    assert_eq!(
        TaskRequest::decode(&delivery.message.unwrap()).unwrap().id,
        sent.id
    );
    delivery.settle.ack().await.unwrap();
    broker.delete_queue(&queue).await.unwrap();
    broker.close().await.unwrap();
    let _ = python.close(200, "done").await;
}

/// A subscription to the events exchange under a routing key of its own, and that key.
async fn events_subscription(
    broker: &dyn broker::Broker,
) -> (String, tokio::sync::mpsc::Receiver<broker::Broadcast>) {
    let key = format!("test.{}", uuid::Uuid::new_v4().simple());
    let subscription = broker::Subscription {
        queue: unique_queue("events"),
        expires_ms: 60_000,
        message_ttl_ms: 5_000,
    };
    let received = broker
        .subscribe(&broker::Exchange::EVENTS, &key, &subscription)
        .await
        .unwrap();
    (key, received)
}

#[tokio::test]
async fn broadcasts_reach_subscribers_of_their_routing_key() {
    use runtime::broker::Exchange;
    for url in broker_urls() {
        let broker = broker::connect(&url).await.unwrap();
        let (key, mut received) = events_subscription(broker.as_ref()).await;
        let mut message = request(5).encode();
        message.properties.delivery_mode = 1;
        broker
            .publish_to(&Exchange::EVENTS, &key, &message)
            .await
            .unwrap();
        let got = within(10, "the broadcast", received.recv())
            .await
            .expect("subscription ended")
            .message;
        assert_eq!(
            (got.body, got.headers),
            (message.body, message.headers),
            "{url}"
        );
        broker.close().await.unwrap();
    }
}

/// Many broadcasts published together (a worker's events) all arrive, in order.
#[tokio::test]
async fn broadcasts_published_together_all_arrive_in_order() {
    use runtime::broker::Exchange;
    for url in broker_urls() {
        let broker = broker::connect(&url).await.unwrap();
        let (key, mut received) = events_subscription(broker.as_ref()).await;
        let messages: Vec<_> = (0..300)
            .map(|n| {
                let mut message = request(n).encode();
                message.properties.delivery_mode = 1;
                (key.clone(), message)
            })
            .collect();
        broker
            .publish_all_to(&Exchange::EVENTS, &messages)
            .await
            .unwrap();
        for (_, sent) in &messages {
            let got = within(10, "a broadcast", received.recv())
                .await
                .expect("subscription ended")
                .message;
            assert_eq!(got.body, sent.body, "{url}");
        }
        broker.close().await.unwrap();
    }
}

/// A named subscription is one queue for all its subscribers: on RabbitMQ each message reaches
/// one of them, and what is routed while none listens waits in the queue (`x-expires` keeps it)
/// for the next; on Redis (PUB/SUB) every subscriber hears it, and nothing waits.
#[tokio::test]
async fn a_named_subscription_is_shared_and_on_rabbitmq_keeps_what_comes_while_away() {
    use runtime::broker::{BrokerKind, Exchange, NamedSubscription};
    for url in broker_urls() {
        let broker = broker::connect(&url).await.unwrap();
        let key = format!("test.{}", uuid::Uuid::new_v4().simple());
        let subscription = NamedSubscription {
            queue: unique_queue("monitor"),
            expires_ms: 60_000,
        };
        let event = |n: i64| {
            let mut message = request(n).encode();
            message.properties.delivery_mode = 1;
            message
        };
        let body = |delivery: &Delivery| delivery.message.as_ref().unwrap().body.clone();
        let mut first = broker
            .subscribe_named(&Exchange::EVENTS, &key, &subscription, 8)
            .await
            .unwrap();
        let mut second = broker
            .subscribe_named(&Exchange::EVENTS, &key, &subscription, 8)
            .await
            .unwrap();
        let sent = event(1);
        broker
            .publish_to(&Exchange::EVENTS, &key, &sent)
            .await
            .unwrap();
        let got = tokio::select! {
            got = first.recv() => got,
            got = second.recv() => got,
        }
        .expect("subscription ended");
        assert_eq!(body(&got), sent.body, "{url}");
        got.settle.ack().await.unwrap();
        let quiet = std::time::Duration::from_millis(300);
        let again = tokio::time::timeout(quiet, async {
            tokio::select! {
                got = first.recv() => got,
                got = second.recv() => got,
            }
        })
        .await;
        match BrokerKind::of(&url).unwrap() {
            BrokerKind::Amqp => assert!(again.is_err(), "{url}: delivered twice"),
            BrokerKind::Redis => {
                let other = again.expect("Redis: every subscriber hears it").unwrap();
                assert_eq!(body(&other), sent.body);
            }
        }
        drop((first, second));
        broker.close().await.unwrap();
        // Nobody listens now.
        let publisher = broker::connect(&url).await.unwrap();
        let away: Vec<_> = (2..5).map(event).collect();
        for message in &away {
            publisher
                .publish_to(&Exchange::EVENTS, &key, message)
                .await
                .unwrap();
        }
        let broker = broker::connect(&url).await.unwrap();
        let mut back = broker
            .subscribe_named(&Exchange::EVENTS, &key, &subscription, 8)
            .await
            .unwrap();
        if BrokerKind::of(&url).unwrap() == BrokerKind::Amqp {
            for message in &away {
                let delivery = within(10, "an event sent while away", back.recv())
                    .await
                    .expect("subscription ended");
                assert_eq!(body(&delivery), message.body);
                delivery.settle.ack().await.unwrap();
            }
        }
        let later = event(5);
        publisher
            .publish_to(&Exchange::EVENTS, &key, &later)
            .await
            .unwrap();
        let delivery = within(10, "an event sent after", back.recv())
            .await
            .expect("subscription ended");
        assert_eq!(body(&delivery), later.body, "{url}");
        delivery.settle.ack().await.unwrap();
        drop(back);
        if BrokerKind::of(&url).unwrap() == BrokerKind::Amqp {
            broker.delete_queue(&subscription.queue).await.unwrap();
        }
        publisher.close().await.unwrap();
        broker.close().await.unwrap();
    }
}

#[tokio::test]
async fn redis_restores_what_a_dead_consumer_left_unacked() {
    use runtime::config::TransportOptions;
    let url = common::isolated_redis_url();
    let queue = unique_queue("restore");
    let options = TransportOptions {
        visibility_timeout: 1,
        ..Default::default()
    };
    let crashed = broker::connect_with(&url, &options, None).await.unwrap();
    let sent = request(6);
    crashed.publish(&queue, &sent.encode()).await.unwrap();
    let mut deliveries = crashed
        .consume(std::slice::from_ref(&queue), 1)
        .await
        .unwrap();
    let taken = next(&mut deliveries).await;
    // The consumer dies holding it: never settled, its loops stopped.
    std::mem::forget(taken.settle);
    crashed.close().await.unwrap();
    drop(deliveries);

    let survivor = broker::connect_with(&url, &options, None).await.unwrap();
    let mut deliveries = survivor
        .consume(std::slice::from_ref(&queue), 1)
        .await
        .unwrap();
    let again = within(15, "the restored message", deliveries.recv())
        .await
        .expect("consumer stopped");
    assert_eq!(
        TaskRequest::decode(&again.message.unwrap()).unwrap().id,
        sent.id
    );
    again.settle.ack().await.unwrap();
    survivor.delete_queue(&queue).await.unwrap();
    survivor.close().await.unwrap();
}

/// Whether no delivery comes for a while.
async fn quiet(deliveries: &mut tokio::sync::mpsc::Receiver<Delivery>) -> bool {
    tokio::time::timeout(std::time::Duration::from_millis(700), deliveries.recv())
        .await
        .is_err()
}

#[tokio::test]
async fn a_held_message_widens_the_window_up_to_its_bound() {
    for url in broker_urls() {
        let queue = unique_queue("widen");
        let broker = broker::connect(&url).await.unwrap();
        for n in 0..4 {
            broker.publish(&queue, &request(n).encode()).await.unwrap();
        }
        let mut deliveries = broker
            .consume(std::slice::from_ref(&queue), 1)
            .await
            .unwrap();
        let mut first = next(&mut deliveries).await;
        assert!(
            quiet(&mut deliveries).await,
            "{url}: a window of one took two"
        );
        // Held, within a bound of two: one more comes.
        first.settle.hold(2).await;
        let mut second = next(&mut deliveries).await;
        // Held too, but the window is at its bound: no third.
        second.settle.hold(2).await;
        assert!(
            quiet(&mut deliveries).await,
            "{url}: the window grew past its bound"
        );
        // Due again and settled: the window is one message again, and the third comes.
        first.settle.unhold().await;
        first.settle.ack().await.unwrap();
        second.settle.ack().await.unwrap();
        let third = next(&mut deliveries).await;
        assert!(
            quiet(&mut deliveries).await,
            "{url}: the window stayed wide"
        );
        third.settle.ack().await.unwrap();
        drop(deliveries);
        broker.delete_queue(&queue).await.unwrap();
        broker.close().await.unwrap();
    }
}

/// A message a live consumer holds unsettled (running with `task_acks_late`, or held for its
/// ETA) is never restored, however long past the visibility timeout, by another consumer of
/// the database; once its consumer is gone (renewal stopped, nothing settled) it is, marked
/// redelivered. A message settled meanwhile stays settled: renewal does not bring its record back.
#[tokio::test]
async fn redis_restores_what_a_consumer_holds_only_once_it_is_gone() {
    use runtime::config::TransportOptions;
    let url = common::isolated_redis_url();
    let queue = unique_queue("lease");
    let visibility_timeout = 2;
    let options = TransportOptions {
        visibility_timeout,
        ..Default::default()
    };
    let holder = broker::connect_with(&url, &options, None).await.unwrap();
    let (running, held, settled) = (request(7), request(8), request(9));
    for sent in [&running, &held, &settled] {
        holder.publish(&queue, &sent.encode()).await.unwrap();
    }
    let mut deliveries = holder
        .consume(std::slice::from_ref(&queue), 3)
        .await
        .unwrap();
    let id = |delivery: &Delivery| {
        TaskRequest::decode(delivery.message.as_ref().unwrap())
            .unwrap()
            .id
    };
    let first = next(&mut deliveries).await;
    let mut second = next(&mut deliveries).await;
    let third = next(&mut deliveries).await;
    assert_eq!(
        [id(&first), id(&second), id(&third)],
        [running.id.clone(), held.id.clone(), settled.id.clone()]
    );
    second.settle.hold(u16::MAX).await;
    third.settle.ack().await.unwrap();

    // Another consumer of the queue, whose restorer looks every second.
    let other = broker::connect_with(&url, &options, None).await.unwrap();
    let mut elsewhere = other
        .consume(std::slice::from_ref(&queue), 3)
        .await
        .unwrap();
    let mut redis = raw_redis(&url).await;
    let quiet_for = std::time::Duration::from_secs(3 * visibility_timeout);
    let restored = tokio::time::timeout(quiet_for, elsewhere.recv()).await;
    assert!(
        restored.is_err(),
        "a message its live consumer holds was restored"
    );
    assert!(!is_unacked(&mut redis, &third.tag).await);
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg("unacked_index")
        .arg(&third.tag)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(score, None, "renewal brought a settled record back");

    // The holder dies: nothing settled, and its renewal stops with it.
    std::mem::forget(first.settle);
    std::mem::forget(second.settle);
    holder.close().await.unwrap();
    drop(deliveries);
    let mut back = Vec::new();
    for _ in 0..2 {
        let again = within(15, "a restored message", elsewhere.recv())
            .await
            .expect("consumer stopped");
        assert!(again.redelivered);
        back.push(id(&again));
        again.settle.ack().await.unwrap();
    }
    back.sort();
    let mut expected = vec![running.id, held.id];
    expected.sort();
    assert_eq!(back, expected);
    drop(elsewhere);
    other.delete_queue(&queue).await.unwrap();
    other.close().await.unwrap();
}

/// A message held while its consumer's connection is cut (`CLIENT KILL`) stays leased and is
/// acked afterwards: the worker finishing a task after its connection broke does not leave it to
/// be restored and run again. Database 9 is this test's alone: every client of it is cut.
#[tokio::test]
async fn redis_keeps_and_acks_a_message_held_across_a_lost_connection() {
    use runtime::config::TransportOptions;
    let url =
        std::env::var("TEST_CUT_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/9".into());
    let queue = unique_queue("cut");
    let visibility_timeout = 2;
    let options = TransportOptions {
        visibility_timeout,
        ..Default::default()
    };
    let holder = broker::connect_with(&url, &options, None).await.unwrap();
    holder.publish(&queue, &request(5).encode()).await.unwrap();
    let mut deliveries = holder
        .consume(std::slice::from_ref(&queue), 1)
        .await
        .unwrap();
    let running = next(&mut deliveries).await;

    let db: i64 = url.rsplit('/').next().unwrap().parse().unwrap();
    let cut = cut_clients_of(db).await;
    assert!(cut >= 2, "cut {cut} connections");

    let other = broker::connect_with(&url, &options, None).await.unwrap();
    let mut elsewhere = other
        .consume(std::slice::from_ref(&queue), 1)
        .await
        .unwrap();
    let quiet_for = std::time::Duration::from_secs(3 * visibility_timeout);
    let restored = tokio::time::timeout(quiet_for, elsewhere.recv()).await;
    assert!(
        restored.is_err(),
        "a message held across the cut was restored"
    );
    running.settle.ack().await.unwrap();
    let mut redis = raw_redis(&url).await;
    assert!(!is_unacked(&mut redis, &running.tag).await);
    // Its window free again, the consumer finds its connection gone (the worker reconnects).
    let ended = within(10, "the consumer to stop", deliveries.recv()).await;
    assert!(ended.is_none());
    drop(elsewhere);
    other.delete_queue(&queue).await.unwrap();
    other.close().await.unwrap();
    holder.close().await.unwrap();
}

/// `CLIENT KILL` of every connection whose current database is `db`; returns how many.
async fn cut_clients_of(db: i64) -> usize {
    let mut killer = raw_redis(&common::redis_url()).await;
    let me: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut killer)
        .await
        .unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut killer)
        .await
        .unwrap();
    let mut cut = 0;
    for line in list.lines() {
        let field = |name: &str| {
            line.split(' ')
                .find_map(|pair| pair.strip_prefix(name))
                .and_then(|value| value.parse::<i64>().ok())
        };
        if field("db=") == Some(db) && field("id=") != Some(me) {
            let id = field("id=").unwrap();
            cut += redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query_async::<usize>(&mut killer)
                .await
                .unwrap();
        }
    }
    cut
}

#[tokio::test]
async fn deliveries_end_when_the_connection_does() {
    for url in broker_urls() {
        let queue = unique_queue("lost");
        let broker = broker::connect(&url).await.unwrap();
        let mut deliveries = broker
            .consume(std::slice::from_ref(&queue), 1)
            .await
            .unwrap();
        let cleanup = broker::connect(&url).await.unwrap();
        broker.close().await.unwrap();
        // The worker reads this end of the channel as "connection lost" and reconnects.
        let ended = within(10, "the end of the deliveries", deliveries.recv()).await;
        assert!(ended.is_none(), "{url}");
        cleanup.delete_queue(&queue).await.unwrap();
        cleanup.close().await.unwrap();
    }
}

/// A Redis consumer takes a message and records it as unacked in one step (no instant when a
/// crash could lose it); the record holds the envelope exactly as published. An envelope Rust
/// cannot decode is recorded too, and settling it drops the record.
#[tokio::test]
async fn redis_records_what_it_takes_in_the_same_step() {
    let url = common::redis_url();
    let queue = unique_queue("record");
    let broker = broker::connect(&url).await.unwrap();
    let mut redis = raw_redis(&url).await;
    let sent = request(7);
    broker.publish(&queue, &sent.encode()).await.unwrap();
    let published: String = redis::cmd("LINDEX")
        .arg(&queue)
        .arg(0)
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut deliveries = broker
        .consume(std::slice::from_ref(&queue), 2)
        .await
        .unwrap();
    let taken = next(&mut deliveries).await;
    let entry: String = redis::cmd("HGET")
        .arg("unacked")
        .arg(&taken.tag)
        .query_async(&mut redis)
        .await
        .unwrap();
    let entry: serde_json::Value = serde_json::from_str(&entry).unwrap();
    let published: serde_json::Value = serde_json::from_str(&published).unwrap();
    assert_eq!(entry, serde_json::json!([published, "", queue]));
    taken.settle.ack().await.unwrap();

    let tag = push_undecodable(&mut redis, &queue).await;
    let taken = next(&mut deliveries).await;
    assert!(taken.message.is_err());
    assert_eq!(taken.tag, tag);
    assert!(
        is_unacked(&mut redis, &tag).await,
        "the undecodable envelope was recorded as taken"
    );
    taken.settle.reject(false).await.unwrap();
    assert!(
        !is_unacked(&mut redis, &tag).await,
        "settling dropped the record"
    );
    broker.delete_queue(&queue).await.unwrap();
    broker.close().await.unwrap();
}

/// A plain connection to the Redis broker, to look at kombu's records.
async fn raw_redis(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Pushes onto `queue` an envelope whose body cannot be decoded; returns its delivery tag.
async fn push_undecodable(redis: &mut redis::aio::MultiplexedConnection, queue: &str) -> String {
    let tag = format!("undecodable-{}", uuid::Uuid::new_v4());
    let bad = json!({
        "body": "*** not base64 ***",
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": {},
        "properties": {"body_encoding": "base64", "delivery_tag": tag,
                       "delivery_info": {"exchange": "", "routing_key": queue}},
    });
    redis::cmd("LPUSH")
        .arg(queue)
        .arg(bad.to_string())
        .query_async::<()>(redis)
        .await
        .unwrap();
    tag
}

/// Whether kombu's `unacked` hash holds a record for `tag`.
async fn is_unacked(redis: &mut redis::aio::MultiplexedConnection, tag: &str) -> bool {
    redis::cmd("HEXISTS")
        .arg("unacked")
        .arg(tag)
        .query_async(redis)
        .await
        .unwrap()
}

/// One Redis fetch fills every free prefetch slot at once, oldest messages first, and records
/// each as taken; an envelope it cannot read among them is handed over as an error, in its
/// place, and recorded too.
#[tokio::test]
async fn redis_takes_what_prefetch_allows_in_one_step_in_queue_order() {
    let url = common::redis_url();
    let queue = unique_queue("take-many");
    let broker = broker::connect(&url).await.unwrap();
    let mut redis = raw_redis(&url).await;
    let sent: Vec<TaskRequest> = (0..7).map(request).collect();
    for message in &sent[..3] {
        broker.publish(&queue, &message.encode()).await.unwrap();
    }
    let bad_tag = push_undecodable(&mut redis, &queue).await;
    for message in &sent[3..] {
        broker.publish(&queue, &message.encode()).await.unwrap();
    }
    let mut deliveries = broker
        .consume(std::slice::from_ref(&queue), 5)
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(next(&mut deliveries).await);
    }
    let left: usize = redis::cmd("LLEN")
        .arg(&queue)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(left, 3, "five taken, no more");
    let ids: Vec<Option<String>> = held
        .iter()
        .map(|d| {
            d.message
                .as_ref()
                .ok()
                .map(|m| TaskRequest::decode(m).unwrap().id)
        })
        .collect();
    let expected: Vec<Option<String>> = [0, 1, 2]
        .iter()
        .map(|&n| Some(sent[n].id.clone()))
        .chain([None, Some(sent[3].id.clone())])
        .collect();
    assert_eq!(
        ids, expected,
        "oldest first, the unreadable one in its place"
    );
    assert_eq!(held[3].tag, bad_tag);
    for delivery in &held {
        assert!(
            is_unacked(&mut redis, &delivery.tag).await,
            "{}",
            delivery.tag
        );
    }
    for delivery in held {
        delivery.settle.ack().await.unwrap();
    }
    let mut rest = Vec::new();
    for _ in 0..3 {
        let delivery = next(&mut deliveries).await;
        rest.push(TaskRequest::decode(&delivery.message.unwrap()).unwrap().id);
        delivery.settle.ack().await.unwrap();
    }
    assert_eq!(
        rest,
        sent[4..].iter().map(|m| m.id.clone()).collect::<Vec<_>>()
    );
    broker.delete_queue(&queue).await.unwrap();
    broker.close().await.unwrap();
}

/// `depth` tells what is waiting and what is held; each broker says what it cannot know.
#[tokio::test]
async fn depth_tells_ready_and_held_messages() {
    for url in broker_urls() {
        let on_redis = url.starts_with("redis");
        let queue = unique_queue("depth");
        let broker = broker::connect(&url).await.unwrap();
        // AMQP knows a queue never declared is not there; Redis cannot tell it from an empty one.
        let missing = broker.depth(&queue).await.unwrap();
        let empty = QueueDepth {
            ready: 0,
            unacked: Some(0),
            consumers: None,
        };
        assert_eq!(missing, on_redis.then_some(empty), "{url}");
        for n in 0..3 {
            broker.publish(&queue, &request(n).encode()).await.unwrap();
        }
        assert_eq!(
            broker.depth(&queue).await.unwrap().unwrap().ready,
            3,
            "{url}"
        );
        let mut deliveries = broker
            .consume(std::slice::from_ref(&queue), 2)
            .await
            .unwrap();
        let held = [next(&mut deliveries).await, next(&mut deliveries).await];
        // The broker's count of ready messages follows its deliveries a moment later.
        let depth = within(10, "one message left ready", async {
            loop {
                let depth = broker.depth(&queue).await.unwrap().unwrap();
                if depth.ready == 1 {
                    break depth;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        let (unacked, consumers) = if on_redis {
            (Some(2), None)
        } else {
            (None, Some(1))
        };
        assert_eq!(
            (depth.unacked, depth.consumers),
            (unacked, consumers),
            "{url}"
        );
        for delivery in held {
            delivery.settle.ack().await.unwrap();
        }
        broker.delete_queue(&queue).await.unwrap();
        broker.close().await.unwrap();
    }
}

/// A Redis subscriber's binding record (kombu's `_kombu.binding.<exchange>`) goes when it
/// closes, as kombu takes back an auto-delete queue's: the set does not grow with every worker
/// that ever ran.
#[tokio::test]
async fn redis_forgets_a_subscribers_binding_when_it_closes() {
    use runtime::broker::{Exchange, Subscription};
    let url = common::redis_url();
    let mut redis = raw_redis(&url).await;
    let broker = broker::connect(&url).await.unwrap();
    let subscription = Subscription {
        queue: unique_queue("pidbox"),
        expires_ms: 60_000,
        message_ttl_ms: 5_000,
    };
    let _received = broker
        .subscribe(&Exchange::CONTROL, "", &subscription)
        .await
        .unwrap();
    let key = format!("_kombu.binding.{}", Exchange::CONTROL.name);
    let listed = |members: Vec<String>| members.iter().any(|m| m.ends_with(&subscription.queue));
    let members: Vec<String> = redis::AsyncCommands::smembers(&mut redis, &key)
        .await
        .unwrap();
    assert!(listed(members), "bound while subscribed");
    broker.close().await.unwrap();
    let members: Vec<String> = redis::AsyncCommands::smembers(&mut redis, &key)
        .await
        .unwrap();
    assert!(!listed(members), "still bound after close");
}

/// A control request must not overtake the task messages sent before it: its mark is caught up
/// only once each of them is taken in (its delivery's arrival dropped). On Redis the request
/// comes by pub/sub while the task waits in its list, so the mark also waits for a fetch.
#[tokio::test]
async fn a_broadcast_waits_for_the_task_deliveries_sent_before_it() {
    use runtime::broker::{Exchange, Subscription};
    for url in broker_urls() {
        let queue = unique_queue("arrival");
        let broker = broker::connect(&url).await.unwrap();
        let mut deliveries = broker
            .consume(std::slice::from_ref(&queue), 4)
            .await
            .unwrap();
        let subscription = Subscription {
            queue: unique_queue("pidbox"),
            expires_ms: 60_000,
            message_ttl_ms: 5_000,
        };
        let mut broadcasts = broker
            .subscribe(&Exchange::CONTROL, "", &subscription)
            .await
            .unwrap();
        broker.publish(&queue, &request(7).encode()).await.unwrap();
        let mut control = request(8).encode();
        control.properties.delivery_mode = 1;
        broker
            .publish_to(&Exchange::CONTROL, "", &control)
            .await
            .unwrap();
        // Other runs may broadcast on the same server: wait for ours.
        let mark = loop {
            let broadcast = within(10, "the broadcast", broadcasts.recv())
                .await
                .expect("subscription ended");
            if broadcast.message.body == control.body {
                break broadcast.arrived;
            }
        };
        let early = tokio::time::timeout(std::time::Duration::from_millis(200), mark.caught_up());
        assert!(
            early.await.is_err(),
            "{url}: caught up while the task is not taken in"
        );
        let Delivery {
            settle, arrival, ..
        } = next(&mut deliveries).await;
        drop(arrival);
        within(10, "catching up", mark.caught_up()).await;
        settle.ack().await.unwrap();
        broker.delete_queue(&queue).await.unwrap();
        broker.close().await.unwrap();
    }
}

/// RabbitMQ gets its acks coalesced (one `multiple` ack for a run of them): acking every other
/// delivery, all at once and newest first, must never settle one still undecided among them.
#[tokio::test]
async fn acking_the_others_leaves_undecided_deliveries_unsettled() {
    for url in broker_urls()
        .into_iter()
        .filter(|url| url.starts_with("amqp"))
    {
        let queue = unique_queue("coalesced");
        let broker = broker::connect(&url).await.unwrap();
        let sent: Vec<TaskRequest> = (0..40).map(request).collect();
        for request in &sent {
            broker.publish(&queue, &request.encode()).await.unwrap();
        }
        let mut deliveries = broker
            .consume(std::slice::from_ref(&queue), 40)
            .await
            .unwrap();
        let mut taken = Vec::new();
        for _ in 0..sent.len() {
            taken.push(next(&mut deliveries).await);
        }
        let undecided = [2, 19];
        let mut kept = Vec::new();
        let mut settling = tokio::task::JoinSet::new();
        for (n, delivery) in taken.into_iter().enumerate().rev() {
            if undecided.contains(&n) {
                kept.push(delivery);
            } else if n == 9 {
                settling.spawn(delivery.settle.reject(false));
            } else {
                settling.spawn(delivery.settle.ack());
            }
        }
        while let Some(settled) = settling.join_next().await {
            settled.unwrap().unwrap();
        }
        // The connection goes with two deliveries unsettled: they, and only they, go back.
        broker.close().await.unwrap();
        drop((kept, deliveries));

        let again = broker::connect(&url).await.unwrap();
        let mut deliveries = again
            .consume(std::slice::from_ref(&queue), 40)
            .await
            .unwrap();
        let mut back = Vec::new();
        for _ in 0..undecided.len() {
            let delivery = next(&mut deliveries).await;
            back.push(
                TaskRequest::decode(delivery.message.as_ref().unwrap())
                    .unwrap()
                    .id,
            );
            delivery.settle.ack().await.unwrap();
        }
        back.sort();
        let mut expected: Vec<_> = undecided.iter().map(|&n| sent[n].id.clone()).collect();
        expected.sort();
        assert_eq!(back, expected, "{url}");
        assert!(quiet(&mut deliveries).await, "{url}: more came back");
        again.delete_queue(&queue).await.unwrap();
        again.close().await.unwrap();
    }
}
