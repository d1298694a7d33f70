//! Values in, values out: `identity`, the `add` family, `mul`, the sums, `sleeping`, and the
//! pydantic-typed `add`s.

use std::time::Duration;

use celery::error::TaskError;
use celery::task::TaskResult;
use runtime::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

pub(crate) fn register(registry: Registry) -> Registry {
    registry
        .task::<identity>()
        .task::<add>()
        .task::<add_not_typed>()
        .task::<add_ignore_result>()
        .task::<add_with_result>()
        .task::<add_pydantic>()
        .task::<add_pydantic_string_annotations>()
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

/// `x + y`, its arguments not checked by the caller (Python's `typing=False`): a bad call fails
/// in the worker with `TypeError`.
#[celery::task(name = "t.integration.tasks.add_not_typed")]
pub fn add_not_typed(x: i64, y: i64) -> TaskResult<i64> {
    sum(&[x, y])
}

/// `x + y`; the caller's task declares `ignore_result=True`, which its messages carry.
#[celery::task(name = "t.integration.tasks.add_ignore_result")]
pub fn add_ignore_result(x: i64, y: i64) -> TaskResult<i64> {
    sum(&[x, y])
}

/// `x + y`; the caller's task declares `ignore_result=False`.
#[celery::task(name = "t.integration.tasks.add_with_result")]
pub fn add_with_result(x: i64, y: i64) -> TaskResult<i64> {
    sum(&[x, y])
}

/// The suite's pydantic `AddParameterModel`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AddParameters {
    x: i64,
    y: i64,
}

/// The suite's pydantic `AddResultModel`.
#[derive(Debug, Clone, Serialize)]
pub struct AddResult {
    result: i64,
}

/// `{x, y}` in, `{result: x + y}` out: the model the Python task validates, as a struct.
#[celery::task(name = "t.integration.tasks.add_pydantic")]
pub fn add_pydantic(data: AddParameters) -> TaskResult<AddResult> {
    add_parameters(&data)
}

/// `add_pydantic` again, its Python annotations being strings.
#[celery::task(name = "t.integration.tasks.add_pydantic_string_annotations")]
pub fn add_pydantic_string_annotations(data: AddParameters) -> TaskResult<AddResult> {
    add_parameters(&data)
}

fn add_parameters(data: &AddParameters) -> TaskResult<AddResult> {
    Ok(AddResult {
        result: sum(&[data.x, data.y])?,
    })
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

/// Sleeps `i` seconds (a float, as Python's `sleep`), returning nothing; other keyword arguments
/// are taken and ignored.
#[celery::task(name = "t.integration.tasks.sleeping")]
pub async fn sleeping(i: Number, var_kwargs: Map<String, Value>) -> TaskResult<()> {
    let _ = var_kwargs;
    let seconds = i.as_f64().filter(|s| s.is_finite() && *s >= 0.0);
    let seconds =
        seconds.ok_or_else(|| TaskError::UnexpectedError(format!("cannot sleep {i} s")))?;
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    Ok(())
}
