//! The Rust tasks, defined with rusty-celery's `#[celery::task]` and named as Celery names them.
//!
//! Adding a task: write the function here with `#[celery::task(name = "tasks.<name>")]`, then add
//! one line to [`registry`] (`.task::<name>()`, or `.blocking_task::<name>()` when its code blocks
//! or computes for long).

// The crate's macro implements `Task` inside a const block, which this lint flags.
#![allow(non_local_definitions)]

use celery::error::TaskError;
use celery::task::{Task, TaskResult};
use runtime::canvas::Signature;
use runtime::protocol::result::ExceptionInfo;
use runtime::registry::Registry;
use serde_json::{Number, Value};
use std::time::Duration;

/// The longest the demo tasks `tasks.sleep`, `tasks.busy` and `tasks.progress` run: ten minutes.
/// Their arguments come from whoever may send a task; a longer run is refused with a task error,
/// so one message cannot hold a worker slot for days.
pub const MAX_DEMO_SECONDS: f64 = 600.0;

/// `seconds` as a wait of `task`, if it is within 0 to [`MAX_DEMO_SECONDS`].
fn demo_wait(task: &str, seconds: f64) -> TaskResult<Duration> {
    if !(0.0..=MAX_DEMO_SECONDS).contains(&seconds) {
        return Err(TaskError::UnexpectedError(format!(
            "{task} takes 0 to {MAX_DEMO_SECONDS} seconds, not {seconds}"
        )));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Every task this crate defines.
pub fn registry() -> Registry {
    Registry::new()
        .task::<add>()
        .task::<mul>()
        .blocking_task::<xsum>()
        .task::<echo>()
        .task::<sleep>()
        .task::<fail>()
        .task::<raise_exception>()
        .task::<reject>()
        .task::<requeue_once>()
        .task::<scaled_sum>()
        .task::<progress>()
        .task::<flaky>()
        .blocking_task::<busy>()
}

/// `x + y`.
#[celery::task(name = "tasks.add")]
pub fn add(x: i64, y: i64) -> TaskResult<i64> {
    x.checked_add(y)
        .ok_or_else(|| TaskError::UnexpectedError("integer overflow".into()))
}

/// `x * y`.
#[celery::task(name = "tasks.mul")]
pub fn mul(x: i64, y: i64) -> TaskResult<i64> {
    x.checked_mul(y)
        .ok_or_else(|| TaskError::UnexpectedError("integer overflow".into()))
}

/// The sum of a list, an integer when every element is one (as Python's `sum`).
#[celery::task(name = "tasks.xsum")]
pub fn xsum(numbers: Vec<Number>) -> TaskResult<Value> {
    let integers: Option<Vec<i64>> = numbers.iter().map(Number::as_i64).collect();
    if let Some(total) = integers.and_then(|ints| ints.into_iter().try_fold(0i64, i64::checked_add))
    {
        return Ok(total.into());
    }
    let total: f64 = numbers.iter().filter_map(Number::as_f64).sum();
    Ok(Number::from_f64(total).map_or(Value::Null, Value::Number))
}

/// `sum(numbers) * factor`, worked out by replacing itself with the chain `tasks.xsum(numbers)
/// | tasks.mul(factor)`: the caller's result is the chain's, and the task's links run after it.
#[celery::task(name = "tasks.scaled_sum")]
pub fn scaled_sum(numbers: Value, factor: Value) -> TaskResult<Value> {
    runtime::replace::replace(runtime::chain![
        Signature::new("tasks.xsum", vec![numbers]),
        Signature::new("tasks.mul", vec![factor]),
    ])
}

/// Returns its argument unchanged.
#[celery::task(name = "tasks.echo")]
pub fn echo(value: Value) -> TaskResult<Value> {
    Ok(value)
}

/// Waits `seconds` (at most [`MAX_DEMO_SECONDS`]) without holding a thread, then returns them.
#[celery::task(name = "tasks.sleep")]
pub async fn sleep(seconds: f64) -> TaskResult<f64> {
    tokio::time::sleep(demo_wait("tasks.sleep", seconds)?).await;
    Ok(seconds)
}

/// Always fails with `message`; Python's `get()` raises `RuntimeError(message)`.
#[celery::task(name = "tasks.fail")]
pub fn fail(message: String) -> TaskResult<()> {
    Err(TaskError::UnexpectedError(message))
}

/// Always fails with the Python exception `module.class(*args)`; Python's `get()` raises that
/// class when it can import it.
#[celery::task(name = "tasks.raise_exception")]
pub fn raise_exception(module: String, class: String, args: Vec<Value>) -> TaskResult<()> {
    Err(runtime::raise::raise(ExceptionInfo::with_args(
        &module, &class, args,
    )))
}

/// Rejects its message for good (Celery's `Reject(reason, requeue=False)`): FAILURE is stored
/// with `celery.exceptions.Reject`, which Python's `get()` raises.
#[celery::task(name = "tasks.reject")]
pub fn reject(reason: String) -> TaskResult<()> {
    Err(runtime::raise::reject(reason, false))
}

/// Acks late and rejects its message back to the queue on its first delivery; the broker's
/// redelivery returns `"redelivered"`.
#[celery::task(name = "tasks.requeue_once", acks_late = true)]
pub fn requeue_once() -> TaskResult<String> {
    match runtime::progress::request().is_some_and(|request| request.redelivered) {
        true => Ok("redelivered".into()),
        false => Err(runtime::raise::reject("first delivery", true)),
    }
}

/// Reports `PROGRESS {current, total}` after each of `total` steps of `step_ms`; returns `total`.
/// The steps may take [`MAX_DEMO_SECONDS`] in all.
#[celery::task(name = "tasks.progress")]
pub async fn progress(total: u64, step_ms: u64) -> TaskResult<u64> {
    let all_ms = total.saturating_mul(step_ms) as f64;
    demo_wait("tasks.progress", all_ms / 1e3)?;
    for current in 1..=total {
        tokio::time::sleep(Duration::from_millis(step_ms)).await;
        runtime::progress::report(current, total)
            .map_err(|e| TaskError::UnexpectedError(e.to_string()))?;
    }
    Ok(total)
}

/// Fails with an expected error on its first `failures` runs, then returns how many retries
/// it took: retries with backoff, as Celery users know them.
#[celery::task(
    name = "tasks.flaky",
    bind = true,
    max_retries = 3,
    max_retry_delay = 1
)]
pub fn flaky(task: &Self, failures: u32) -> TaskResult<u32> {
    let retries = task.request().retries;
    if retries < failures {
        return Err(TaskError::ExpectedError(format!(
            "failing on purpose, attempt {}",
            retries + 1
        )));
    }
    Ok(retries)
}

/// Holds its thread for `seconds` (blocking code, run on the blocking pool; at most
/// [`MAX_DEMO_SECONDS`]), then returns them.
#[celery::task(name = "tasks.busy")]
pub fn busy(seconds: f64) -> TaskResult<f64> {
    std::thread::sleep(demo_wait("tasks.busy", seconds)?);
    Ok(seconds)
}
