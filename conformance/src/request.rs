//! Tasks that report what they were sent with (Celery's `self.request`): ids, priority, ETA,
//! time limits and properties; and `print_unicode`.

use std::sync::Arc;

use celery::error::TaskError;
use celery::task::TaskResult;
use runtime::progress;
use runtime::protocol::TaskRequest;
use runtime::registry::Registry;
use serde_json::{json, Value};

pub(crate) fn register(registry: Registry) -> Registry {
    registry
        .task::<return_request_time_limits>()
        .task::<task_with_declared_time_limits>()
        .task::<print_unicode>()
        .task::<return_properties>()
        .task::<ids>()
        .task::<collect_ids>()
        .task::<return_priority>()
        .task::<return_request_eta>()
}

/// `{time_limit, soft_time_limit}` of the request, each `None` when the message set none, else
/// `declared` (the task's own `(hard, soft)`).
fn time_limits(declared: (Option<f64>, Option<f64>)) -> Value {
    let (hard, soft) = progress::request().map_or((None, None), |request| request.timelimit);
    json!({"time_limit": hard.or(declared.0), "soft_time_limit": soft.or(declared.1)})
}

/// The request's time limits.
#[celery::task(name = "t.integration.tasks.return_request_time_limits")]
pub fn return_request_time_limits() -> TaskResult<Value> {
    Ok(time_limits((None, None)))
}

/// The request's time limits, the task declaring 60 s hard and 45 s soft.
#[celery::task(
    name = "t.integration.tasks.task_with_declared_time_limits",
    hard_time_limit = 60,
    time_limit = 45
)]
pub fn task_with_declared_time_limits() -> TaskResult<Value> {
    Ok(time_limits((Some(60.0), Some(45.0))))
}

/// The message properties the task was sent with (`self.request.properties`).
#[celery::task(name = "t.integration.tasks.return_properties")]
pub fn return_properties() -> TaskResult<Value> {
    let properties = progress::request().map(|request| request.properties.clone());
    Ok(serde_json::to_value(properties).unwrap_or_default())
}

/// Logs `log_message` as a warning and prints `print_message`, both with non-ASCII text.
#[celery::task(name = "t.integration.tasks.print_unicode")]
pub fn print_unicode(log_message: Option<String>, print_message: Option<String>) -> TaskResult<()> {
    let log_message = log_message.unwrap_or_else(|| "håå®ƒ valmuefrø".into());
    tracing::warn!("{log_message}");
    println!("{}", print_message.as_deref().unwrap_or("hiöäüß"));
    Ok(())
}

fn own_request() -> TaskResult<Arc<TaskRequest>> {
    runtime::progress::request()
        .ok_or_else(|| TaskError::UnexpectedError("not run by a worker".into()))
}

/// `[root_id, parent_id, i]`, in the position of Python's tuple.
fn ids_with(i: Value) -> TaskResult<Value> {
    let request = own_request()?;
    Ok(json!([request.root_id, request.parent_id, i]))
}

/// `[root_id, parent_id, i]` of this run.
#[celery::task(name = "t.integration.tasks.ids")]
pub fn ids(i: Value) -> TaskResult<Value> {
    ids_with(i)
}

/// The previous step's result, then `[root_id, parent_id, i]` of this run.
#[celery::task(name = "t.integration.tasks.collect_ids")]
pub fn collect_ids(res: Value, i: Value) -> TaskResult<Value> {
    Ok(json!([res, ids_with(i)?]))
}

/// `Priority: <n>`, the priority this run was delivered with; any arguments are ignored.
#[celery::task(name = "t.integration.tasks.return_priority")]
pub fn return_priority(var_args: Vec<Value>) -> TaskResult<String> {
    let _ = var_args;
    Ok(format!("Priority: {}", own_request()?.properties.priority))
}

/// This run's ETA in ISO 8601, `null` when it had none.
#[celery::task(name = "t.integration.tasks.return_request_eta")]
pub fn return_request_eta() -> TaskResult<Option<String>> {
    Ok(own_request()?.eta.map(|eta| eta.to_rfc3339()))
}
