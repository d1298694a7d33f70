//! The client's pipelined sends against the real brokers: every task is in its queue once a
//! flush returns, and a task the broker refuses is told on its handle and by the flush.

mod common;

use common::{broker_urls, unique_queue, within};
use runtime::broker;
use runtime::client::{Client, SendOptions, Sent, MAX_UNCONFIRMED};
use runtime::error::Error;
use runtime::CeleryConfig;
use serde_json::{json, Map};

async fn client(url: &str) -> Client {
    let config = CeleryConfig {
        broker_url: url.to_string(),
        ..CeleryConfig::default()
    };
    Client::connect(config).await.unwrap()
}

async fn send(client: &Client, queue: &str, n: usize) -> runtime::Result<Sent> {
    let options = SendOptions {
        queue: Some(queue.to_string()),
        ignore_result: true,
        ..SendOptions::default()
    };
    client
        .send_task_pipelined("tasks.add", vec![json!(n), json!(1)], Map::new(), options)
        .await
}

/// More sends than may be unconfirmed at once, one after the other: the flush returns once the
/// broker has every one, and each handle says so.
#[tokio::test]
async fn every_task_sent_is_in_its_queue_once_a_flush_returns() {
    let count = MAX_UNCONFIRMED as usize * 2;
    for url in broker_urls() {
        let queue = unique_queue("client-pipelined");
        let client = client(&url).await;
        let mut handles = Vec::new();
        for n in 0..count {
            handles.push(send(&client, &queue, n).await.unwrap());
        }
        within(60, "the flush", client.flush()).await.unwrap();
        let depth = client.depth(&queue).await.unwrap().unwrap();
        assert_eq!(depth.ready, count as u64, "{url}");
        for sent in handles {
            sent.confirmed.await.unwrap();
        }
        client.close().await.unwrap();
        let broker = broker::connect(&url).await.unwrap();
        broker.delete_queue(&queue).await.unwrap();
        broker.close().await.unwrap();
    }
}

/// RabbitMQ nacks the tasks a full queue rejects: each refused task is told on its handle and
/// by the next flush (once), what no flush reported by `close`, and sends go on after it.
#[tokio::test]
async fn a_task_the_broker_refuses_is_told_on_its_handle_and_by_the_flush() {
    let url = common::amqp_url();
    let queue = unique_queue("client-full");
    let declarer = common::declare_full_after_one(&url, &queue).await;
    let client = client(&url).await;
    let taken = send(&client, &queue, 1).await.unwrap();
    let refused = [
        send(&client, &queue, 2).await.unwrap(),
        send(&client, &queue, 3).await.unwrap(),
    ];
    let mut refused_ids: Vec<String> = refused.iter().map(|s| s.result.id.clone()).collect();
    match within(10, "the flush", client.flush()).await {
        Err(Error::Unconfirmed(reported)) => {
            let mut reported: Vec<String> = reported.into_iter().map(|r| r.task_id).collect();
            reported.sort();
            refused_ids.sort();
            assert_eq!(reported, refused_ids);
        }
        other => panic!("the flush answered {other:?}"),
    }
    taken.confirmed.await.unwrap();
    for sent in refused {
        let id = sent.result.id;
        let told = sent.confirmed.await;
        assert!(
            matches!(&told, Err(Error::NotConfirmed(n)) if *n == id),
            "{told:?}"
        );
    }
    client.flush().await.unwrap();

    let unflushed = send(&client, &queue, 4).await.unwrap();
    let closed = within(10, "the close", client.close()).await;
    assert!(
        matches!(&closed, Err(Error::Unconfirmed(r)) if r[0].task_id == unflushed.result.id),
        "{closed:?}"
    );

    let broker = broker::connect(&url).await.unwrap();
    broker.delete_queue(&queue).await.unwrap();
    broker.close().await.unwrap();
    let _ = declarer.close(200, "done").await;
}
