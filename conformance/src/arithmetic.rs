//! Values in, values out: `identity`, `add`, `mul`, the sums, and `sleeping`.

use std::time::Duration;

use celery::error::TaskError;
use celery::task::TaskResult;
use runtime::registry::Registry;
use serde_json::{Number, Value};

pub(crate) fn register(registry: Registry) -> Registry {
    registry
        .task::<identity>()
        .task::<add>()
        .task::<mul>()
        .task::<tsum>()
        .task::<xsum>()
        .task::<sleeping>()
}

/// Returns its argument.
#[celery::task(name = "t.integration.tasks.identity")]
pub fn identity(x: Value) -> TaskResult<Value> {
    Ok(x)
}

/// `x + y`, plus `z` when given.
#[celery::task(name = "t.integration.tasks.add")]
pub fn add(x: i64, y: i64, z: Option<i64>) -> TaskResult<i64> {
    x.checked_add(y)
        .and_then(|sum| sum.checked_add(z.unwrap_or(0)))
        .ok_or_else(|| TaskError::UnexpectedError("integer overflow".into()))
}

/// `x * y`.
#[celery::task(name = "t.integration.tasks.mul")]
pub fn mul(x: i64, y: i64) -> TaskResult<i64> {
    x.checked_mul(y)
        .ok_or_else(|| TaskError::UnexpectedError("integer overflow".into()))
}

/// The sum of a list of integers.
#[celery::task(name = "t.integration.tasks.tsum")]
pub fn tsum(nums: Vec<i64>) -> TaskResult<i64> {
    sum(&nums)
}

/// The sum of a list whose elements are integers or lists of integers.
#[celery::task(name = "t.integration.tasks.xsum")]
pub fn xsum(nums: Vec<Value>) -> TaskResult<i64> {
    let flat = nums
        .iter()
        .map(|num| match num {
            Value::Array(inner) => inner
                .iter()
                .map(integer)
                .collect::<TaskResult<Vec<_>>>()
                .and_then(|inner| sum(&inner)),
            other => integer(other),
        })
        .collect::<TaskResult<Vec<_>>>()?;
    sum(&flat)
}

fn integer(value: &Value) -> TaskResult<i64> {
    value
        .as_i64()
        .ok_or_else(|| TaskError::UnexpectedError(format!("not an integer: {value}")))
}

fn sum(nums: &[i64]) -> TaskResult<i64> {
    nums.iter()
        .try_fold(0i64, |total, n| total.checked_add(*n))
        .ok_or_else(|| TaskError::UnexpectedError("integer overflow".into()))
}

/// Sleeps `i` seconds (a float, as Python's `sleep`), returning nothing.
#[celery::task(name = "t.integration.tasks.sleeping")]
pub async fn sleeping(i: Number) -> TaskResult<()> {
    let seconds = i.as_f64().filter(|s| s.is_finite() && *s >= 0.0);
    let seconds =
        seconds.ok_or_else(|| TaskError::UnexpectedError(format!("cannot sleep {i} s")))?;
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    Ok(())
}
