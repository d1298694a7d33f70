//! Unique jobs of `POST /receive` against real PostgreSQL, a real broker and Redis: the lock is
//! taken before the row commits (a refused request is 409 naming the holder and writes nothing),
//! given back when the commit fails, held by a workflow's first steps, carried by the outbox's
//! publish from the row, and given back by our worker when the job ends. Each test has a
//! database and a queue of its own, and locks named after its own random arguments or keys.

mod common;

use std::time::Duration;

use common::{count, Stack, BROKERS};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use redis::AsyncCommands;
use rocket::http::{ContentType, Header, Status};
use runtime::unique;
use serde_json::{json, Map, Value};

/// The result backend the stacks use, which holds the locks.
const REDIS: &str = "redis://127.0.0.1:6379/0";

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The task id holding lock `name`, if any.
async fn holder(name: &str) -> Option<String> {
    redis().await.get(unique::lock_key(name)).await.unwrap()
}

/// A number no other run uses, so the lock named after a call with it is this run's.
fn fresh() -> u64 {
    uuid::Uuid::new_v4().as_u128() as u64 >> 12
}

/// The lock name of `task` called with `args`.
fn lock_of(task: &str, args: Value) -> String {
    unique::lock_name(task, args.as_array().unwrap(), &Map::new())
}

async fn sql(stack: &Stack, statement: &str) {
    let mut connection = AsyncPgConnection::establish(&stack.config.database_url)
        .await
        .unwrap();
    diesel::sql_query(statement)
        .execute(&mut connection)
        .await
        .unwrap();
}

/// `POST /receive` of `body` with `Idempotency-Key: key`.
async fn post_keyed(stack: &Stack, key: &str, body: &Value) -> (Status, Value) {
    let response = stack
        .client
        .post("/receive")
        .header(ContentType::JSON)
        .header(Header::new("Idempotency-Key", key.to_string()))
        .body(body.to_string())
        .dispatch()
        .await;
    let status = response.status();
    (status, response.into_json().await.unwrap_or(Value::Null))
}

/// Checks a 409 names `holder` and its status URL.
fn assert_refused_for(status: Status, answer: &Value, holder: &str) {
    assert_eq!(status, Status::Conflict, "{answer}");
    assert_eq!(answer["holder"], holder, "{answer}");
    assert_eq!(
        answer["status_url"],
        format!("/status/{holder}"),
        "{answer}"
    );
    assert!(
        answer["error"].as_str().unwrap().contains("is not unique"),
        "{answer}"
    );
}

/// While a unique job is queued or running, the same call is 409 naming it and writes no row;
/// the row records the lock; a call not asking to be unique is taken; once the job has ended
/// (the worker gives the lock back) the same call is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_unique_job_is_409_naming_its_holder_until_it_ends_on_both_brokers() {
    for url in BROKERS {
        let stack = Stack::start_with(url, true, |c| {
            c.web_allowed_tasks.push("tasks.sleep".into())
        })
        .await;
        let key = format!("web-test-{}", fresh());
        let body =
            json!({"task": "tasks.sleep", "args": [1.0], "unique_for": 60, "unique_key": key});
        let first = stack.submit(body.clone()).await;
        let (status, refused) = stack.post(&body.to_string()).await;
        assert_refused_for(status, &refused, &first);
        assert_eq!(holder(&key).await.as_deref(), Some(first.as_str()), "{url}");
        assert_eq!(count(&stack, "SELECT * FROM tasks").await, 1, "{url}");
        let recorded = format!(
            "SELECT * FROM tasks WHERE task_id = '{first}' AND unique_key = '{key}' AND unique_for = 60"
        );
        assert_eq!(
            count(&stack, &recorded).await,
            1,
            "{url}: the row keeps its lock"
        );
        // Not asking to be unique: taken, lock or not.
        stack
            .submit(json!({"task": "tasks.sleep", "args": [0.0]}))
            .await;

        stack
            .wait_for(&first, "the unique job to end", |job| {
                job["state"] == "SUCCESS"
            })
            .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let again = loop {
            let (status, answer) = stack.post(&body.to_string()).await;
            if status == Status::Accepted {
                break answer["task_id"].as_str().unwrap().to_string();
            }
            assert_refused_for(status, &answer, &first);
            assert!(
                tokio::time::Instant::now() < deadline,
                "{url}: the lock was never given back"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        stack
            .wait_for(&again, "the second job to end", |job| {
                job["state"] == "SUCCESS"
            })
            .await;
        stack.stop().await;
    }
}

/// `task_annotations` make every job of a task unique without asking, a chain's first step
/// and a group's members too; a group refused at its second member gives back the lock its first
/// took; a chain's later steps cannot ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_task_s_annotation_makes_its_jobs_and_workflows_first_steps_unique() {
    let stack = Stack::start_with(BROKERS[1], false, |c| {
        c.task_annotations.insert(
            "tasks.add".into(),
            runtime::config::TaskAnnotation {
                unique_for: Some(60.0),
                ..Default::default()
            },
        );
    })
    .await;
    let n = fresh();
    let add = json!({"task": "tasks.add", "args": [n, 1]});
    let first = stack.submit(add.clone()).await;
    let (status, refused) = stack.post(&add.to_string()).await;
    assert_refused_for(status, &refused, &first);

    let chain = json!({"chain": [add.clone(), {"task": "tasks.mul", "args": [2]}]});
    let (status, refused) = stack.post(&chain.to_string()).await;
    assert_refused_for(status, &refused, &first);

    let mul_args = json!([n, 3]);
    let group = json!({"group": [{"task": "tasks.mul", "args": mul_args, "unique_for": 60}, add]});
    let (status, refused) = stack.post(&group.to_string()).await;
    assert_refused_for(status, &refused, &first);
    assert_eq!(
        holder(&lock_of("tasks.mul", mul_args)).await,
        None,
        "the member's lock given back"
    );
    assert_eq!(count(&stack, "SELECT * FROM tasks").await, 1);

    let (status, answer) = stack
        .post(&json!({"chain": [{"task": "tasks.mul", "args": [1, 2]}, {"task": "tasks.add", "args": [1], "unique_for": 5}]}).to_string())
        .await;
    assert_eq!(status, Status::UnprocessableEntity, "{answer}");

    // Another call of the task is another lock; a chain starting with it holds it by its first step.
    let other = json!({"task": "tasks.add", "args": [n, 2]});
    let (status, chained) = stack
        .post(&json!({"chain": [other.clone(), {"task": "tasks.mul", "args": [2]}]}).to_string())
        .await;
    assert_eq!(status, Status::Accepted, "{chained}");
    let first_step = chained["task_ids"][0].as_str().unwrap();
    assert_eq!(
        holder(&lock_of("tasks.add", json!([n, 2])))
            .await
            .as_deref(),
        Some(first_step)
    );
    let (status, refused) = stack.post(&other.to_string()).await;
    assert_refused_for(status, &refused, first_step);
    stack.stop().await;
    for args in [json!([n, 1]), json!([n, 2])] {
        let _: () = redis()
            .await
            .del(unique::lock_key(&lock_of("tasks.add", args)))
            .await
            .unwrap();
    }
}

/// A request whose rows do not commit gives its lock back, with or without an
/// `Idempotency-Key`; with a key, a repeat is answered 200 (its first holds the lock), another
/// key with the same unique call is 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lock_is_given_back_when_the_rows_do_not_commit_and_a_key_s_repeat_is_200() {
    let stack = Stack::start(BROKERS[1], false).await;
    sql(
        &stack,
        "ALTER TABLE tasks ADD CONSTRAINT no_mul CHECK (task_name <> 'tasks.mul')",
    )
    .await;
    let n = fresh();
    let mul = json!({"task": "tasks.mul", "args": [n, 1], "unique_for": 60});
    let (status, answer) = stack.post(&mul.to_string()).await;
    assert_eq!(status, Status::InternalServerError, "{answer}");
    assert_eq!(
        holder(&lock_of("tasks.mul", json!([n, 1]))).await,
        None,
        "given back"
    );
    let (status, answer) = post_keyed(&stack, &format!("k-{n}"), &mul).await;
    assert_eq!(status, Status::InternalServerError, "{answer}");
    assert_eq!(
        holder(&lock_of("tasks.mul", json!([n, 1]))).await,
        None,
        "given back"
    );

    let add = json!({"task": "tasks.add", "args": [n, 1], "unique_for": 60});
    let (status, first) = post_keyed(&stack, &format!("a-{n}"), &add).await;
    assert_eq!(status, Status::Accepted, "{first}");
    let (status, repeat) = post_keyed(&stack, &format!("a-{n}"), &add).await;
    assert_eq!((status, &repeat), (Status::Ok, &first));
    let (status, refused) = post_keyed(&stack, &format!("b-{n}"), &add).await;
    assert_refused_for(status, &refused, first["task_id"].as_str().unwrap());
    assert_eq!(count(&stack, "SELECT * FROM tasks").await, 1);
    assert_eq!(count(&stack, "SELECT * FROM idempotency_keys").await, 1);
    stack.stop().await;
    let _: () = redis()
        .await
        .del(unique::lock_key(&lock_of("tasks.add", json!([n, 1]))))
        .await
        .unwrap();
}

/// A unique row the outbox publishes (its first publish lost, its lease over) names its lock in
/// the message: the worker gives the lock back when the job ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_outbox_publishes_a_unique_row_with_its_lock_on_both_brokers() {
    for url in BROKERS {
        let stack = Stack::start(url, true).await;
        let id = uuid::Uuid::new_v4();
        let key = format!("outbox-{}", fresh());
        let taken: bool = redis::cmd("SET")
            .arg(unique::lock_key(&key))
            .arg(id.to_string())
            .arg("NX")
            .arg("EX")
            .arg(60)
            .query_async(&mut redis().await)
            .await
            .unwrap();
        assert!(taken);
        let row = web::store::NewJob {
            unique_key: Some(key.clone()),
            unique_for: Some(60),
            ..web::store::NewJob::single(
                id,
                "tasks.add".into(),
                json!([2, 3]),
                json!({}),
                stack.config.task_default_queue.clone(),
            )
        };
        let mut connection = AsyncPgConnection::establish(&stack.config.database_url)
            .await
            .unwrap();
        web::store::insert(&mut connection, std::slice::from_ref(&row))
            .await
            .unwrap();
        web::store::release(&mut connection, &[id]).await.unwrap();
        let done = stack
            .wait_for(&id.to_string(), "the outbox's job to end", |job| {
                job["state"] == "SUCCESS"
            })
            .await;
        assert_eq!(done["result"], 5);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while holder(&key).await.is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{url}: the lock was not given back"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stack.stop().await;
    }
}
