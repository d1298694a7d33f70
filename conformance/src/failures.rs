//! Tasks that fail on purpose, with the exception classes of the suite's `tasks.py`, so Python's
//! `get()` re-raises the class the suite names; `raise_error` with a `ValueError`.

// The suite passes these parameters by their Python names, `foo` and `bar`.
#![allow(clippy::disallowed_names)]

use celery::task::TaskResult;
use runtime::protocol::result::ExceptionInfo;
use runtime::raise::raise;
use runtime::registry::Registry;
use serde_json::{json, Value};

/// The module the suite's own exception classes live in.
pub(crate) const SUITE_MODULE: &str = "t.integration.tasks";

pub(crate) fn register(registry: Registry) -> Registry {
    registry
        .task::<fail>()
        .task::<fail_unpickleable>()
        .task::<raise_error>()
}

/// The suite's `ExpectedException(*args)`.
pub(crate) fn expected_exception(args: Vec<Value>) -> ExceptionInfo {
    ExceptionInfo::with_args(SUITE_MODULE, "ExpectedException", args)
}

/// The suite's `UnpickleableException(foo, bar)`: its `args` are `(foo,)` only, which is why
/// Python cannot rebuild it and falls back to a plain exception naming the class.
pub(crate) fn unpickleable_exception(foo: Value) -> ExceptionInfo {
    ExceptionInfo::with_args(SUITE_MODULE, "UnpickleableException", vec![foo])
}

/// Raises `ExpectedException("Task expected to fail", *args)`.
#[celery::task(name = "t.integration.tasks.fail")]
pub fn fail(var_args: Vec<Value>) -> TaskResult<()> {
    let mut args = vec![json!("Task expected to fail")];
    args.extend(var_args);
    Err(raise(expected_exception(args)))
}

/// Raises `UnpickleableException(foo, bar)`.
#[celery::task(name = "t.integration.tasks.fail_unpickleable")]
pub fn fail_unpickleable(foo: Value, bar: Value) -> TaskResult<()> {
    let _ = bar;
    Err(raise(unpickleable_exception(foo)))
}

/// Raises `ValueError("deliberate error")`, whatever it is given.
#[celery::task(name = "t.integration.tasks.raise_error")]
pub fn raise_error(var_args: Vec<Value>) -> TaskResult<()> {
    let _ = var_args;
    Err(raise(ExceptionInfo::builtin(
        "ValueError",
        "deliberate error",
    )))
}
