//! The retry family: tasks that ask to run again through `runtime::raise::retry`, as the suite's
//! tasks call Celery's `self.retry(...)`, and report what the retried run saw.

// The suite passes these parameters by their Python names, `foo` and `bar`.
#![allow(clippy::disallowed_names)]

use std::sync::atomic::{AtomicU32, Ordering};

use celery::task::TaskResult;
use runtime::progress;
use runtime::raise::{retry as retry_with, Retry};
use runtime::registry::Registry;
use serde_json::{json, Map, Value};

use crate::failures::{expected_exception, unpickleable_exception};

pub(crate) fn register(registry: Registry) -> Registry {
    registry
        .task::<retry>()
        .task::<retry_unpickleable>()
        .task::<retry_with_args_after_kwargs>()
        .task::<retry_with_kwargs_after_args>()
        .task::<retry_once>()
        .task::<retry_once_ignore_result>()
        .task::<retry_once_with_result>()
        .task::<retry_once_priority>()
        .task::<retry_once_headers>()
}

/// Retries of the running task so far.
fn retries() -> u32 {
    progress::request().map_or(0, |request| request.retries)
}

/// Runs of `retry` with a `return_value` so far in this worker process: the Python task keeps
/// the count on its (per-process) task object.
static ATTEMPTS: AtomicU32 = AtomicU32::new(0);

/// Retries in 5 s with `ExpectedException()`; with a `return_value`, returns it on the fourth
/// run instead (counted per worker process, as the Python task does).
#[celery::task(name = "t.integration.tasks.retry")]
pub fn retry(return_value: Option<Value>) -> TaskResult<Value> {
    if let Some(value) = return_value.filter(crate::truthy) {
        if ATTEMPTS.load(Ordering::SeqCst) >= 3 {
            ATTEMPTS.store(0, Ordering::SeqCst);
            return Ok(value);
        }
        ATTEMPTS.fetch_add(1, Ordering::SeqCst);
    }
    Err(retry_with(Retry {
        exc: Some(expected_exception(vec![])),
        countdown: Some(5.0),
        ..Retry::default()
    }))
}

/// Retries with `UnpickleableException(foo, bar)` and the caller's `retry_kwargs`
/// (`countdown`, `max_retries`).
#[celery::task(name = "t.integration.tasks.retry_unpickleable")]
pub fn retry_unpickleable(
    foo: Value,
    bar: Value,
    retry_kwargs: Map<String, Value>,
) -> TaskResult<()> {
    let _ = bar;
    Err(retry_with(Retry {
        exc: Some(unpickleable_exception(foo)),
        countdown: retry_kwargs.get("countdown").and_then(Value::as_f64),
        max_retries: retry_kwargs
            .get("max_retries")
            .and_then(Value::as_u64)
            .map(|n| n as u32),
        ..Retry::default()
    }))
}

/// Retries once with positional `(foo + 1, bar + 1)`; the retried run reports what it got.
#[celery::task(
    name = "t.integration.tasks.retry_with_args_after_kwargs",
    max_retries = 1
)]
pub fn retry_with_args_after_kwargs(foo: i64, bar: i64, label: Option<Value>) -> TaskResult<Value> {
    if retries() == 0 {
        return Err(retry_with(Retry {
            args: Some(vec![json!(foo + 1), json!(bar + 1)]),
            countdown: Some(0.0),
            ..Retry::default()
        }));
    }
    Ok(json!({"foo": foo, "bar": bar, "label": label, "retries": retries(), "is_eager": false}))
}

/// Retries once with keyword `foo = foo + 1`; the retried run reports what it got.
#[celery::task(
    name = "t.integration.tasks.retry_with_kwargs_after_args",
    max_retries = 1
)]
pub fn retry_with_kwargs_after_args(foo: i64, bar: i64) -> TaskResult<Value> {
    if retries() == 0 {
        let mut kwargs = Map::new();
        kwargs.insert("foo".into(), json!(foo + 1));
        return Err(retry_with(Retry {
            kwargs: Some(kwargs),
            countdown: Some(0.0),
            ..Retry::default()
        }));
    }
    Ok(json!({"foo": foo, "bar": bar, "retries": retries(), "is_eager": false}))
}

/// The retry the `retry_once` tasks ask on their first run.
fn once(countdown: Option<f64>, max_retries: Option<u32>, expires: Option<f64>) -> Retry {
    Retry {
        countdown: Some(countdown.unwrap_or(0.1)),
        max_retries: Some(max_retries.unwrap_or(1)),
        expires,
        ..Retry::default()
    }
}

/// Retries once, then returns its retries (1).
#[celery::task(name = "t.integration.tasks.retry_once", max_retries = 1)]
pub fn retry_once(
    var_args: Vec<Value>,
    expires: Option<f64>,
    max_retries: Option<u32>,
    countdown: Option<f64>,
) -> TaskResult<u32> {
    let _ = var_args;
    match retries() {
        0 => Err(retry_with(once(countdown, max_retries, expires))),
        retried => Ok(retried),
    }
}

/// Retries once (its caller ignores results), then returns its retries.
#[celery::task(name = "t.integration.tasks.retry_once_ignore_result")]
pub fn retry_once_ignore_result() -> TaskResult<u32> {
    match retries() {
        0 => Err(retry_with(Retry {
            countdown: Some(0.0),
            ..Retry::default()
        })),
        retried => Ok(retried),
    }
}

/// Retries once (its caller keeps results), then returns its retries.
#[celery::task(name = "t.integration.tasks.retry_once_with_result")]
pub fn retry_once_with_result() -> TaskResult<u32> {
    match retries() {
        0 => Err(retry_with(Retry {
            countdown: Some(0.0),
            ..Retry::default()
        })),
        retried => Ok(retried),
    }
}

/// Retries once, then returns the priority its retried message was delivered with.
#[celery::task(name = "t.integration.tasks.retry_once_priority", max_retries = 1)]
pub fn retry_once_priority(
    var_args: Vec<Value>,
    expires: Option<f64>,
    max_retries: Option<u32>,
    countdown: Option<f64>,
) -> TaskResult<u8> {
    let _ = (var_args, expires);
    if retries() == 0 {
        return Err(retry_with(once(countdown, max_retries, None)));
    }
    Ok(progress::request().map_or(0, |request| request.properties.priority))
}

/// Retries once, then returns the headers its retried message carried beyond Celery's own.
#[celery::task(name = "t.integration.tasks.retry_once_headers", max_retries = 1)]
pub fn retry_once_headers(
    var_args: Vec<Value>,
    max_retries: Option<u32>,
    countdown: Option<f64>,
) -> TaskResult<Map<String, Value>> {
    let _ = var_args;
    if retries() == 0 {
        return Err(retry_with(once(countdown, max_retries, None)));
    }
    Ok(progress::request().map_or_else(Map::new, |request| request.extra_headers.clone()))
}
