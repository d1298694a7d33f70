//! Shared by the web app's integration tests: a database of its own, a queue of its own, our
//! worker on it when asked, and the app, against the local PostgreSQL, broker and Redis.

#![allow(dead_code)]

use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use rocket::http::{ContentType, Status};
use rocket::local::asynchronous::Client;
use runtime::worker::Worker;
use runtime::CeleryConfig;
use serde_json::Value;
use tokio::sync::oneshot;

pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";
pub const BROKERS: [&str; 2] = [
    "amqp://guest:guest@127.0.0.1:5672//",
    "redis://127.0.0.1:6379/0",
];

/// A database, a queue, a worker on it, and the app.
pub struct Stack {
    pub client: Client,
    pub config: CeleryConfig,
    pub database: String,
    stop_worker: Option<oneshot::Sender<()>>,
    worker: Option<tokio::task::JoinHandle<runtime::Result<()>>>,
}

/// Rows `query` returns in the stack's database.
pub async fn count(stack: &Stack, query: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut connection = AsyncPgConnection::establish(&stack.config.database_url)
        .await
        .unwrap();
    diesel::sql_query(format!("SELECT count(*) AS n FROM ({query}) AS rows"))
        .get_result::<Count>(&mut connection)
        .await
        .unwrap()
        .n
}

pub async fn admin(sql: &str) {
    let mut connection = AsyncPgConnection::establish(&format!("{POSTGRES}/postgres"))
        .await
        .unwrap();
    diesel::sql_query(sql)
        .execute(&mut connection)
        .await
        .unwrap();
}

impl Stack {
    pub async fn start(broker_url: &str, with_worker: bool) -> Self {
        Self::start_with(broker_url, with_worker, |_| {}).await
    }

    /// A stack whose settings `customize` adjusts.
    pub async fn start_with(
        broker_url: &str,
        with_worker: bool,
        customize: impl FnOnce(&mut CeleryConfig),
    ) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let database = format!("rcelery_test_{suffix}");
        admin(&format!("CREATE DATABASE {database}")).await;
        let mut config = CeleryConfig {
            broker_url: broker_url.into(),
            result_backend: Some("redis://127.0.0.1:6379/0".into()),
            task_default_queue: format!("test-web-{suffix}"),
            task_track_started: true,
            result_extended: true,
            result_expires: 600,
            worker_concurrency: 4,
            database_url: format!("{POSTGRES}/{database}"),
            web_body_limit: 4096,
            web_sweep_interval: 1,
            web_allowed_tasks: ["tasks.add", "tasks.mul", "tasks.fail", "tasks.progress"]
                .map(String::from)
                .into(),
            ..CeleryConfig::default()
        };
        customize(&mut config);
        let (stop_worker, worker) = if with_worker {
            let queues = vec![config.task_default_queue.clone()];
            let worker = Worker::new(
                config.clone(),
                tasks::registry(),
                format!("web-test-{suffix}@host"),
                queues,
            )
            .await
            .unwrap();
            let (stop, stopped) = oneshot::channel::<()>();
            let handle = tokio::spawn(worker.run(async {
                let _ = stopped.await;
            }));
            (Some(stop), Some(handle))
        } else {
            (None, None)
        };
        let client = Client::tracked(web::build(config.clone()).await.unwrap())
            .await
            .unwrap();
        Self {
            client,
            config,
            database,
            stop_worker,
            worker,
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop_worker.take() {
            let _ = stop.send(());
            self.worker.take().unwrap().await.unwrap().unwrap();
        }
        // A test may run against a broker that is down on purpose: nothing to clean there.
        if let Ok(broker) = runtime::broker::connect(&self.config.broker_url).await {
            broker
                .delete_queue(&self.config.task_default_queue)
                .await
                .unwrap();
            broker.close().await.unwrap();
        }
        drop(self.client);
        admin(&format!("DROP DATABASE {} WITH (FORCE)", self.database)).await;
    }

    pub async fn post(&self, body: &str) -> (Status, Value) {
        let response = self
            .client
            .post("/receive")
            .header(ContentType::JSON)
            .body(body)
            .dispatch()
            .await;
        let status = response.status();
        (status, response.into_json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, uri: &str) -> (Status, Value) {
        let response = self.client.get(uri.to_string()).dispatch().await;
        let status = response.status();
        (status, response.into_json().await.unwrap_or(Value::Null))
    }

    /// Polls `/status/<id>` until `done` holds for it (at most 20 s).
    pub async fn wait_for(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = self.get(&format!("/status/{id}")).await;
            assert_eq!(status, Status::Ok, "{body}");
            if done(&body) {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn submit(&self, body: Value) -> String {
        let (status, answer) = self.post(&body.to_string()).await;
        assert_eq!(status, Status::Accepted, "{answer}");
        answer["task_id"].as_str().unwrap().to_string()
    }
}
