//! Tasks whose results are signatures: `return_nested_signature_*` return canvases nested two
//! deep, and `rebuild_signature` checks that such a result read back from the backend is still a
//! signature at every level (`test_signature_serialization`); and `build_chain_inside_task`,
//! whose result is the result handle of a chain it sends (`test_groupresult_serialization`).

use celery::error::TaskError;
use celery::task::TaskResult;
use runtime::canvas::{chain, chord, group, Signature};
use runtime::delay::delay;
use runtime::registry::Registry;
use serde_json::Value;

pub(crate) fn register(registry: Registry) -> Registry {
    registry
        .task::<return_nested_signature_chain_chain>()
        .task::<return_nested_signature_chain_group>()
        .task::<return_nested_signature_chain_chord>()
        .task::<return_nested_signature_group_chain>()
        .task::<return_nested_signature_group_group>()
        .task::<return_nested_signature_group_chord>()
        .task::<return_nested_signature_chord_chain>()
        .task::<return_nested_signature_chord_group>()
        .task::<return_nested_signature_chord_chord>()
        .task::<rebuild_signature>()
        .task::<build_chain_inside_task>()
}

/// `add.s()`: never run, so it needs no arguments.
fn add() -> Signature {
    Signature::new("t.integration.tasks.add", Vec::new())
}

fn lone_chord() -> Signature {
    chord(vec![add()], add())
}

#[celery::task(name = "t.integration.tasks.return_nested_signature_chain_chain")]
pub fn return_nested_signature_chain_chain() -> TaskResult<Value> {
    Ok(chain(vec![chain(vec![add()])]).to_value())
}

#[celery::task(name = "t.integration.tasks.return_nested_signature_chain_group")]
pub fn return_nested_signature_chain_group() -> TaskResult<Value> {
    Ok(chain(vec![group(vec![add()])]).to_value())
}

#[celery::task(name = "t.integration.tasks.return_nested_signature_chain_chord")]
pub fn return_nested_signature_chain_chord() -> TaskResult<Value> {
    Ok(chain(vec![lone_chord()]).to_value())
}

#[celery::task(name = "t.integration.tasks.return_nested_signature_group_chain")]
pub fn return_nested_signature_group_chain() -> TaskResult<Value> {
    Ok(group(vec![chain(vec![add()])]).to_value())
}

#[celery::task(name = "t.integration.tasks.return_nested_signature_group_group")]
pub fn return_nested_signature_group_group() -> TaskResult<Value> {
    Ok(group(vec![group(vec![add()])]).to_value())
}

#[celery::task(name = "t.integration.tasks.return_nested_signature_group_chord")]
pub fn return_nested_signature_group_chord() -> TaskResult<Value> {
    Ok(group(vec![lone_chord()]).to_value())
}

#[celery::task(name = "t.integration.tasks.return_nested_signature_chord_chain")]
pub fn return_nested_signature_chord_chain() -> TaskResult<Value> {
    Ok(chord(vec![chain(vec![add()])], add()).to_value())
}

#[celery::task(name = "t.integration.tasks.return_nested_signature_chord_group")]
pub fn return_nested_signature_chord_group() -> TaskResult<Value> {
    Ok(chord(vec![group(vec![add()])], add()).to_value())
}

#[celery::task(name = "t.integration.tasks.return_nested_signature_chord_chord")]
pub fn return_nested_signature_chord_chord() -> TaskResult<Value> {
    Ok(chord(vec![lone_chord()], add()).to_value())
}

/// Reads `sig_dict` as a signature, and every signature inside it (a chain's or group's tasks,
/// a chord's header and body); fails naming the first part that is not one.
#[celery::task(name = "t.integration.tasks.rebuild_signature")]
pub fn rebuild_signature(sig_dict: Value) -> TaskResult<()> {
    rebuild(&sig_dict).map_err(|error| TaskError::UnexpectedError(error.to_string()))
}

fn rebuild(value: &Value) -> Result<(), runtime::canvas::CanvasError> {
    let signature = Signature::from_value(value)?;
    let parts: Vec<&Value> = match signature.subtask_type.as_deref() {
        Some("chain") | Some("group") => part_list(signature.kwargs.get("tasks")),
        Some("chord") => {
            let mut parts = part_list(signature.kwargs.get("header"));
            parts.extend(signature.kwargs.get("body"));
            parts
        }
        _ => Vec::new(),
    };
    parts.into_iter().try_for_each(rebuild)
}

/// A list of signatures as the list's elements; one signature (a chord's group header) as itself.
fn part_list(value: Option<&Value>) -> Vec<&Value> {
    match value {
        Some(Value::Array(parts)) => parts.iter().collect(),
        Some(part) => vec![part],
        None => Vec::new(),
    }
}

/// Sends `add(1, 1) | add(2) | group(add(3), add(4)) | add(5)` and returns its result handle:
/// the last step's, with the group and the steps before it as its parents.
#[celery::task(name = "t.integration.tasks.build_chain_inside_task")]
pub fn build_chain_inside_task() -> TaskResult<Value> {
    let add_s = |args: Vec<i64>| {
        Signature::new(
            "t.integration.tasks.add",
            args.into_iter().map(Value::from).collect(),
        )
    };
    let steps = runtime::chain![
        add_s(vec![1, 1]),
        add_s(vec![2]),
        group(vec![add_s(vec![3]), add_s(vec![4])]),
        add_s(vec![5])
    ];
    delay(&steps).map_err(|error| TaskError::UnexpectedError(error.to_string()))
}
