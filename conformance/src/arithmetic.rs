//! Values in, values out: `identity`, `return_exception`, the `add` family, `mul`, the sums
//! (`delayed_sum` after a pause), `sleeping`, and the pydantic-typed `add`s.

use std::time::Duration;

use celery::error::TaskError;
use celery::task::TaskResult;
use runtime::protocol::result::ExceptionInfo;
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
        .task::<delayed_sum>()
        .task::<delayed_sum_with_soft_guard>()
        .task::<return_exception>()
}

/// Returns its argument.
#[celery::task(name = "t.integration.tasks.identity")]
pub fn identity(x: Value) -> TaskResult<Value> {
    Ok(x)
}

/// `[e, true]`: the exception an errback is given, and a mark that it came through.
#[celery::task(name = "t.integration.tasks.return_exception")]
pub fn return_exception(e: Value) -> TaskResult<Value> {
    Ok(Value::Array(vec![e, Value::Bool(true)]))
}

/// `x + y`, plus `z` when given and not zero or empty: Python's `+`, so numbers add, and text
/// or lists join.
#[celery::task(name = "t.integration.tasks.add")]
pub fn add(x: Value, y: Value, z: Option<Value>) -> TaskResult<Value> {
    let sum = plus(&x, &y)?;
    match z.filter(crate::truthy) {
        Some(z) => plus(&sum, &z),
        None => Ok(sum),
    }
}

/// Python's `a + b` for the JSON values it is defined on.
fn plus(a: &Value, b: &Value) -> TaskResult<Value> {
    let overflow = || TaskError::UnexpectedError("integer overflow".into());
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => match (a.as_i64(), b.as_i64()) {
            (Some(a), Some(b)) => a.checked_add(b).map(Value::from).ok_or_else(overflow),
            _ => Ok(Value::from(
                a.as_f64().unwrap_or(f64::NAN) + b.as_f64().unwrap_or(f64::NAN),
            )),
        },
        (Value::String(a), Value::String(b)) => Ok(Value::String(format!("{a}{b}"))),
        (Value::Array(a), Value::Array(b)) => Ok(Value::Array([a.as_slice(), b].concat())),
        _ => Err(runtime::raise::raise(ExceptionInfo::builtin(
            "TypeError",
            format!("unsupported operand type(s) for +: {a} and {b}"),
        ))),
    }
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
    tokio::time::sleep(pause(&i)?).await;
    Ok(())
}

/// The sum of `numbers`, after a pause of `pause_time` seconds (default 1) in STARTED.
#[celery::task(name = "t.integration.tasks.delayed_sum")]
pub async fn delayed_sum(numbers: Vec<i64>, pause_time: Option<Number>) -> TaskResult<i64> {
    tokio::time::sleep(pause(&pause_time.unwrap_or_else(|| 1.into()))?).await;
    sum(&numbers)
}

/// As `delayed_sum`, but 0 when the soft time limit ends the pause.
#[celery::task(name = "t.integration.tasks.delayed_sum_with_soft_guard")]
pub async fn delayed_sum_with_soft_guard(
    numbers: Vec<i64>,
    pause_time: Option<Number>,
) -> TaskResult<i64> {
    let pause = pause(&pause_time.unwrap_or_else(|| 1.into()))?;
    tokio::select! {
        () = tokio::time::sleep(pause) => sum(&numbers),
        () = runtime::progress::soft_time_limit() => Ok(0),
    }
}

/// Seconds as Python's `sleep` takes them: any finite, non-negative number.
fn pause(seconds: &Number) -> TaskResult<Duration> {
    seconds
        .as_f64()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| TaskError::UnexpectedError(format!("cannot sleep {seconds} s")))
}
