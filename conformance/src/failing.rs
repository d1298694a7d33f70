//! Tasks that fail on purpose: `fail` with the suite's own `ExpectedException`, `raise_error`
//! with a `ValueError`; both take and ignore any arguments (`fail` reports them).

use celery::task::TaskResult;
use runtime::protocol::result::ExceptionInfo;
use runtime::raise::raise;
use runtime::registry::Registry;
use serde_json::Value;

pub(crate) fn register(registry: Registry) -> Registry {
    registry.task::<fail>().task::<raise_error>()
}

/// The suite's own exception class, re-raised as such by Python callers.
const SUITE_MODULE: &str = "t.integration.tasks";

/// Raises `ExpectedException("Task expected to fail", *var_args)`.
#[celery::task(name = "t.integration.tasks.fail")]
pub fn fail(var_args: Vec<Value>) -> TaskResult<()> {
    let mut args = vec![Value::from("Task expected to fail")];
    args.extend(var_args);
    Err(raise(ExceptionInfo::with_args(
        SUITE_MODULE,
        "ExpectedException",
        args,
    )))
}

/// Raises `ValueError("deliberate error")`.
#[celery::task(name = "t.integration.tasks.raise_error")]
pub fn raise_error(var_args: Vec<Value>) -> TaskResult<()> {
    let _ = var_args;
    Err(raise(ExceptionInfo::builtin(
        "ValueError",
        "deliberate error",
    )))
}
