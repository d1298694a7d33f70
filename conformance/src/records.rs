//! Tasks that leave a trace in Redis for the suite to wait on (`redis_echo`, `redis_count`, the
//! errbacks), at `REDIS_HOST`/`REDIS_PORT` database 0 as the suite's `get_redis_connection`,
//! whatever the result backend is; and `write_to_file_and_return_int`, which leaves its trace in
//! a file.

use std::io::Write;

use celery::error::TaskError;
use celery::task::TaskResult;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use runtime::registry::Registry;
use serde_json::Value;
use tokio::sync::OnceCell;

pub(crate) fn register(registry: Registry) -> Registry {
    registry
        .task::<redis_echo>()
        .task::<redis_echo_group_id>()
        .task::<redis_count>()
        .task::<errback_old_style>()
        .task::<errback_old_style_with_args>()
        .task::<errback_new_style>()
        .task::<errback_new_style_with_args>()
        .blocking_task::<write_to_file_and_return_int>()
}

/// One connection for all tasks of this worker, made on first use.
async fn connection() -> TaskResult<ConnectionManager> {
    static CONNECTION: OnceCell<ConnectionManager> = OnceCell::const_new();
    CONNECTION
        .get_or_try_init(|| async {
            let host = std::env::var("REDIS_HOST").unwrap_or_else(|_| "localhost".into());
            let port = std::env::var("REDIS_PORT").unwrap_or_else(|_| "6379".into());
            let client = redis::Client::open(format!("redis://{host}:{port}/0"))?;
            ConnectionManager::new(client).await
        })
        .await
        .cloned()
        .map_err(redis_error)
}

fn redis_error(error: redis::RedisError) -> TaskError {
    TaskError::UnexpectedError(format!("redis: {error}"))
}

pub(crate) async fn push(key: &str, message: &Value) -> TaskResult<()> {
    connection()
        .await?
        .rpush::<_, _, ()>(key, stored(message))
        .await
        .map_err(redis_error)
}

/// What redis-py stores for `message` as Python received it: the characters of text, the bytes
/// of `bytes` (which kombu's JSON sends as `{"__type__": "bytes", "__value__": text}`), and the
/// JSON of anything else.
fn stored(message: &Value) -> String {
    match message {
        Value::String(text) => text.clone(),
        Value::Object(tagged) if tagged.get("__type__") == Some(&Value::from("bytes")) => {
            match tagged.get("__value__") {
                Some(Value::String(text)) => text.clone(),
                _ => message.to_string(),
            }
        }
        other => other.to_string(),
    }
}

async fn increment(key: &str) -> TaskResult<()> {
    connection()
        .await?
        .incr::<_, _, ()>(key, 1)
        .await
        .map_err(redis_error)
}

/// Appends `message` to the list `redis_key` (default `redis-echo`).
#[celery::task(name = "t.integration.tasks.redis_echo")]
pub async fn redis_echo(message: Value, redis_key: Option<String>) -> TaskResult<()> {
    push(redis_key.as_deref().unwrap_or("redis-echo"), &message).await
}

/// Appends the id of the group this task runs in to `redis_key` (default `redis-group-ids`);
/// its first argument (the previous step's result) is not used.
#[celery::task(name = "t.integration.tasks.redis_echo_group_id")]
pub async fn redis_echo_group_id(_previous: Value, redis_key: Option<String>) -> TaskResult<()> {
    let group = runtime::progress::request()
        .and_then(|request| request.group.clone())
        .ok_or_else(|| TaskError::UnexpectedError("not run as a group member".into()))?;
    push(
        redis_key.as_deref().unwrap_or("redis-group-ids"),
        &Value::String(group),
    )
    .await
}

/// Increments `redis_key` (default `redis-count`).
#[celery::task(name = "t.integration.tasks.redis_count")]
pub async fn redis_count(redis_key: Option<String>) -> TaskResult<()> {
    increment(redis_key.as_deref().unwrap_or("redis-count")).await
}

/// An errback given the failed task's id: counts it at that id, and returns it.
#[celery::task(name = "t.integration.tasks.errback_old_style")]
pub async fn errback_old_style(request_id: String) -> TaskResult<String> {
    increment(&request_id).await?;
    Ok(request_id)
}

/// An errback given the failed task's id and a stored `label`: appends the label at that id.
#[celery::task(name = "t.integration.tasks.errback_old_style_with_args")]
pub async fn errback_old_style_with_args(request_id: String, label: Value) -> TaskResult<()> {
    push(&request_id, &label).await
}

/// An errback called with the failed request, its exception and traceback: counts at the
/// request's id, and returns it.
#[celery::task(name = "t.integration.tasks.errback_new_style")]
pub async fn errback_new_style(request: Value, exc: Value, tb: Value) -> TaskResult<String> {
    let _ = (exc, tb);
    let id = request_id(&request)?;
    increment(&id).await?;
    Ok(id)
}

/// An errback called with the failed request, its exception and traceback, and a stored
/// `label`: appends the label at the request's id.
#[celery::task(name = "t.integration.tasks.errback_new_style_with_args")]
pub async fn errback_new_style_with_args(
    request: Value,
    exc: Value,
    tb: Value,
    label: Value,
) -> TaskResult<()> {
    let _ = (exc, tb);
    push(&request_id(&request)?, &label).await
}

fn request_id(request: &Value) -> TaskResult<String> {
    request["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| TaskError::UnexpectedError(format!("a request without its id: {request}")))
}

/// Appends `i` as a line to `file_name`, and returns it.
#[celery::task(name = "t.integration.tasks.write_to_file_and_return_int")]
pub fn write_to_file_and_return_int(file_name: String, i: i64) -> TaskResult<i64> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file_name)
        .and_then(|mut file| writeln!(file, "{i}"))
        .map_err(|error| TaskError::UnexpectedError(format!("{file_name}: {error}")))?;
    Ok(i)
}
