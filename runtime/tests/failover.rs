//! A failover `broker_url` on real brokers: a connect passes over the nodes that refuse it and
//! keeps the first that answers; when none does, the error names each (without its password).

mod common;

use common::{broker_urls, unique_queue, within};
use runtime::broker;
use runtime::protocol::TaskRequest;
use serde_json::Map;

/// A loopback port nothing listens on, so a connect to it is refused at once.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A URL of `url`'s scheme, with a password, on a port that refuses connections.
fn dead_like(url: &str) -> String {
    let scheme = url.split_once("://").unwrap().0;
    format!("{scheme}://guest:s3cret@127.0.0.1:{}/", closed_port())
}

#[tokio::test]
async fn a_connect_passes_over_dead_nodes_to_one_that_answers() {
    for url in broker_urls() {
        let list = format!("{};{};{url}", dead_like(&url), dead_like(&url));
        let broker = within(30, "a connect over the list", broker::connect(&list))
            .await
            .unwrap_or_else(|e| panic!("{list}: {e}"));
        let queue = unique_queue("failover");
        let message = TaskRequest::new("tasks.echo", vec![], Map::new()).encode();
        broker.publish(&queue, &message).await.unwrap();
        let depth = broker
            .depth(&queue)
            .await
            .unwrap()
            .expect("the queue exists");
        assert_eq!(depth.ready, 1, "{url}");
        broker.delete_queue(&queue).await.unwrap();
    }
}

#[tokio::test]
async fn when_no_node_answers_the_error_names_each_without_its_password() {
    for url in broker_urls() {
        let (first, second) = (dead_like(&url), dead_like(&url));
        let error = match broker::connect(&format!("{first};{second}")).await {
            Ok(_) => panic!("a list of dead nodes connected"),
            Err(error) => error.to_string(),
        };
        assert!(
            error.starts_with("no broker of the failover list answered"),
            "{error}"
        );
        for dead in [first, second] {
            let port = dead.rsplit_once(':').unwrap().1.trim_end_matches('/');
            assert!(error.contains(&format!(":{port}")), "{error}");
        }
        assert!(!error.contains("s3cret"), "{error}");
    }
}
