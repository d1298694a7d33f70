//! Tasks that replace themselves (`self.replace(sig)` in the suite), through the runtime's
//! [`runtime::replace::replace`]: with a task, a chain, a group, a chain holding a group, an
//! empty chain (refused), and replacements of replacements; and the chord members that add to
//! their own chord (`self.add_to_chord(sig)`, [`runtime::add_to_chord::add_to_chord`]).

use celery::error::TaskError;
use celery::task::{Task, TaskResult};
use runtime::add_to_chord::add_to_chord;
use runtime::canvas::{self, Signature};
use runtime::progress;
use runtime::registry::Registry;
use runtime::replace::replace;
use serde_json::{json, Map, Value};

use crate::records::push;

pub(crate) fn register(registry: Registry) -> Registry {
    registry
        .task::<add_replaced>()
        .task::<record_replaced_task_nesting>()
        .task::<add_replaced_with_chain>()
        .task::<replace_with_chain>()
        .task::<replace_with_chain_which_raises>()
        .task::<replace_with_empty_chain>()
        .task::<replace_with_chain_which_contains_a_group>()
        .task::<add_to_all>()
        .task::<add_to_all_to_chord>()
        .task::<add_chord_to_chord>()
        .task::<second_order_replace1>()
        .task::<second_order_replace2>()
        .task::<fail_replaced>()
        .task::<replaced_with_me>()
}

/// A call of the suite's task `name` (`t.integration.tasks.<name>`), Celery's `name.s(*args)`.
fn suite_task(name: &str, args: Vec<Value>) -> Signature {
    Signature::new(format!("t.integration.tasks.{name}"), args)
}

/// `redis_echo.s()`, or `redis_echo.si(message)` when there is a message.
fn echo_link(message: Option<Value>) -> Signature {
    match message {
        Some(message) => suite_task("redis_echo", vec![message]).set_immutable(),
        None => suite_task("redis_echo", Vec::new()),
    }
}

/// Replaced by `add(x, y)`.
#[celery::task(name = "t.integration.tasks.add_replaced")]
pub fn add_replaced(x: Value, y: Value) -> TaskResult<Value> {
    replace(suite_task("add", vec![x, y]))
}

/// Appends its own `replaced_task_nesting` to `nesting`, then is replaced by itself
/// `replacements` more times; the last returns the list.
#[celery::task(name = "t.integration.tasks.record_replaced_task_nesting", bind = true)]
pub fn record_replaced_task_nesting(
    task: &Self,
    replacements: i64,
    nesting: Option<Vec<Value>>,
) -> TaskResult<Vec<Value>> {
    let mut nesting = nesting.unwrap_or_default();
    nesting.push(json!(progress::replaced_task_nesting()));
    if replacements == 0 {
        return Ok(nesting);
    }
    let mut again = suite_task(
        "record_replaced_task_nesting",
        vec![json!(replacements - 1), json!(nesting)],
    );
    // The caller's result queue, for the RPC backend.
    if let Some(reply_to) = task.request().reply_to.clone() {
        again.options.insert("reply_to".into(), reply_to.into());
    }
    replace(again)
}

/// Replaced by `add(x, y) | identity()`.
#[celery::task(name = "t.integration.tasks.add_replaced_with_chain")]
pub fn add_replaced_with_chain(x: Value, y: Value) -> TaskResult<Value> {
    replace(runtime::chain![
        suite_task("add", vec![x, y]),
        suite_task("identity", Vec::new())
    ])
}

/// Replaced by `identity(*args) | identity()`, linked to `redis_echo` (of `link_msg`, if given).
#[celery::task(name = "t.integration.tasks.replace_with_chain")]
pub fn replace_with_chain(var_args: Vec<Value>, link_msg: Option<Value>) -> TaskResult<Value> {
    let replacement = runtime::chain![
        suite_task("identity", var_args),
        suite_task("identity", Vec::new())
    ];
    replace(replacement.link(echo_link(link_msg)))
}

/// Replaced by `identity(*args) | raise_error()`, with `redis_echo` (of `link_msg`, if given)
/// as its errback.
#[celery::task(name = "t.integration.tasks.replace_with_chain_which_raises")]
pub fn replace_with_chain_which_raises(
    var_args: Vec<Value>,
    link_msg: Option<Value>,
) -> TaskResult<Value> {
    let replacement = runtime::chain![
        suite_task("identity", var_args),
        suite_task("raise_error", Vec::new())
    ];
    replace(replacement.link_error(echo_link(link_msg)))
}

/// Asks to be replaced by an empty chain, which fails it with `ImproperlyConfigured`.
#[celery::task(name = "t.integration.tasks.replace_with_empty_chain")]
pub fn replace_with_empty_chain(var_args: Vec<Value>) -> TaskResult<Value> {
    let _ = var_args;
    replace(canvas::chain(Vec::new()))
}

/// Replaced by `add(1, 2) | group(add(1), add(1))`.
#[celery::task(name = "t.integration.tasks.replace_with_chain_which_contains_a_group")]
pub fn replace_with_chain_which_contains_a_group() -> TaskResult<Value> {
    let fan_out = canvas::group(vec![
        suite_task("add", vec![json!(1)]),
        suite_task("add", vec![json!(1)]),
    ]);
    replace(runtime::chain![
        suite_task("add", vec![json!(1), json!(2)]),
        fan_out
    ])
}

/// Replaced by the group of `add(num, val)` for each of `nums`.
#[celery::task(name = "t.integration.tasks.add_to_all")]
pub fn add_to_all(nums: Vec<Value>, val: Value) -> TaskResult<Value> {
    let members = nums
        .into_iter()
        .map(|num| suite_task("add", vec![num, val.clone()]))
        .collect();
    replace(canvas::group(members))
}

/// Adds `add(num, val)` for each of `nums` to its chord; returns 0.
#[celery::task(name = "t.integration.tasks.add_to_all_to_chord")]
pub fn add_to_all_to_chord(nums: Vec<Value>, val: Value) -> TaskResult<i64> {
    for num in nums {
        added(suite_task("add", vec![num, val.clone()]))?;
    }
    Ok(0)
}

/// Adds the chord `group(add(num, val) for num in nums) | tsum()` to its chord; returns 0.
#[celery::task(name = "t.integration.tasks.add_chord_to_chord")]
pub fn add_chord_to_chord(nums: Vec<Value>, val: Value) -> TaskResult<i64> {
    let header = nums
        .into_iter()
        .map(|num| suite_task("add", vec![num, val.clone()]))
        .collect();
    added(canvas::chord(header, suite_task("tsum", Vec::new())))?;
    Ok(0)
}

fn added(signature: Signature) -> TaskResult<()> {
    add_to_chord(signature).map_err(|error| TaskError::UnexpectedError(error.to_string()))
}

/// Echoes `In A` and is replaced by `second_order_replace2() | second_order_replace1(True)`,
/// which echoes `Out A`.
#[celery::task(name = "t.integration.tasks.second_order_replace1")]
pub async fn second_order_replace1(state: Option<bool>) -> TaskResult<()> {
    second_order_replace("second_order_replace1", "A", "second_order_replace2", state).await
}

/// Echoes `In B` and is replaced by `redis_echo("In/Out C") | second_order_replace2(True)`,
/// which echoes `Out B`.
#[celery::task(name = "t.integration.tasks.second_order_replace2")]
pub async fn second_order_replace2(state: Option<bool>) -> TaskResult<()> {
    second_order_replace("second_order_replace2", "B", "redis_echo", state).await
}

/// The two `second_order_replace` tasks: `name` echoing `In <label>`, replaced by `first`
/// (given `In/Out C` when it is `redis_echo`) then itself with `state=True`, which echoes
/// `Out <label>`.
async fn second_order_replace(
    name: &str,
    label: &str,
    first: &str,
    state: Option<bool>,
) -> TaskResult<()> {
    if state.unwrap_or(false) {
        return push("redis-echo", &json!(format!("Out {label}"))).await;
    }
    push("redis-echo", &json!(format!("In {label}"))).await?;
    let first = match first {
        "redis_echo" => suite_task(first, vec![json!("In/Out C")]),
        _ => suite_task(first, Vec::new()),
    };
    let kwargs = Map::from_iter([("state".to_string(), json!(true))]);
    let again = suite_task(name, Vec::new())
        .with_kwargs(kwargs)
        .set_immutable();
    replace(runtime::chain![first, again])
}

/// Replaced by `fail(*args)`, which raises `ExpectedException`.
#[celery::task(name = "t.integration.tasks.fail_replaced")]
pub fn fail_replaced(var_args: Vec<Value>) -> TaskResult<Value> {
    replace(suite_task("fail", var_args).set_immutable())
}

/// Returns `True`: the task other tasks are replaced with.
#[celery::task(name = "t.integration.tasks.replaced_with_me")]
pub fn replaced_with_me() -> TaskResult<bool> {
    Ok(true)
}
