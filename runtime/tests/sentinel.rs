//! Redis Sentinel against real servers: a master, a replica and three sentinels, started here
//! from the installed `redis-server` on free loopback ports and stopped at the end. The broker
//! and the result backend find the master through the sentinels and, after `SENTINEL FAILOVER`,
//! move to the new one while the old master is still up and still a master.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use common::{unique_queue, within};
use runtime::backend::{result_key, RedisBackend};
use runtime::broker;
use runtime::protocol::result::{state, ResultMeta};
use runtime::protocol::TaskRequest;
use runtime::CeleryConfig;
use serde_json::{json, Map};

const MASTER_NAME: &str = "rcelery-test";

/// The group's processes, killed when the test ends however it ends.
struct Group {
    children: Vec<Child>,
    replica: u16,
    sentinels: Vec<u16>,
    _directory: tempfile::TempDir,
}

impl Drop for Group {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis_server(args: &[String]) -> Child {
    Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed (make services installs it)")
}

async fn connection(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

impl Group {
    async fn start() -> Self {
        let directory = tempfile::tempdir().unwrap();
        let (master, replica) = (free_port(), free_port());
        let server = |port: u16, extra: &[String]| {
            let mut args: Vec<String> = ["--port", &port.to_string(), "--bind", "127.0.0.1"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let data = directory.path().join(port.to_string());
            std::fs::create_dir(&data).unwrap();
            args.extend(["--save".into(), String::new(), "--dir".into()]);
            args.push(data.display().to_string());
            args.extend_from_slice(extra);
            redis_server(&args)
        };
        let mut children = vec![
            server(master, &[]),
            server(
                replica,
                &["--replicaof".into(), "127.0.0.1".into(), master.to_string()],
            ),
        ];
        let sentinels: Vec<u16> = (0..3).map(|_| free_port()).collect();
        for port in &sentinels {
            let conf = directory.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\nsentinel failover-timeout {MASTER_NAME} 3000\n",
                    directory.path().display()
                ),
            )
            .unwrap();
            children.push(redis_server(&[
                conf.display().to_string(),
                "--sentinel".into(),
            ]));
        }
        let group = Self {
            children,
            replica,
            sentinels,
            _directory: directory,
        };
        within(
            30,
            "the sentinels to know the replica and each other",
            async {
                while !group.ready().await {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        )
        .await;
        group
    }

    /// Whether the replica is in step and every sentinel knows it and the other sentinels, so
    /// that a failover can happen.
    async fn ready(&self) -> bool {
        let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{}", self.replica)) else {
            return false;
        };
        let Ok(mut replica) = client.get_multiplexed_async_connection().await else {
            return false;
        };
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut replica)
            .await
            .unwrap_or_default();
        if !info.contains("master_link_status:up") {
            return false;
        }
        for &port in &self.sentinels {
            let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
                return false;
            };
            let Ok(mut sentinel) = client.get_multiplexed_async_connection().await else {
                return false;
            };
            let state: redis::RedisResult<std::collections::HashMap<String, String>> =
                redis::cmd("SENTINEL")
                    .arg("MASTER")
                    .arg(MASTER_NAME)
                    .query_async(&mut sentinel)
                    .await;
            let Ok(state) = state else { return false };
            let count = |key: &str| state.get(key).and_then(|v| v.parse::<usize>().ok());
            if count("num-slaves") < Some(1) || count("num-other-sentinels") < Some(2) {
                return false;
            }
        }
        true
    }

    /// The master's port as the first sentinel names it.
    async fn master(&self) -> u16 {
        let (_, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(MASTER_NAME)
            .query_async(&mut connection(self.sentinels[0]).await)
            .await
            .unwrap();
        port
    }

    fn urls(&self, db: u8) -> String {
        self.sentinels
            .iter()
            .map(|port| format!("sentinel://127.0.0.1:{port}/{db}"))
            .collect::<Vec<_>>()
            .join(";")
    }
}

#[tokio::test]
async fn the_broker_and_the_backend_follow_a_sentinel_failover() {
    let group = Group::start().await;
    let options = format!(r#"{{"master_name": "{MASTER_NAME}"}}"#);
    let config = CeleryConfig::from_sources(
        "",
        [
            ("CELERY_BROKER_URL".to_string(), group.urls(0)),
            ("CELERY_RESULT_BACKEND".to_string(), group.urls(1)),
            (
                "CELERY_BROKER_TRANSPORT_OPTIONS".to_string(),
                options.clone(),
            ),
            (
                "CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS".to_string(),
                options,
            ),
        ],
    )
    .unwrap();
    let connect =
        || broker::connect_with(&config.broker_url, &config.broker_transport_options, None);
    let old = group.master().await;
    let broker = connect().await.unwrap();
    let backend = RedisBackend::of(&config).await.unwrap().unwrap();
    let queue = unique_queue("sentinel");
    let request = TaskRequest::new("tasks.add", vec![json!(1), json!(2)], Map::new());
    broker.publish(&queue, &request.encode()).await.unwrap();
    let before = ResultMeta::new("before", state::SUCCESS, json!(1), Utc::now());
    assert!(backend.store(&before).await.unwrap());
    // Replication is asynchronous: what the test later finds on the new master must have
    // reached the replica before the failover is asked for.
    within(5, "the replica to have the message and the result", async {
        loop {
            let mut replica = connection(group.replica).await;
            let length: u64 = redis::cmd("LLEN")
                .arg(&queue)
                .query_async(&mut replica)
                .await
                .unwrap_or(0);
            redis::cmd("SELECT")
                .arg(1)
                .query_async::<()>(&mut replica)
                .await
                .unwrap();
            let stored: Option<String> = redis::cmd("GET")
                .arg(result_key("before"))
                .query_async(&mut replica)
                .await
                .unwrap_or(None);
            if length == 1 && stored.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    within(10, "a sentinel to accept the failover", async {
        loop {
            match redis::cmd("SENTINEL")
                .arg("FAILOVER")
                .arg(MASTER_NAME)
                .query_async::<()>(&mut connection(group.sentinels[0]).await)
                .await
            {
                Ok(()) => break,
                // The sentinels have not had the replica's INFO yet (slow under load): it is
                // no candidate until they have.
                Err(error) if error.code() == Some("NOGOODSLAVE") => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => panic!("SENTINEL FAILOVER: {error}"),
            }
        }
    })
    .await;
    // The old master stays up, and a master, for seconds: only the announcement tells.
    within(
        5,
        "the broker connection to give up the old master",
        async {
            while broker.check().await.is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    let new = group.master().await;
    assert_ne!(new, old);

    let broker = connect().await.unwrap();
    broker.publish(&queue, &request.encode()).await.unwrap();
    let after = ResultMeta::new("after", state::SUCCESS, json!(2), Utc::now());
    within(3, "a result stored on the new master", async {
        loop {
            if backend.store(&after).await.is_ok() {
                let mut master = connection(new).await;
                redis::cmd("SELECT")
                    .arg(1)
                    .query_async::<()>(&mut master)
                    .await
                    .unwrap();
                let stored: Option<String> = redis::cmd("GET")
                    .arg(result_key("after"))
                    .query_async(&mut master)
                    .await
                    .unwrap();
                if stored.is_some() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Both messages are on the new master's list: the first came with the replication.
    let length: u64 = redis::cmd("LLEN")
        .arg(&queue)
        .query_async(&mut connection(new).await)
        .await
        .unwrap();
    assert_eq!(length, 2);
    assert_eq!(backend.get("before").await.unwrap(), Some(before));
    broker.delete_queue(&queue).await.unwrap();
}
