//! The web API against real PostgreSQL, a real broker and our worker in the same process.
//! Each test gets a database and a queue of its own.

mod common;

use std::time::Duration;

use common::{admin, Stack, BROKERS, POSTGRES};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use rocket::http::{ContentType, Header, Status};
use runtime::CeleryConfig;
use serde_json::{json, Value};

fn state_is(state: &'static str) -> impl Fn(&Value) -> bool {
    move |job| job["state"] == state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_run_to_success_with_progress_and_errors_on_both_brokers() {
    for url in BROKERS {
        let stack = Stack::start(url, true).await;

        let response = stack
            .client
            .post("/receive")
            .header(ContentType::JSON)
            .body(r#"{"task":"tasks.add","args":[2,3]}"#)
            .dispatch()
            .await;
        assert_eq!(response.status(), Status::Accepted);
        let location = response.headers().get_one("Location").unwrap().to_string();
        let body: Value = response.into_json().await.unwrap();
        let id = body["task_id"].as_str().unwrap().to_string();
        assert_eq!(
            (location.as_str(), &body["status_url"]),
            (format!("/status/{id}").as_str(), &json!(location))
        );
        let job = stack.wait_for(&id, "SUCCESS", state_is("SUCCESS")).await;
        assert_eq!(
            (&job["result"], &job["task"], &job["error"]),
            (&json!(5), &json!("tasks.add"), &Value::Null),
            "{url}"
        );
        assert!(
            job["worker"].as_str().unwrap().starts_with("web-test-"),
            "{job}"
        );
        assert!(
            job["started_at"].as_str() <= job["finished_at"].as_str(),
            "{job}"
        );

        let id = stack
            .submit(json!({"task": "tasks.progress", "args": [10, 200]}))
            .await;
        let running = stack.wait_for(&id, "PROGRESS", state_is("PROGRESS")).await;
        let current = running["progress"]["current"].as_i64().unwrap();
        assert!(
            (1..=10).contains(&current) && running["progress"]["total"] == 10,
            "{running}"
        );
        let done = stack.wait_for(&id, "SUCCESS", state_is("SUCCESS")).await;
        assert_eq!(done["result"], 10);

        let id = stack
            .submit(json!({"task": "tasks.fail", "args": ["boom"]}))
            .await;
        let failed = stack.wait_for(&id, "FAILURE", state_is("FAILURE")).await;
        assert_eq!(
            failed["error"],
            json!({"type": "RuntimeError", "message": "boom"})
        );

        let id = stack.submit(json!({"document": {"pages": 3}})).await;
        let echoed = stack.wait_for(&id, "SUCCESS", state_is("SUCCESS")).await;
        assert_eq!(
            (&echoed["task"], &echoed["result"]),
            (&json!("tasks.echo"), &json!({"document": {"pages": 3}}))
        );
        stack.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_a_clear_json_error_with_its_status() {
    let stack = Stack::start(BROKERS[1], false).await;
    let cases = [
        ("{not json", Status::BadRequest, "malformed JSON"),
        (
            r#"{"task": "tasks.nope"}"#,
            Status::UnprocessableEntity,
            "unknown task `tasks.nope`",
        ),
        (
            r#"{"task": "tasks.add", "args": 5}"#,
            Status::UnprocessableEntity,
            "`args` must be a list",
        ),
    ];
    for (body, status, message) in cases {
        let (got, answer) = stack.post(body).await;
        assert_eq!(got, status, "{body}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().starts_with(message),
            "{body}: {answer}"
        );
    }
    let big = format!("[\"{}\"]", "x".repeat(5000));
    assert_eq!(stack.post(&big).await.0, Status::PayloadTooLarge);
    // No credential is required here, so neither what a browser posts cross-site without
    // asking (a form, a body of no type) is read.
    for content_type in [
        Some(ContentType::XML),
        Some(ContentType::Plain),
        Some(ContentType::Form),
        None,
    ] {
        let mut request = stack.client.post("/receive").body("{}");
        if let Some(content_type) = content_type.clone() {
            request = request.header(content_type);
        }
        let response = request.dispatch().await;
        assert_eq!(
            response.status(),
            Status::UnsupportedMediaType,
            "{content_type:?}"
        );
    }

    let (status, answer) = stack.get("/status/not-a-uuid").await;
    assert_eq!(
        (status, answer["error"].is_string()),
        (Status::BadRequest, true)
    );
    let (status, answer) = stack
        .get(&format!("/status/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(
        (status, answer["error"].is_string()),
        (Status::NotFound, true)
    );
    let (status, answer) = stack.get("/no/such/route").await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (Status::NotFound, Some("Not Found"))
    );
    let (status, _) = stack.get("/tasks?limit=0").await;
    assert_eq!(status, Status::UnprocessableEntity);
    let (status, _) = stack.get("/tasks?cursor=garbage").await;
    assert_eq!(status, Status::BadRequest);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listing_pages_newest_first_and_filters() {
    let stack = Stack::start(BROKERS[1], false).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            stack
                .submit(json!({"task": "tasks.add", "args": [n, n]}))
                .await,
        );
    }
    ids.push(
        stack
            .submit(json!({"task": "tasks.mul", "args": [1, 1]}))
            .await,
    );
    ids.reverse();
    let mut seen = Vec::new();
    let mut uri = "/tasks?limit=4".to_string();
    loop {
        let (status, page) = stack.get(&uri).await;
        assert_eq!(status, Status::Ok, "{page}");
        seen.extend(
            page["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["task_id"].as_str().unwrap().to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => uri = format!("/tasks?limit=4&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ids);
    let (_, only) = stack.get("/tasks?task=tasks.mul&state=PENDING").await;
    assert_eq!(only["tasks"].as_array().unwrap().len(), 1);
    assert_eq!(only["tasks"][0]["task_id"], json!(ids[0]));
    let (status, health) = stack.get("/health").await;
    assert_eq!((status, &health["status"]), (Status::Ok, &json!("ok")));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_inline_results_within_web_answer_max_bytes_and_link_the_rest() {
    let stack = Stack::start_with(BROKERS[1], true, |c| c.web_answer_max_bytes = 100).await;
    // Three results of 42 bytes of JSON each.
    let texts: Vec<String> = ["a", "b", "c"].iter().map(|c| c.repeat(40)).collect();
    let calls: Vec<Value> = texts
        .iter()
        .map(|text| json!({"task": "tasks.echo", "args": [text]}))
        .collect();
    let (status, accepted) = stack.post(&json!({ "group": calls }).to_string()).await;
    assert_eq!(status, Status::Accepted, "{accepted}");
    let group = accepted["workflow_id"].as_str().unwrap().to_string();
    let done = stack
        .wait_for(&group, "the group", state_is("SUCCESS"))
        .await;
    // The group shows each result twice (its list and the step's own view): one fits.
    let children = done["children"].as_array().unwrap();
    assert_eq!(children[0]["result"], json!(texts[0]), "{done}");
    for (child, text) in children.iter().zip(&texts).skip(1) {
        let link = format!("/status/{}", child["task_id"].as_str().unwrap());
        assert_eq!(
            (&child["result"], &child["result_truncated"]),
            (&Value::Null, &json!(link)),
            "{done}"
        );
        let (_, own) = stack.get(&link).await;
        assert_eq!(own["result"], json!(text), "{own}");
        assert!(own["result_truncated"].is_null(), "{own}");
    }
    assert_eq!(
        (&done["result"], &done["result_truncated"]),
        (&Value::Null, &json!(true)),
        "{done}"
    );
    // A page shows each once: two fit, the oldest is linked.
    let (_, page) = stack.get("/tasks").await;
    let truncated: Vec<&Value> = page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|job| job["result"].is_null())
        .collect();
    assert_eq!(truncated.len(), 1, "{page}");
    assert!(truncated[0]["result_truncated"]
        .as_str()
        .is_some_and(|link| link.starts_with("/status/")));
    assert!(page["tasks"][0].get("args").is_none(), "{page}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweep_catches_up_and_states_never_go_back() {
    use runtime::protocol::result::ResultMeta;
    let stack = Stack::start(BROKERS[1], false).await;
    let id = stack
        .submit(json!({"task": "tasks.add", "args": [1, 1]}))
        .await;
    // A state stored without its PUBLISH (a message the tracker missed): the sweep must find it.
    let meta = ResultMeta::new(&id, "SUCCESS", json!(2), chrono::Utc::now());
    let redis = redis::Client::open("redis://127.0.0.1:6379/0").unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
    let key = runtime::backend::result_key(&id);
    let text = serde_json::to_string(&meta).unwrap();
    redis::cmd("SET")
        .arg(key)
        .arg(text)
        .arg("EX")
        .arg(600)
        .query_async::<()>(&mut connection)
        .await
        .unwrap();
    let job = stack.wait_for(&id, "SUCCESS", state_is("SUCCESS")).await;
    assert_eq!(job["result"], 2);

    let pool = web::db::pool(&stack.config.database_url, 1).unwrap();
    let mut connection = pool.get().await.unwrap();
    let late = ResultMeta::new(
        &id,
        "PROGRESS",
        json!({"current": 1, "total": 2}),
        chrono::Utc::now(),
    );
    let moved = web::store::apply(&mut connection, id.parse().unwrap(), &late)
        .await
        .unwrap();
    assert!(!moved, "a PROGRESS after SUCCESS must be ignored");
    drop(connection);
    drop(pool);
    let (_, job) = stack.get(&format!("/status/{id}")).await;
    assert_eq!(
        (&job["state"], &job["progress"]),
        (&json!("SUCCESS"), &Value::Null)
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_the_broker_did_not_take_is_published_by_the_outbox() {
    let stack = Stack::start(BROKERS[1], true).await;
    // As if the broker had refused it: recorded, not published, free for the outbox.
    let id = uuid::Uuid::new_v4();
    let job = web::store::NewJob::single(
        id,
        "tasks.add".into(),
        json!([20, 22]),
        json!({}),
        stack.config.task_default_queue.clone(),
    );
    let pool = web::db::pool(&stack.config.database_url, 1).unwrap();
    let mut connection = pool.get().await.unwrap();
    web::store::insert(&mut connection, &[job]).await.unwrap();
    web::store::mark_publish_failed(&mut connection, id, "broker down")
        .await
        .unwrap();
    drop(connection);
    drop(pool);
    let done = stack
        .wait_for(&id.to_string(), "SUCCESS", state_is("SUCCESS"))
        .await;
    assert_eq!(
        (&done["result"], &done["error"]),
        (&json!(42), &Value::Null)
    );
    stack.stop().await;
}

/// A job whose publish always fails (a queue RabbitMQ refuses, written straight into the table
/// since `/receive` refuses such names) backs off by itself: a later job waiting for the outbox
/// is published and runs, and the refused one ends FAILURE with a `PublishError` after
/// `web_publish_max_attempts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_the_broker_always_refuses_delays_only_itself_then_fails() {
    let stack = Stack::start_with(BROKERS[0], true, |c| c.web_publish_max_attempts = 4).await;
    let job = |args: Value, queue: String| {
        web::store::NewJob::single(
            uuid::Uuid::new_v4(),
            "tasks.add".into(),
            args,
            json!({}),
            queue,
        )
    };
    let refused = job(
        json!([1, 1]),
        format!("amq.refused-{}", uuid::Uuid::new_v4()),
    );
    let later = job(json!([20, 22]), stack.config.task_default_queue.clone());
    let pool = web::db::pool(&stack.config.database_url, 1).unwrap();
    let mut connection = pool.get().await.unwrap();
    // Two statements: the refused job is the older, so every round meets it first.
    for row in [&refused, &later] {
        web::store::insert(&mut connection, std::slice::from_ref(row))
            .await
            .unwrap();
    }
    web::store::release(&mut connection, &[refused.task_id, later.task_id])
        .await
        .unwrap();
    drop(connection);
    drop(pool);
    let done = stack
        .wait_for(&later.task_id.to_string(), "SUCCESS", state_is("SUCCESS"))
        .await;
    assert_eq!(done["result"], json!(42));
    // Long before the refused job's last attempt (its backoffs add up to 7 s): it did not hold
    // the later one back.
    let (_, waiting) = stack.get(&format!("/status/{}", refused.task_id)).await;
    assert_eq!(
        (&waiting["state"], &waiting["error"]["type"]),
        (&json!("PENDING"), &json!("PublishError")),
        "{waiting}"
    );
    let failed = stack
        .wait_for(&refused.task_id.to_string(), "FAILURE", state_is("FAILURE"))
        .await;
    assert_eq!(failed["error"]["type"], "PublishError", "{failed}");
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("not published after 4 attempts: "),
        "{failed}"
    );
    assert!(failed["finished_at"].is_string(), "{failed}");
    stack.stop().await;
}

/// With `task_create_missing_queues` off, a job may name a queue the settings name or one that
/// exists, and any other is 422; the client refuses to publish there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_create_missing_queues_only_existing_queues_take_jobs() {
    for url in BROKERS {
        let stack = Stack::start_with(url, true, |c| c.task_create_missing_queues = false).await;
        let missing = format!("test-web-missing-{}", uuid::Uuid::new_v4().simple());
        let (status, answer) = stack
            .post(&json!({"task": "tasks.add", "args": [1, 2], "queue": missing}).to_string())
            .await;
        assert_eq!(status, Status::UnprocessableEntity, "{url}: {answer}");
        assert_eq!(
            answer["error"],
            format!(
                "`queue`: queue {missing} does not exist and task_create_missing_queues is false"
            )
        );
        let (status, answer) = stack
            .post(
                &json!({"group": [{"task": "tasks.add", "args": [1, 2], "queue": missing}]})
                    .to_string(),
            )
            .await;
        assert_eq!(status, Status::UnprocessableEntity, "{url}: {answer}");
        let client = runtime::client::Client::connect(stack.config.clone())
            .await
            .unwrap();
        let refused = client
            .send_task(
                "tasks.add",
                vec![json!(1), json!(2)],
                Default::default(),
                runtime::client::SendOptions {
                    queue: Some(missing.clone()),
                    ..Default::default()
                },
            )
            .await;
        assert!(
            matches!(refused, Err(runtime::Error::MissingQueue(_))),
            "{url}: {:?}",
            refused.err()
        );
        client.close().await.unwrap();
        let broker = runtime::broker::connect(url).await.unwrap();
        assert!(!broker.exists(&missing).await.unwrap(), "{url}: created");
        // Once someone made it (a publisher allowed to), it takes jobs.
        let creating = runtime::client::Client::connect(CeleryConfig {
            task_create_missing_queues: true,
            ..stack.config.clone()
        })
        .await
        .unwrap();
        let to_missing = runtime::client::SendOptions {
            queue: Some(missing.clone()),
            ..Default::default()
        };
        creating
            .send_task("tasks.add", vec![], Default::default(), to_missing)
            .await
            .unwrap();
        creating.close().await.unwrap();
        assert!(broker.exists(&missing).await.unwrap(), "{url}");
        stack
            .submit(json!({"task": "tasks.add", "args": [1, 2], "queue": missing}))
            .await;
        broker.delete_queue(&missing).await.unwrap();
        broker.close().await.unwrap();
        // The default queue exists (the worker consumes it), and is named by the settings.
        let id = stack
            .submit(json!({"task": "tasks.add", "args": [2, 3], "queue": stack.config.task_default_queue}))
            .await;
        let done = stack.wait_for(&id, "SUCCESS", state_is("SUCCESS")).await;
        assert_eq!(done["result"], 5, "{url}");
        stack.stop().await;
    }
}

/// Step `position` of workflow `id`, a `kind`, calling `task` with `args`.
fn step(
    kind: web::workflow::Kind,
    id: uuid::Uuid,
    position: i32,
    args: Value,
    queue: &str,
) -> web::store::NewJob {
    web::store::NewJob {
        workflow_id: Some(id),
        workflow_kind: Some(kind.name().into()),
        workflow_position: Some(position),
        ..web::store::NewJob::single(
            uuid::Uuid::new_v4(),
            "tasks.add".into(),
            args,
            json!({}),
            queue.into(),
        )
    }
}

/// A chain the broker did not take is sent again from its first step with every later step; a
/// group's members each from their own row. Both then run to their results.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workflows_the_broker_did_not_take_are_published_by_the_outbox() {
    use web::workflow::Kind;

    let stack = Stack::start(BROKERS[0], true).await;
    let queue = stack.config.task_default_queue.clone();
    let (chain_id, group_id) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let chain: Vec<_> = [json!([1, 2]), json!([10]), json!([100])]
        .into_iter()
        .enumerate()
        .map(|(i, args)| step(Kind::Chain, chain_id, i as i32, args, &queue))
        .collect();
    let group: Vec<_> = (0..2)
        .map(|i| step(Kind::Group, group_id, i, json!([i, i]), &queue))
        .collect();
    let pool = web::db::pool(&stack.config.database_url, 1).unwrap();
    let mut connection = pool.get().await.unwrap();
    web::store::insert(&mut connection, &[chain.clone(), group.clone()].concat())
        .await
        .unwrap();
    // As if the broker had refused each publish: the chain's first step, each member.
    for refused in [&chain[0], &group[0], &group[1]] {
        web::store::mark_publish_failed(&mut connection, refused.task_id, "broker down")
            .await
            .unwrap();
    }
    drop(connection);
    drop(pool);
    let chain_done = stack
        .wait_for(&chain_id.to_string(), "chain SUCCESS", state_is("SUCCESS"))
        .await;
    assert_eq!(
        (&chain_done["result"], &chain_done["workflow"]),
        (&json!(113), &json!("chain")),
        "{chain_done}"
    );
    let results: Vec<&Value> = chain_done["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|child| &child["result"])
        .collect();
    assert_eq!(results, [&json!(3), &json!(13), &json!(113)]);
    let group_done = stack
        .wait_for(&group_id.to_string(), "group SUCCESS", state_is("SUCCESS"))
        .await;
    assert_eq!(group_done["result"], json!([0, 2]), "{group_done}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn receive_accepts_jobs_while_the_broker_is_down() {
    let stack = Stack::start_with(BROKERS[1], false, |c| {
        c.broker_url = "redis://127.0.0.1:1/0".into()
    })
    .await;
    let id = stack
        .submit(json!({"task": "tasks.add", "args": [1, 2]}))
        .await;
    // Published after the answer: the failure lands on the row soon after.
    let publish_failed = |job: &Value| job["error"]["type"] == "PublishError";
    let job = stack
        .wait_for(&id, "the failed publish", publish_failed)
        .await;
    assert_eq!(job["state"], "PENDING", "{job}");
    // A workflow too: recorded whole, its first message waiting for the outbox.
    let (status, answer) = stack
        .post(&json!({"chain": [{"task": "tasks.add", "args": [1, 2]}, {"task": "tasks.add", "args": [3]}]}).to_string())
        .await;
    assert_eq!(status, Status::Accepted, "{answer}");
    let workflow_id = answer["workflow_id"].as_str().unwrap();
    let workflow = stack
        .wait_for(workflow_id, "the workflow's failed publish", publish_failed)
        .await;
    assert_eq!(workflow["state"], "PENDING", "{workflow}");
    assert_eq!(workflow["children"].as_array().map(Vec::len), Some(2));
    let (status, _) = stack.get("/health").await;
    assert_eq!(status, Status::ServiceUnavailable);
    stack.stop().await;
}

/// A Redis of this test's own on a free loopback port, keeping nothing on disk, stopped when
/// dropped: pausing its writes holds up no other test.
struct OwnRedis {
    port: u16,
    server: std::process::Child,
}

impl OwnRedis {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args([
                "--appendonly",
                "no",
                "--dir",
                &std::env::temp_dir().display().to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (make services installs it)");
        let redis = Self { port, server };
        let mut connection = redis.connection().await;
        let ping = async {
            while redis::cmd("PING")
                .query_async::<()>(&mut connection)
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), ping)
            .await
            .expect("our own redis-server answers");
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn connection(&self) -> redis::aio::ConnectionManager {
        let client = redis::Client::open(self.url()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match redis::aio::ConnectionManager::new(client.clone()).await {
                    Ok(connection) => break connection,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
        .await
        .expect("our own redis-server takes connections")
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// The answer waits for the row's commit, not for the broker: with every write to the broker
/// paused, `/receive` still answers, the message reaching the queue only once writes resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn receive_answers_once_recorded_and_publishes_after() {
    let redis = OwnRedis::start().await;
    let stack = Stack::start(&redis.url(), false).await;
    let mut broker = redis.connection().await;
    let queue = stack.config.task_default_queue.clone();
    // Writes (the publish's LPUSH among them) wait until unpaused; reads still answer.
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(30_000)
        .arg("WRITE")
        .query_async::<()>(&mut broker)
        .await
        .unwrap();
    let id = stack
        .submit(json!({"task": "tasks.add", "args": [2, 3]}))
        .await;
    let queued: i64 = redis::AsyncCommands::llen(&mut broker, &queue)
        .await
        .unwrap();
    assert_eq!(queued, 0, "the answer waited for the broker");
    redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async::<()>(&mut broker)
        .await
        .unwrap();
    let published = async {
        loop {
            let queued: Vec<String> = redis::AsyncCommands::lrange(&mut broker, &queue, 0, -1)
                .await
                .unwrap();
            if let Some(message) = queued.into_iter().next() {
                break message;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let message = tokio::time::timeout(Duration::from_secs(20), published)
        .await
        .expect("published once the broker takes writes again");
    assert!(message.contains(&id), "{message}");
    stack.stop().await;
}

/// `/health` and `/metrics` answer from the probe's last check: the same snapshot however often
/// they are called, naming the part that is down without the server's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_metrics_answer_from_the_last_check_without_raw_errors() {
    let stack = Stack::start_with(BROKERS[1], false, |c| {
        c.broker_url = "redis://:hunter2-secret@127.0.0.1:1/0".into()
    })
    .await;
    let mut checked = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let response = stack.client.get("/health").dispatch().await;
        assert_eq!(response.status(), Status::ServiceUnavailable);
        let text = response.into_string().await.unwrap();
        for raw in ["127.0.0.1", "hunter2", "refused", "redis"] {
            assert!(!text.to_lowercase().contains(raw), "{raw} in {text}");
        }
        let health: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (&health["broker"], &health["database"]),
            (
                &json!({"ok": false, "error": "cannot_connect"}),
                &json!({"ok": true})
            ),
            "{health}"
        );
        checked.insert(health["checked_at"].as_str().unwrap().to_string());
        let (status, _) = stack.get("/metrics").await;
        assert_eq!(status, Status::Ok);
    }
    // 20 calls in well under the 2 s between checks: one snapshot, or two across a tick.
    assert!((1..=2).contains(&checked.len()), "{checked:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_configured_token_guards_the_job_routes_but_not_health() {
    let stack = Stack::start_with(BROKERS[1], false, |c| {
        c.web_auth_token = Some("s3cret-token".into())
    })
    .await;
    let client = &stack.client;
    let body = r#"{"task":"tasks.add","args":[1,2]}"#;
    for header in [
        None,
        Some("Bearer wrong"),
        Some("s3cret-token"),
        Some("Bearer s3cret-token "),
    ] {
        let mut request = client.post("/receive").header(ContentType::JSON).body(body);
        if let Some(value) = header {
            request = request.header(Header::new("Authorization", value));
        }
        let response = request.dispatch().await;
        assert_eq!(response.status(), Status::Unauthorized, "{header:?}");
        let answer: Value = response.into_json().await.unwrap();
        assert_eq!(
            answer,
            json!({"error": "Unauthorized"}),
            "the refusal says nothing of why"
        );
    }
    let bearer = Header::new("Authorization", "Bearer s3cret-token");
    let accepted = client
        .post("/receive")
        .header(ContentType::JSON)
        .header(bearer.clone())
        .body(body)
        .dispatch()
        .await;
    assert_eq!(accepted.status(), Status::Accepted);
    let id = accepted.into_json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let status = |auth: Option<Header<'static>>| {
        let mut request = client.get(format!("/status/{id}"));
        if let Some(auth) = auth {
            request = request.header(auth);
        }
        async move { request.dispatch().await.status() }
    };
    assert_eq!(status(None).await, Status::Unauthorized);
    assert_eq!(status(Some(bearer.clone())).await, Status::Ok);
    // With a credential required, curl's `-d` default type is read as JSON.
    let form = client
        .post("/receive")
        .header(ContentType::Form)
        .header(bearer)
        .body(body)
        .dispatch()
        .await
        .status();
    assert_eq!(form, Status::Accepted);
    assert_eq!(
        client.get("/tasks").dispatch().await.status(),
        Status::Unauthorized
    );
    assert_eq!(client.get("/health").dispatch().await.status(), Status::Ok);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_jwt_signed_with_the_configured_secret_opens_the_job_routes() {
    use jsonwebtoken::{
        encode, get_current_timestamp, Algorithm, EncodingKey, Header as JwtHeader,
    };

    const SECRET: &str = "web-test-jwt-secret-of-32-bytes!";
    let stack = Stack::start_with(BROKERS[1], false, |c| {
        c.web_jwt_secret = Some(SECRET.into())
    })
    .await;
    let sign = |algorithm: Algorithm, secret: &str, claims: Value| {
        encode(
            &JwtHeader::new(algorithm),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let now = get_current_timestamp();
    let valid = sign(
        Algorithm::HS256,
        SECRET,
        json!({"sub": "svc", "exp": now + 300}),
    );
    let client = &stack.client;
    let body = r#"{"task":"tasks.add","args":[1,2]}"#;
    let post = |authorization: Option<String>| {
        let mut request = client.post("/receive").header(ContentType::JSON).body(body);
        if let Some(value) = authorization {
            request = request.header(Header::new("Authorization", value));
        }
        request.dispatch()
    };

    let accepted = post(Some(format!("Bearer {valid}"))).await;
    assert_eq!(accepted.status(), Status::Accepted);
    let id = accepted.into_json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_string();

    let bearer =
        |algorithm, secret, claims| Some(format!("Bearer {}", sign(algorithm, secret, claims)));
    let refused = [
        None,
        Some(valid.clone()),
        bearer(
            Algorithm::HS256,
            "not-the-secret",
            json!({"exp": now + 300}),
        ),
        bearer(Algorithm::HS256, SECRET, json!({"exp": now - 3600})),
        bearer(Algorithm::HS256, SECRET, json!({"sub": "no exp"})),
        bearer(Algorithm::HS512, SECRET, json!({"exp": now + 300})),
        Some("Bearer not.a.jwt".to_string()),
        Some(format!("Bearer {SECRET}")),
    ];
    for authorization in refused {
        let response = post(authorization.clone()).await;
        assert_eq!(response.status(), Status::Unauthorized, "{authorization:?}");
        let answer: Value = response.into_json().await.unwrap();
        assert_eq!(
            answer,
            json!({"error": "Unauthorized"}),
            "the refusal says nothing of why"
        );
    }

    let status = client
        .get(format!("/status/{id}"))
        .header(Header::new("Authorization", format!("Bearer {valid}")))
        .dispatch()
        .await
        .status();
    assert_eq!(status, Status::Ok);
    assert_eq!(
        client
            .get(format!("/status/{id}"))
            .dispatch()
            .await
            .status(),
        Status::Unauthorized
    );
    assert_eq!(client.get("/health").dispatch().await.status(), Status::Ok);
    stack.stop().await;
}

/// The outbox takes only jobs no worker has reported on (one seen STARTED was published, even if
/// its row missed the record), and what a publisher claimed but did not send is freed at once.
#[tokio::test]
async fn the_outbox_claims_only_unseen_jobs_and_frees_what_it_did_not_send() {
    use runtime::protocol::result::ResultMeta;
    use web::store;

    let database = format!("rcelery_test_{}", uuid::Uuid::new_v4().simple());
    admin(&format!("CREATE DATABASE {database}")).await;
    let url = format!("{POSTGRES}/{database}");
    web::db::migrate(&url).await.unwrap();
    let pool = web::db::pool(&url, 1).unwrap();
    let mut connection = pool.get().await.unwrap();
    let job = |x: i64| {
        store::NewJob::single(
            uuid::Uuid::new_v4(),
            "tasks.add".into(),
            json!([x, x]),
            json!({}),
            "celery".into(),
        )
    };
    let (seen, unseen, failed) = (job(1), job(2), job(3));
    for job in [&seen, &unseen, &failed] {
        store::insert(&mut connection, std::slice::from_ref(job))
            .await
            .unwrap();
    }
    store::release(&mut connection, &[seen.task_id, unseen.task_id])
        .await
        .unwrap();
    // A failed publish frees the job only after its backoff: the next rounds pass it by.
    let attempts = store::mark_publish_failed(&mut connection, failed.task_id, "refused")
        .await
        .unwrap();
    assert_eq!(attempts, 1);
    let started = ResultMeta::new(
        &seen.task_id.to_string(),
        "STARTED",
        json!({}),
        chrono::Utc::now(),
    );
    store::apply(&mut connection, seen.task_id, &started)
        .await
        .unwrap();
    let ids = |jobs: Vec<store::NewJob>| jobs.iter().map(|j| j.task_id).collect::<Vec<_>>();
    let claimed = store::claim_unpublished(&mut connection, 10).await.unwrap();
    assert_eq!(ids(claimed), [unseen.task_id], "not the one backing off");
    let claimed = store::claim_unpublished(&mut connection, 10).await.unwrap();
    assert!(claimed.is_empty(), "leased");
    let row = store::find(&mut connection, failed.task_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.publish_error.as_deref(), Some("refused"));
    assert_eq!(
        store::mark_publish_failed(&mut connection, failed.task_id, "refused")
            .await
            .unwrap(),
        2,
        "attempts are counted"
    );
    store::release(&mut connection, &[unseen.task_id])
        .await
        .unwrap();
    let claimed = store::claim_unpublished(&mut connection, 10).await.unwrap();
    assert_eq!(ids(claimed), [unseen.task_id], "freed");
    store::release(&mut connection, &[unseen.task_id])
        .await
        .unwrap();
    store::mark_published(&mut connection, &[unseen.task_id])
        .await
        .unwrap();
    let claimed = store::claim_unpublished(&mut connection, 10).await.unwrap();
    assert!(claimed.is_empty(), "a published job is not claimed again");
    // Of a chain, only the first step is ever claimed: its message carries the others.
    let chain_id = uuid::Uuid::new_v4();
    let chain: Vec<_> = (0..3)
        .map(|i| {
            step(
                web::workflow::Kind::Chain,
                chain_id,
                i,
                json!([i]),
                "celery",
            )
        })
        .collect();
    store::insert(&mut connection, &chain).await.unwrap();
    store::release(&mut connection, &ids(chain.clone()))
        .await
        .unwrap();
    let claimed = store::claim_unpublished(&mut connection, 10).await.unwrap();
    assert_eq!(ids(claimed.clone()), [chain[0].task_id]);
    assert_eq!(claimed[0], chain[0], "claimed with its workflow place");
    assert_eq!(
        store::steps_after(&mut connection, chain_id, 0)
            .await
            .unwrap(),
        chain[1..]
    );
    drop(connection);
    drop(pool);
    admin(&format!("DROP DATABASE {database} WITH (FORCE)")).await;
}

/// Jobs that arrive together share group commits: each is recorded, published once, marked
/// published and run, with its own result.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_jobs_are_each_recorded_published_and_run() {
    let stack = Stack::start(BROKERS[1], true).await;
    let ids: Vec<String> = futures::future::join_all(
        (0..100).map(|i| stack.submit(json!({"task": "tasks.add", "args": [i, 1000]}))),
    )
    .await;
    assert_eq!(
        ids.iter().collect::<std::collections::BTreeSet<_>>().len(),
        100
    );
    for (i, id) in ids.iter().enumerate() {
        let done = stack.wait_for(id, "SUCCESS", state_is("SUCCESS")).await;
        assert_eq!(done["result"], json!(i + 1000), "{done}");
    }
    let pool = web::db::pool(&stack.config.database_url, 1).unwrap();
    let mut connection = pool.get().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for id in &ids {
        loop {
            let job = web::store::find(&mut connection, id.parse().unwrap())
                .await
                .unwrap()
                .unwrap();
            if job.published_at.is_some() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} never marked published"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    drop(connection);
    drop(pool);
    stack.stop().await;
}

/// `/queues` shows each configured queue as the broker holds it, with the rates of recent jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queues_show_what_waits_in_each_configured_queue() {
    for url in BROKERS {
        let routed = format!("test-web-routed-{}", uuid::Uuid::new_v4().simple());
        let route = runtime::config::Route::Queue(routed.clone());
        let stack = Stack::start_with(url, false, |config| {
            config.task_routes.insert("tasks.mul".into(), route);
        })
        .await;
        for i in 0..3 {
            stack
                .submit(json!({"task": "tasks.add", "args": [i, i]}))
                .await;
        }
        // Published after their answers: listed once the broker holds all three.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let body = loop {
            let (status, body) = stack.get("/queues").await;
            assert_eq!(status, Status::Ok, "{body}");
            let default =
                body["queues"].as_array().unwrap().iter().find(|q| {
                    q["name"] == stack.config.task_default_queue.as_str() && q["ready"] == 3
                });
            if default.is_some() || tokio::time::Instant::now() > deadline {
                break body;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let queues = body["queues"].as_array().unwrap();
        let named = |name: &str| {
            queues
                .iter()
                .find(|q| q["name"] == name)
                .unwrap_or_else(|| panic!("{name} not listed: {body}"))
        };
        let default = named(&stack.config.task_default_queue);
        assert_eq!(
            (&default["exists"], &default["ready"]),
            (&json!(true), &json!(3)),
            "{url}: {body}"
        );
        assert_eq!(default["jobs_recorded_per_second"], json!(3.0 / 60.0));
        assert_eq!(default["jobs_finished_per_second"], json!(0.0));
        let on_redis = url.starts_with("redis");
        let expected = if on_redis {
            json!({"unacked": 0, "consumers": null})
        } else {
            json!({"unacked": null, "consumers": 0})
        };
        assert_eq!(
            json!({"unacked": default["unacked"], "consumers": default["consumers"]}),
            expected,
            "{url}"
        );
        // No message was ever sent there: AMQP knows the queue is not there yet.
        assert_eq!(named(&routed)["exists"], json!(on_redis), "{url}: {body}");
        assert_eq!(named(&routed)["ready"], json!(0));
        stack.stop().await;
    }
}

/// Replicas started together each migrate at start: they take turns, and all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_migrating_at_once_all_succeed() {
    let database = format!("rcelery_test_{}", uuid::Uuid::new_v4().simple());
    admin(&format!("CREATE DATABASE {database}")).await;
    let url = format!("{POSTGRES}/{database}");
    let results = futures::future::join_all((0..4).map(|_| web::db::migrate(&url))).await;
    for result in results {
        result.unwrap();
    }
    let pool = web::db::pool(&url, 1).unwrap();
    let mut connection = pool.get().await.unwrap();
    assert_eq!(
        web::store::awaiting_publish(&mut connection).await.unwrap(),
        0
    );
    drop(connection);
    drop(pool);
    admin(&format!("DROP DATABASE {database} WITH (FORCE)")).await;
}

/// With `broker_api`, `/queues` reads RabbitMQ's management API: unacked messages and consumers,
/// and the publish rate AMQP does not tell. RabbitMQ samples them every few seconds, and a rate
/// needs two samples of a queue: jobs keep arriving (a few a second, bounded by the deadline)
/// until the rate shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_broker_api_queues_show_unacked_and_rates_from_rabbitmq() {
    let stack = Stack::start_with(BROKERS[0], false, |config| {
        config.broker_api = Some("http://guest:guest@127.0.0.1:15672/api/".into());
    })
    .await;
    let queue = stack.config.task_default_queue.clone();
    for i in 0..3 {
        stack
            .submit(json!({"task": "tasks.add", "args": [i, i]}))
            .await;
    }
    let broker = runtime::broker::connect(BROKERS[0]).await.unwrap();
    let mut deliveries = broker
        .consume(std::slice::from_ref(&queue), 2)
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(deliveries.recv().await.unwrap());
    }
    let (mut saw_publishes, mut saw_held) = (false, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(saw_publishes && saw_held) {
        stack
            .submit(json!({"task": "tasks.add", "args": [1, 1]}))
            .await;
        let (status, body) = stack.get("/queues").await;
        assert_eq!(status, Status::Ok, "{body}");
        let view = body["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == queue.as_str())
            .unwrap()
            .clone();
        assert!(view["acked_per_second"].is_number(), "{view}");
        saw_publishes |= view["published_per_second"].as_f64().unwrap() > 0.0;
        saw_held |= view["ready"].as_u64().unwrap() >= 1
            && (&view["unacked"], &view["consumers"]) == (&json!(2), &json!(1));
        assert!(
            tokio::time::Instant::now() < deadline,
            "the management API never showed publishes and 2 held by 1 consumer: {view}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for delivery in held {
        delivery.settle.ack().await.unwrap();
    }
    broker.close().await.unwrap();
    stack.stop().await;
}

/// A replica whose row another replica already moved still tells its own stream listeners:
/// the final state reaches a stream on any replica, and the stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_ends_when_another_replica_recorded_the_final_state() {
    use runtime::protocol::result::ResultMeta;

    let stack = Stack::start(BROKERS[1], false).await;
    let id = uuid::Uuid::new_v4();
    let job = web::store::NewJob::single(
        id,
        "tasks.add".into(),
        json!([2, 3]),
        json!({}),
        stack.config.task_default_queue.clone(),
    );
    let pool = web::db::pool(&stack.config.database_url, 1).unwrap();
    let mut connection = pool.get().await.unwrap();
    web::store::insert(&mut connection, &[job]).await.unwrap();
    let stream = stack
        .client
        .get(format!("/status/{id}/stream"))
        .dispatch()
        .await;
    assert_eq!(stream.status(), Status::Ok);
    // The other replica's tracker got there first: this one's update moves nothing.
    let done = ResultMeta::new(&id.to_string(), "SUCCESS", json!(5), chrono::Utc::now());
    assert!(web::store::apply(&mut connection, id, &done).await.unwrap());
    let backend = runtime::backend::RedisBackend::connect(
        stack.config.result_backend.as_deref().unwrap(),
        600,
        None,
    )
    .await
    .unwrap();
    backend.store(&done).await.unwrap();
    let events = tokio::time::timeout(Duration::from_secs(5), stream.into_string())
        .await
        .expect("the stream ended well before its recheck")
        .unwrap();
    let last = events
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .next_back()
        .map(|data| serde_json::from_str::<Value>(data.trim()).unwrap())
        .unwrap();
    assert_eq!(
        (&last["state"], &last["result"]),
        (&json!("SUCCESS"), &json!(5))
    );
    drop(connection);
    drop(pool);
    stack.stop().await;
}

/// Streams are bounded: `web_max_streams` open at once (503 past it, a slot freed when a
/// stream ends), each ends after `web_stream_max_seconds` though its job is not final, and a
/// stream opened with a JWT ends when the JWT does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_are_capped_in_number_lifetime_and_by_their_jwt() {
    use jsonwebtoken::{encode, get_current_timestamp, EncodingKey, Header as JwtHeader};

    const SECRET: &str = "web-test-jwt-secret-of-32-bytes!";
    let stack = Stack::start_with(BROKERS[1], false, |c| {
        c.web_max_streams = 1;
        c.web_stream_max_seconds = 2;
        c.web_jwt_secret = Some(SECRET.into());
    })
    .await;
    let token = |exp: u64| {
        let claims = json!({ "exp": exp });
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let token = encode(&JwtHeader::default(), &claims, &key).unwrap();
        Header::new("Authorization", format!("Bearer {token}"))
    };
    let lasting = token(get_current_timestamp() + 3600);
    let submitted = stack
        .client
        .post("/receive")
        .header(ContentType::JSON)
        .header(lasting.clone())
        .body(r#"{"task":"tasks.add","args":[1,2]}"#)
        .dispatch()
        .await;
    let id = submitted.into_json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let open = |credential: Header<'static>| {
        stack
            .client
            .get(format!("/status/{id}/stream"))
            .header(credential)
            .dispatch()
    };
    // No worker: the job stays PENDING, so only the bounds can end these streams.
    let first = open(lasting.clone()).await;
    assert_eq!(first.status(), Status::Ok);
    let refused = open(lasting.clone()).await;
    assert_eq!(refused.status(), Status::ServiceUnavailable);
    let answer: Value = refused.into_json().await.unwrap();
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("web_max_streams"),
        "{answer}"
    );
    let events = tokio::time::timeout(Duration::from_secs(10), first.into_string())
        .await
        .expect("the stream outlived web_stream_max_seconds")
        .unwrap();
    assert!(events.contains("PENDING"), "{events}");
    // Its slot is free again. A JWT already past its exp, within the 30 s leeway, ends its
    // stream a second after it opened: before web_stream_max_seconds.
    let expiring = token(get_current_timestamp() - 29);
    let opened = tokio::time::Instant::now();
    let second = open(expiring).await;
    assert_eq!(second.status(), Status::Ok);
    tokio::time::timeout(Duration::from_secs(10), second.into_string())
        .await
        .expect("the stream outlived its JWT")
        .unwrap();
    assert!(
        opened.elapsed() < Duration::from_millis(1900),
        "{:?}",
        opened.elapsed()
    );
    stack.stop().await;
}

/// Rows the backend never reports on do not hold the head of every sweep: a row behind a full
/// batch of them is reached by the next sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweep_reaches_past_rows_the_backend_never_reports_on() {
    use runtime::protocol::result::ResultMeta;
    use web::store;

    let database = format!("rcelery_test_{}", uuid::Uuid::new_v4().simple());
    admin(&format!("CREATE DATABASE {database}")).await;
    let url = format!("{POSTGRES}/{database}");
    web::db::migrate(&url).await.unwrap();
    let pool = web::db::pool(&url, 2).unwrap();
    let job = || {
        store::NewJob::single(
            uuid::Uuid::new_v4(),
            "tasks.add".into(),
            json!([1, 1]),
            json!({}),
            "celery".into(),
        )
    };
    // A full sweep's worth of rows nothing will ever report on, older than the one that moves.
    let stuck: Vec<_> = (0..500).map(|_| job()).collect();
    store::insert(&mut pool.get().await.unwrap(), &stuck)
        .await
        .unwrap();
    let reported = job();
    store::insert(
        &mut pool.get().await.unwrap(),
        std::slice::from_ref(&reported),
    )
    .await
    .unwrap();
    let backend = runtime::backend::RedisBackend::connect("redis://127.0.0.1:6379/0", 600, None)
        .await
        .unwrap();
    let done = ResultMeta::new(
        &reported.task_id.to_string(),
        "SUCCESS",
        json!(2),
        chrono::Utc::now(),
    );
    backend.store(&done).await.unwrap();
    let changes = web::tracking::Changes::default();
    let first = web::tracking::sweep_once(&pool, &backend, &changes)
        .await
        .unwrap();
    let second = web::tracking::sweep_once(&pool, &backend, &changes)
        .await
        .unwrap();
    assert_eq!((first, second), (0, 1));
    let row = store::find(&mut pool.get().await.unwrap(), reported.task_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (row.state.as_str(), row.result),
        ("SUCCESS", Some(json!(2)))
    );
    drop(pool);
    admin(&format!("DROP DATABASE {database} WITH (FORCE)")).await;
}

/// Rows of `table` in the stack's database.
async fn count_rows(stack: &Stack, table: &str) -> i64 {
    common::count(stack, &format!("SELECT * FROM {table}")).await
}

impl Stack {
    /// `POST /receive` of `body` with `Idempotency-Key: key` and, if given, a bearer token:
    /// the status, the answer and its `Location`.
    async fn post_keyed(
        &self,
        key: &str,
        body: &str,
        bearer: Option<&str>,
    ) -> (Status, Value, Option<String>) {
        let mut request = self
            .client
            .post("/receive")
            .header(ContentType::JSON)
            .header(Header::new("Idempotency-Key", key.to_string()))
            .body(body);
        if let Some(token) = bearer {
            request = request.header(Header::new("Authorization", format!("Bearer {token}")));
        }
        let response = request.dispatch().await;
        let status = response.status();
        let location = response.headers().get_one("Location").map(str::to_owned);
        let answer = response.into_json().await.unwrap_or(Value::Null);
        (status, answer, location)
    }
}

/// The first request with a key makes the job (202); a repeat with the same body answers the
/// same (200, same body and Location) and makes nothing; the same key with another body is
/// 422; a malformed key is 400. The job runs, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_makes_one_job_and_its_repeats_answer_it_on_both_brokers() {
    for url in BROKERS {
        let stack = Stack::start(url, true).await;
        let body = r#"{"task":"tasks.add","args":[20,22]}"#;
        let (status, first, location) = stack.post_keyed("order-1", body, None).await;
        assert_eq!(status, Status::Accepted, "{url}: {first}");
        let id = first["task_id"].as_str().unwrap().to_string();
        assert_eq!(location, Some(format!("/status/{id}")));
        for repeat in ["order-1", "\"order-1\""] {
            let (status, again, again_location) = stack.post_keyed(repeat, body, None).await;
            assert_eq!(
                (status, &again, &again_location),
                (Status::Ok, &first, &location),
                "{url}: {repeat}"
            );
        }
        let (status, refused, _) = stack
            .post_keyed("order-1", r#"{"task":"tasks.add","args":[1,1]}"#, None)
            .await;
        assert_eq!(status, Status::UnprocessableEntity, "{refused}");
        assert!(
            refused["error"]
                .as_str()
                .unwrap()
                .contains("Idempotency-Key `order-1` was used with another request body"),
            "{refused}"
        );
        // The same bytes matter, not the same JSON: another spacing is another body.
        let (status, _, _) = stack
            .post_keyed(
                "order-1",
                r#"{"task": "tasks.add", "args": [20, 22]}"#,
                None,
            )
            .await;
        assert_eq!(status, Status::UnprocessableEntity);
        for bad in ["", "caf\u{e9}", &"k".repeat(256)] {
            let (status, answer, _) = stack.post_keyed(bad, body, None).await;
            assert_eq!(status, Status::BadRequest, "{bad:?}: {answer}");
            assert!(
                answer["error"]
                    .as_str()
                    .unwrap()
                    .contains("Idempotency-Key must be 1 to 255 printable ASCII"),
                "{answer}"
            );
        }
        let done = stack.wait_for(&id, "SUCCESS", state_is("SUCCESS")).await;
        assert_eq!(done["result"], json!(42), "{url}: {done}");
        let (status, other, _) = stack.post_keyed("order-2", body, None).await;
        assert_eq!(status, Status::Accepted);
        assert_ne!(other["task_id"], first["task_id"]);
        assert_eq!(count_rows(&stack, "tasks").await, 2, "{url}");
        assert_eq!(count_rows(&stack, "idempotency_keys").await, 2, "{url}");
        stack.stop().await;
    }
}

/// Sixteen requests with one key at once: one job, one 202, and every answer names it. The
/// same for a workflow, whose repeat names the same steps in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_repeats_of_a_key_make_exactly_one_job_or_workflow() {
    let stack = Stack::start(BROKERS[1], false).await;
    let body = r#"{"task":"tasks.add","args":[1,2]}"#;
    let answers =
        futures::future::join_all((0..16).map(|_| stack.post_keyed("burst", body, None))).await;
    let accepted = answers
        .iter()
        .filter(|(status, ..)| *status == Status::Accepted)
        .count();
    let ids: std::collections::BTreeSet<_> = answers
        .iter()
        .map(|(status, answer, _)| {
            assert!([Status::Accepted, Status::Ok].contains(status), "{answer}");
            answer["task_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!((accepted, ids.len()), (1, 1), "{answers:?}");
    assert_eq!(count_rows(&stack, "tasks").await, 1);

    let chain = r#"{"chain":[{"task":"tasks.add","args":[1,2]},{"task":"tasks.mul","args":[10]}]}"#;
    let answers =
        futures::future::join_all((0..16).map(|_| stack.post_keyed("chain", chain, None))).await;
    let first = answers
        .iter()
        .find(|(status, ..)| *status == Status::Accepted)
        .map(|(_, answer, _)| answer.clone())
        .expect("one request made the chain");
    assert_eq!(first["task_ids"].as_array().unwrap().len(), 2, "{first}");
    for (status, answer, location) in &answers {
        assert_eq!(answer, &first);
        assert!([Status::Accepted, Status::Ok].contains(status));
        assert_eq!(location.as_deref(), first["status_url"].as_str());
    }
    assert_eq!(count_rows(&stack, "tasks").await, 3);
    stack.stop().await;
}

/// A key older than `web_idempotency_ttl` is forgotten: a repeat makes a new job (with any
/// body), which the key then names. Expired keys are deleted, fresh ones kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_key_makes_a_new_job_and_is_deleted() {
    let stack = Stack::start(BROKERS[1], false).await;
    let ttl = stack.config.web_idempotency_ttl;
    let mut connection = AsyncPgConnection::establish(&stack.config.database_url)
        .await
        .unwrap();
    let age = |key: &'static str| {
        diesel::sql_query(format!(
            "UPDATE idempotency_keys SET created_at = now() - make_interval(secs => {}) \
             WHERE key = '{key}'",
            ttl + 1
        ))
    };
    let body = r#"{"task":"tasks.add","args":[1,2]}"#;
    let (_, first, _) = stack.post_keyed("old", body, None).await;
    age("old").execute(&mut connection).await.unwrap();
    let other_body = r#"{"task":"tasks.add","args":[3,4]}"#;
    let (status, second, _) = stack.post_keyed("old", other_body, None).await;
    assert_eq!(status, Status::Accepted, "{second}");
    assert_ne!(second["task_id"], first["task_id"]);
    let (status, again, _) = stack.post_keyed("old", other_body, None).await;
    assert_eq!((status, &again), (Status::Ok, &second));
    assert_eq!(count_rows(&stack, "tasks").await, 2);

    stack.post_keyed("fresh", body, None).await;
    age("old").execute(&mut connection).await.unwrap();
    let pool = web::db::pool(&stack.config.database_url, 1).unwrap();
    let ttl = web::idempotency::Ttl(Duration::from_secs(ttl));
    let forgotten = web::idempotency::forget_expired_once(&pool, ttl)
        .await
        .unwrap();
    assert_eq!(forgotten, 1);
    assert_eq!(count_rows(&stack, "idempotency_keys").await, 1);
    let (status, _, _) = stack.post_keyed("fresh", body, None).await;
    assert_eq!(status, Status::Ok, "the fresh key is kept");
    drop(pool);
    drop(connection);
    stack.stop().await;
}

/// Keys are per JWT subject: two callers' same key makes two jobs; callers without a subject
/// share one scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_are_scoped_per_jwt_subject() {
    use jsonwebtoken::{encode, get_current_timestamp, EncodingKey, Header as JwtHeader};

    const SECRET: &str = "web-test-jwt-secret-of-32-bytes!";
    let stack = Stack::start_with(BROKERS[1], false, |c| {
        c.web_jwt_secret = Some(SECRET.into())
    })
    .await;
    let token = |claims: Value| {
        encode(
            &JwtHeader::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let exp = get_current_timestamp() + 300;
    let (alice, bob) = (
        token(json!({"sub": "alice", "exp": exp})),
        token(json!({"sub": "bob", "exp": exp})),
    );
    let (nobody, someone_else) = (token(json!({"exp": exp})), token(json!({"exp": exp + 1})));
    let body = r#"{"task":"tasks.add","args":[1,2]}"#;
    let shared = &stack;
    let post = |bearer: String| async move {
        shared
            .post_keyed("shared-key", body, Some(bearer.as_str()))
            .await
    };
    let a = post(alice.clone()).await;
    let b = post(bob).await;
    assert_eq!((a.0, b.0), (Status::Accepted, Status::Accepted));
    assert_ne!(a.1["task_id"], b.1["task_id"]);
    assert_eq!(post(alice).await.1, a.1);
    let anonymous = post(nobody).await;
    assert_eq!(anonymous.0, Status::Accepted);
    assert_eq!(
        post(someone_else).await,
        (Status::Ok, anonymous.1, anonymous.2)
    );
    assert_eq!(count_rows(&stack, "tasks").await, 3);
    stack.stop().await;
}
