//! Tasks that answer with what their own request says (Celery's `self.request`): `ids`,
//! `collect_ids`, `return_priority`, `return_request_eta`.

use std::sync::Arc;

use celery::error::TaskError;
use celery::task::TaskResult;
use runtime::protocol::TaskRequest;
use runtime::registry::Registry;
use serde_json::{json, Value};

pub(crate) fn register(registry: Registry) -> Registry {
    registry
        .task::<ids>()
        .task::<collect_ids>()
        .task::<return_priority>()
        .task::<return_request_eta>()
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
