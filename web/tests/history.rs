//! The monitor's task history against real PostgreSQL, RabbitMQ and Redis: events published on
//! `celeryev` become rows (whatever their order, however often), the catch-up reads ends from
//! the result backend, the retention forgets old rows in batches, and `GET /history` and
//! `GET /workers` answer from them. Each test has a database and an event queue of its own.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel_async::RunQueryDsl;
use rocket::http::Status;
use rocket::local::asynchronous::Client;
use runtime::backend::RedisBackend;
use runtime::broker::{self, Broker, Exchange};
use runtime::protocol::result::ResultMeta;
use runtime::protocol::{Message, Properties};
use runtime::CeleryConfig;
use serde_json::{json, Value};
use uuid::Uuid;
use web::db::Pool;
use web::monitor::{self, event, Since};
use web::store::{self, TaskRecord};

use common::{admin, BROKERS, POSTGRES};

const RESULTS: &str = "redis://127.0.0.1:6379/0";

/// A migrated database of its own, dropped by [`Database::drop`].
struct Database {
    name: String,
    url: String,
    pool: Pool,
}

impl Database {
    async fn create() -> Self {
        let name = format!("rcelery_history_{}", Uuid::new_v4().simple());
        admin(&format!("CREATE DATABASE {name}")).await;
        let url = format!("{POSTGRES}/{name}");
        web::db::migrate(&url).await.unwrap();
        let pool = web::db::pool(&url, 4).unwrap();
        Self { name, url, pool }
    }

    async fn row(&self, id: Uuid) -> Option<TaskRecord> {
        let listing = store::HistoryListing {
            limit: 500,
            ..Default::default()
        };
        let mut connection = self.pool.get().await.unwrap();
        let rows = store::history(&mut connection, &listing).await.unwrap();
        rows.into_iter().find(|row| row.task_id == id)
    }

    /// The web app over this database (no monitor), to ask its routes.
    async fn app(&self) -> Client {
        let config = CeleryConfig {
            database_url: self.url.clone(),
            result_backend: Some(RESULTS.into()),
            ..CeleryConfig::default()
        };
        Client::tracked(web::build(config).await.unwrap())
            .await
            .unwrap()
    }

    async fn drop(self) {
        drop(self.pool);
        admin(&format!("DROP DATABASE {} WITH (FORCE)", self.name)).await;
    }
}

/// The settings of a monitor on `broker_url` writing to `database`.
fn config(broker_url: &str, database: &Database) -> CeleryConfig {
    CeleryConfig {
        broker_url: broker_url.into(),
        result_backend: Some(RESULTS.into()),
        database_url: database.url.clone(),
        monitor: true,
        monitor_queue: format!("test-monitor-{}", Uuid::new_v4().simple()),
        // The app's monitor may declare its queue again after the test deleted it: then it
        // goes a minute after the test.
        monitor_queue_expires: 60,
        web_sweep_interval: 1,
        ..CeleryConfig::default()
    }
}

/// Publishes `event` on `celeryev` as a worker does.
async fn publish(broker: &dyn Broker, event: Value) {
    let routing_key = event["type"].as_str().unwrap().replace('-', ".");
    let message = Message {
        content_type: "application/json".into(),
        content_encoding: "utf-8".into(),
        headers: Default::default(),
        properties: Properties {
            delivery_mode: 1,
            ..Properties::default()
        },
        body: event.to_string().into_bytes(),
    };
    broker
        .publish_to(&Exchange::EVENTS, &routing_key, &message)
        .await
        .unwrap();
}

/// Polls `check` until it gives something (at most 20 s).
async fn until<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    check: impl Fn() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get(client: &Client, uri: &str) -> (Status, Value) {
    let response = client.get(uri.to_string()).dispatch().await;
    let status = response.status();
    (status, response.into_json().await.unwrap_or(Value::Null))
}

fn seconds_ago(seconds: f64) -> f64 {
    Utc::now().timestamp_micros() as f64 / 1e6 - seconds
}

/// Events of one task, in the worst order (the end first, a late `task-started`, one twice),
/// and heartbeats of two workers: the monitor of the web app records them all, and the routes
/// show them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_on_both_brokers_become_the_history_and_the_workers() {
    for url in BROKERS {
        let database = Database::create().await;
        let config = config(url, &database);
        let client = Client::tracked(web::build(config.clone()).await.unwrap())
            .await
            .unwrap();
        let broker = broker::connect(url).await.unwrap();
        let suffix = Uuid::new_v4().simple().to_string();
        let (worker, other) = (format!("w1-{suffix}@h"), format!("w2-{suffix}@h"));
        // Until the monitor has subscribed, events go nowhere: heartbeat until one is seen.
        until("the monitor to hear a heartbeat", || async {
            publish(
                &*broker,
                json!({"type": "worker-heartbeat", "hostname": worker, "timestamp": seconds_ago(0.0),
                       "freq": 2.0, "active": 1, "processed": 7, "sw_ident": "py-celery", "sw_ver": "5.4.0"}),
            )
            .await;
            let (_, body) = get(&client, "/workers").await;
            body["workers"]
                .as_array()
                .and_then(|w| w.iter().find(|w| w["hostname"] == json!(worker)).cloned())
        })
        .await;
        let id = Uuid::new_v4();
        let uuid = id.to_string();
        let t = seconds_ago(10.0);
        let events = [
            json!({"type": "task-succeeded", "uuid": uuid, "hostname": worker, "timestamp": t + 3.0,
                   "result": "5", "runtime": 0.5}),
            json!({"type": "task-sent", "uuid": uuid, "hostname": "client@h", "timestamp": t,
                   "name": "tasks.add", "args": "(2, 3)", "kwargs": "{'z': 'needle'}", "retries": 0,
                   "queue": "celery", "root_id": uuid, "parent_id": null}),
            json!({"type": "task-received", "uuid": uuid, "hostname": worker, "timestamp": t + 1.0,
                   "name": "tasks.add", "args": "(2, 3)", "kwargs": "{'z': 'needle'}", "retries": 0}),
            json!({"type": "task-started", "uuid": uuid, "hostname": worker, "timestamp": t + 2.0}),
            json!({"type": "task-started", "uuid": uuid, "hostname": worker, "timestamp": t + 2.0}),
            json!({"type": "worker-offline", "hostname": other, "timestamp": t, "freq": 2.0,
                   "active": 0, "processed": 3}),
        ];
        for event in events {
            publish(&*broker, event).await;
        }
        let row = until("the task's row, whole", || async {
            database
                .row(id)
                .await
                .filter(|row| row.started_at.is_some() && row.sent_at.is_some())
        })
        .await;
        assert_eq!(
            (
                row.state.as_str(),
                row.name.as_deref(),
                row.worker.as_deref()
            ),
            ("SUCCESS", Some("tasks.add"), Some(worker.as_str())),
            "{url}"
        );
        assert_eq!(
            (row.result.as_deref(), row.runtime, row.queue.as_deref()),
            (Some("5"), Some(0.5), Some("celery"))
        );
        let at = |seconds: f64| DateTime::from_timestamp_micros((seconds * 1e6) as i64);
        assert_eq!(
            (
                row.sent_at,
                row.received_at,
                row.started_at,
                row.finished_at
            ),
            (at(t), at(t + 1.0), at(t + 2.0), at(t + 3.0))
        );
        assert_eq!(Some(row.seen_at), at(t));

        let (status, page) = get(
            &client,
            &format!("/history?worker={worker}&state=SUCCESS&q=NEEDLE"),
        )
        .await;
        assert_eq!(status, Status::Ok, "{page}");
        assert_eq!(page["tasks"].as_array().unwrap().len(), 1, "{page}");
        assert_eq!(page["tasks"][0]["task_id"], json!(uuid));
        assert_eq!(page["tasks"][0]["args"], json!("(2, 3)"));
        assert_eq!(page["next_cursor"], Value::Null);

        let other_row = until("the offline worker", || async {
            let (_, body) = get(&client, "/workers").await;
            body["workers"]
                .as_array()
                .and_then(|w| w.iter().find(|w| w["hostname"] == json!(other)).cloned())
        })
        .await;
        assert_eq!(other_row["online"], json!(false));
        let (_, body) = get(&client, "/workers").await;
        let ours = body["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["hostname"] == json!(worker))
            .unwrap()
            .clone();
        assert_eq!(
            (&ours["active"], &ours["processed"], &ours["software"]),
            (&json!(1), &json!(7), &json!("py-celery 5.4.0")),
            "{url}"
        );
        drop(client);
        if url.starts_with("amqp") {
            broker.delete_queue(&config.monitor_queue).await.unwrap();
        } else {
            // The record of the monitor's subscription, kept as a named one's is.
            let redis = redis::Client::open(url).unwrap();
            let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
            let member = format!("#\u{6}\u{16}\u{6}\u{16}{}", config.monitor_queue);
            redis::cmd("SREM")
                .arg("_kombu.binding.celeryev")
                .arg(member)
                .query_async::<()>(&mut connection)
                .await
                .unwrap();
        }
        broker.close().await.unwrap();
        database.drop().await;
    }
}

/// A record of a task written in any order, in separate statements, and again, leaves the row
/// the pure merge gives: the SQL and the Rust merge agree.
#[tokio::test]
async fn rows_merge_in_sql_as_records_merge_in_rust() {
    let database = Database::create().await;
    let id = Uuid::new_v4();
    let uuid = id.to_string();
    let now = Utc::now();
    let records: Vec<TaskRecord> = [
        json!({"type": "task-sent", "uuid": uuid, "hostname": "c@h", "timestamp": 100.0,
               "name": "tasks.x", "args": "(1,)", "kwargs": "{}", "retries": 0, "queue": "q"}),
        json!({"type": "task-received", "uuid": uuid, "hostname": "w1@h", "timestamp": 101.0,
               "name": "tasks.x", "args": "(1,)", "kwargs": "{}", "retries": 0}),
        json!({"type": "task-started", "uuid": uuid, "hostname": "w1@h", "timestamp": 102.0}),
        json!({"type": "task-retried", "uuid": uuid, "hostname": "w1@h", "timestamp": 103.0,
               "exception": "Retry()", "traceback": "tb"}),
        json!({"type": "task-received", "uuid": uuid, "hostname": "w2@h", "timestamp": 104.0,
               "name": "tasks.x", "args": "(1,)", "kwargs": "{}", "retries": 1}),
        json!({"type": "task-failed", "uuid": uuid, "hostname": "w2@h", "timestamp": 105.0,
               "exception": "RuntimeError('x')", "traceback": "tb2"}),
    ]
    .iter()
    .map(
        |event| match event::record(event.as_object().unwrap(), now) {
            Some(event::Record::Task(record)) => record,
            other => panic!("{other:?}"),
        },
    )
    .collect();
    let merged = records.iter().cloned().reduce(event::merge).unwrap();
    assert_eq!(merged.state, "FAILURE");
    for order in [
        vec![0, 1, 2, 3, 4, 5],
        vec![5, 4, 3, 2, 1, 0],
        vec![2, 5, 0, 3, 1, 4, 5, 2],
    ] {
        diesel::sql_query("DELETE FROM task_history")
            .execute(&mut *database.pool.get().await.unwrap())
            .await
            .unwrap();
        for index in &order {
            let mut connection = database.pool.get().await.unwrap();
            store::record_tasks(&mut connection, std::slice::from_ref(&records[*index]))
                .await
                .unwrap();
        }
        let row = database.row(id).await.unwrap();
        assert_eq!(row, merged, "order {order:?}");
    }
    assert_eq!(
        (merged.worker.as_deref(), merged.retries),
        (Some("w2@h"), 1)
    );
    database.drop().await;
}

/// A task whose end no event told (the monitor was away on Redis) is ended from its result meta.
#[tokio::test]
async fn the_catch_up_reads_an_end_from_the_result_backend() {
    let database = Database::create().await;
    let config = config(BROKERS[1], &database);
    let backend = RedisBackend::of(&config).await.unwrap().unwrap();
    let writer = monitor::writer(database.pool.clone());
    let id = Uuid::new_v4();
    let uuid = id.to_string();
    let sent = json!({"type": "task-sent", "uuid": uuid, "hostname": "c@h",
                      "timestamp": seconds_ago(1.0), "name": "tasks.add", "args": "(2, 3)"});
    let Some(event::Record::Task(record)) = event::record(sent.as_object().unwrap(), Utc::now())
    else {
        panic!("not a task");
    };
    store::record_tasks(&mut database.pool.get().await.unwrap(), &[record])
        .await
        .unwrap();
    let mut meta = ResultMeta::new(&uuid, "SUCCESS", json!(5), Utc::now());
    meta.extended = Some(runtime::protocol::result::Extended {
        name: "tasks.add".into(),
        args: vec![json!(2), json!(3)],
        kwargs: Default::default(),
        worker: "w@h".into(),
        retries: 0,
        queue: "celery".into(),
    });
    backend.store(&meta).await.unwrap();
    let told = monitor::catch_up_once(&database.pool, &backend, &writer, Since(600))
        .await
        .unwrap();
    assert!(told >= 1, "{told}");
    let row = database.row(id).await.unwrap();
    assert_eq!(
        (
            row.state.as_str(),
            row.result.as_deref(),
            row.worker.as_deref()
        ),
        ("SUCCESS", Some("5"), Some("w@h"))
    );
    assert!(row.sent_at.is_some() && row.finished_at.is_some());
    // Ended, it is not read again.
    let told = monitor::catch_up_once(&database.pool, &backend, &writer, Since(600))
        .await
        .unwrap();
    assert_eq!(told, 0);
    database.drop().await;
}

fn record_at(seen_at: DateTime<Utc>, name: &str, worker: &str, state: &str) -> TaskRecord {
    TaskRecord {
        task_id: Uuid::new_v4(),
        name: Some(name.into()),
        state: state.into(),
        state_rank: event::rank(state),
        args: Some(format!("('{name}-arg',)")),
        kwargs: Some("{}".into()),
        worker: Some(worker.into()),
        queue: None,
        sent_at: Some(seen_at),
        received_at: None,
        started_at: None,
        finished_at: None,
        runtime: None,
        result: None,
        exception: None,
        traceback: None,
        retries: 0,
        root_id: None,
        parent_id: None,
        seen_at,
    }
}

/// Old tasks go, in bounded deletes, and the rest stay; pages follow one another without a gap
/// or a repeat, and each filter narrows them.
#[tokio::test]
async fn retention_forgets_in_batches_and_pages_and_filters_hold() {
    let database = Database::create().await;
    // PostgreSQL keeps microseconds.
    let now = DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
    let old: Vec<TaskRecord> = (0..25)
        .map(|n| {
            record_at(
                now - chrono::Duration::days(40) + chrono::Duration::seconds(n),
                "tasks.old",
                "w@h",
                "SUCCESS",
            )
        })
        .collect();
    let mut recent: Vec<TaskRecord> = (0..7)
        .map(|n| {
            let (name, worker, state) = match n % 2 {
                0 => ("tasks.even", "w1@h", "SUCCESS"),
                _ => ("tasks.odd", "w2@h", "FAILURE"),
            };
            record_at(
                now - chrono::Duration::seconds(100 - n),
                name,
                worker,
                state,
            )
        })
        .collect();
    let mut all = old.clone();
    all.extend(recent.clone());
    all.sort_by_key(|r| r.task_id);
    store::record_tasks(&mut database.pool.get().await.unwrap(), &all)
        .await
        .unwrap();

    let deleted = monitor::forget_before(&database.pool, now - chrono::Duration::days(30), 10)
        .await
        .unwrap();
    assert_eq!(deleted, 25);

    let client = database.app().await;
    recent.sort_by_key(|r| std::cmp::Reverse((r.seen_at, r.task_id)));
    let mut seen = Vec::new();
    let mut uri = "/history?limit=3".to_string();
    loop {
        let (status, page) = get(&client, &uri).await;
        assert_eq!(status, Status::Ok, "{page}");
        for task in page["tasks"].as_array().unwrap() {
            seen.push(Uuid::parse_str(task["task_id"].as_str().unwrap()).unwrap());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => uri = format!("/history?limit=3&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, recent.iter().map(|r| r.task_id).collect::<Vec<_>>());
    let count = |page: &Value| page["tasks"].as_array().unwrap().len();
    for (query, expected) in [
        ("name=tasks.odd", 3),
        ("worker=w1@h", 4),
        ("state=FAILURE", 3),
        ("q=EVEN-ARG", 4),
        ("q=%25", 0),
        ("name=tasks.even&state=FAILURE", 0),
    ] {
        let (status, page) = get(&client, &format!("/history?{query}")).await;
        assert_eq!((status, count(&page)), (Status::Ok, expected), "{query}");
    }
    let middle = recent[3].seen_at;
    let encoded = |time: DateTime<Utc>| time.to_rfc3339().replace('+', "%2B");
    let (_, page) = get(&client, &format!("/history?since={}", encoded(middle))).await;
    assert_eq!(count(&page), 4);
    let (_, page) = get(&client, &format!("/history?until={}", encoded(middle))).await;
    assert_eq!(count(&page), 3);
    for bad in ["since=yesterday", "limit=0", "state=%00"] {
        let (status, _) = get(&client, &format!("/history?{bad}")).await;
        assert_eq!(status, Status::UnprocessableEntity, "{bad}");
    }
    let (status, _) = get(&client, "/history?cursor=nope").await;
    assert_eq!(status, Status::BadRequest);
    drop(client);
    database.drop().await;
}

/// A series of `GET /history/throughput`: its name, total, and minutes (RFC 3339 in UTC) with
/// their counts.
type SeriesSeen = (Value, i64, Vec<(String, i64)>);

/// The series of a `GET /history/throughput` answer.
fn series_of(answer: &Value) -> Vec<SeriesSeen> {
    let minute = |m: &Value| {
        let at = DateTime::parse_from_rfc3339(m["minute"].as_str().unwrap()).unwrap();
        (at.to_utc().to_rfc3339(), m["tasks"].as_i64().unwrap())
    };
    answer["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let minutes = s["minutes"].as_array().unwrap();
            (
                s["name"].clone(),
                s["total"].as_i64().unwrap(),
                minutes.iter().map(minute).collect(),
            )
        })
        .collect()
}

/// `GET /history/throughput` counts each name's tasks per minute of their first event: a
/// minute's count is what `GET /history` lists for that name and minute; the last hour by
/// default, from a whole minute; a window that is empty or over a day is refused.
#[tokio::test]
async fn throughput_counts_each_names_tasks_per_minute_as_the_listing_holds_them() {
    use chrono::{Duration, DurationRound};
    let database = Database::create().await;
    let whole = |time: DateTime<Utc>| time.duration_trunc(Duration::minutes(1)).unwrap();
    let now = DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
    let (first, second) = (
        whole(now - Duration::minutes(30)),
        whole(now - Duration::minutes(29)),
    );
    let mut records = vec![
        record_at(first, "tasks.add", "w@h", "SUCCESS"),
        record_at(first + Duration::seconds(59), "tasks.add", "w@h", "FAILURE"),
        record_at(second, "tasks.add", "w@h", "SUCCESS"),
        record_at(
            second + Duration::seconds(30),
            "tasks.mul",
            "w@h",
            "SUCCESS",
        ),
        record_at(now - Duration::hours(2), "tasks.add", "w@h", "SUCCESS"),
        record_at(now, "tasks.mul", "w@h", "STARTED"),
    ];
    let mut nameless = record_at(second + Duration::seconds(1), "-", "w@h", "STARTED");
    nameless.name = None;
    records.push(nameless);
    records.sort_by_key(|r| r.task_id);
    store::record_tasks(&mut database.pool.get().await.unwrap(), &records)
        .await
        .unwrap();
    let client = database.app().await;
    let encoded = |time: DateTime<Utc>| time.to_rfc3339().replace('+', "%2B");
    let text = |time: DateTime<Utc>| time.to_rfc3339();

    let (status, answer) = get(&client, "/history/throughput").await;
    assert_eq!(status, Status::Ok, "{answer}");
    assert_eq!(
        series_of(&answer),
        [
            (
                json!("tasks.add"),
                3,
                vec![(text(first), 2), (text(second), 1)]
            ),
            (
                json!("tasks.mul"),
                2,
                vec![(text(second), 1), (text(whole(now)), 1)]
            ),
            (json!(null), 1, vec![(text(second), 1)]),
        ]
    );
    let since = DateTime::parse_from_rfc3339(answer["since"].as_str().unwrap()).unwrap();
    assert_eq!(since, whole(since.to_utc()), "{answer}");

    // A minute's count is the listing's for that name and minute.
    let (_, page) = get(
        &client,
        &format!(
            "/history?name=tasks.add&since={}&until={}",
            encoded(first),
            encoded(second)
        ),
    )
    .await;
    assert_eq!(page["tasks"].as_array().unwrap().len(), 2, "{page}");

    // `since` goes down to its minute; `until` is where the window ends.
    let (status, answer) = get(
        &client,
        &format!(
            "/history/throughput?since={}&until={}",
            encoded(first + Duration::seconds(30)),
            encoded(second + Duration::seconds(1))
        ),
    )
    .await;
    assert_eq!(status, Status::Ok, "{answer}");
    assert_eq!(answer["since"], json!(first), "{answer}");
    assert_eq!(
        series_of(&answer),
        [(
            json!("tasks.add"),
            3,
            vec![(text(first), 2), (text(second), 1)]
        )]
    );
    let (_, answer) = get(
        &client,
        &format!(
            "/history/throughput?since={}",
            encoded(now - Duration::hours(3))
        ),
    )
    .await;
    assert_eq!(series_of(&answer)[0].1, 4, "{answer}");

    for bad in [
        format!("since={}&until={}", encoded(second), encoded(first)),
        format!("since={}", encoded(now - Duration::hours(25))),
        "until=yesterday".to_string(),
    ] {
        let (status, _) = get(&client, &format!("/history/throughput?{bad}")).await;
        assert_eq!(status, Status::UnprocessableEntity, "{bad}");
    }
    drop(client);
    database.drop().await;
}
