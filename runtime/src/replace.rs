//! `Task.replace` for Rust tasks: a running task ends by replacing itself with a signature, a
//! chain or a group, and whoever waits on the task gets the replacement's outcome instead.
//!
//! The task calls [`replace`], which records the signature in its context; the worker then,
//! instead of storing a result, sends what [`plan`] works out (pure). As Celery 5.7 does:
//!
//! - the replacement's last step takes the task's id, so the caller's `AsyncResult` reads the
//!   replacement's result, and it takes the task's chord membership (group id, index, chord
//!   body) and so counts in the task's chord in its place;
//! - the task's link callbacks run after that last step, its errbacks on any of the
//!   replacement's steps failing;
//! - the rest of the chain the task was a step of runs after the replacement;
//! - every task sent carries `replaced_task_nesting` one higher than the task's;
//! - a group (or a chain ending in one) becomes a chord whose body, `celery.accumulate`,
//!   gathers the members' results into one list, so that its outcome has one id;
//! - the task itself stores no result: its id's result is the replacement's.

// The crate's task macro implements `Task` inside a const block, which this lint flags.
#![allow(non_local_definitions)]

use celery::error::TaskError;
use celery::task::TaskResult;
use serde_json::{json, Map, Value};

use crate::canvas::{self, CanvasError, Next, Signature};
use crate::progress;
use crate::protocol::message::REPLACED_TASK_NESTING;
use crate::protocol::result::ExceptionInfo;
use crate::protocol::TaskRequest;
use crate::raise::raise;

/// What [`replace`] returns inside a task; the worker never stores it.
const REPLACED: &str = "Replaced by new task";

/// Ends the running task by replacing it with `signature`: `return replace(chain![..])`.
///
/// The returned error only ends the task's code; the worker sends the replacement whatever the
/// task returns after asking (a task that asks twice is replaced by the last). Outside a task
/// run by a worker, the error says so and nothing is recorded.
pub fn replace<T>(signature: Signature) -> TaskResult<T> {
    match progress::record_replacement(signature) {
        Ok(()) => Err(TaskError::UnexpectedError(REPLACED.into())),
        Err(error) => Err(TaskError::UnexpectedError(format!(
            "cannot replace the task: {error}"
        ))),
    }
}

/// Why `signature` cannot replace a task, in Celery's words (it raises `ImproperlyConfigured`
/// in the task); `None` when it can.
pub fn refusal(signature: &Signature) -> Option<&'static str> {
    if signature.options.contains_key("chord") {
        return Some("A signature replacing a task must not be part of a chord");
    }
    let empty_chain = signature.subtask_type.as_deref() == Some("chain")
        && signature.members().map_or(true, |steps| steps.is_empty());
    empty_chain.then_some("Cannot replace with an empty chain")
}

/// The requests that replace `task` with `signature`, to send instead of storing its result.
pub fn plan(task: &TaskRequest, signature: Signature) -> Result<Vec<Next>, CanvasError> {
    let mut replacement = gathered(signature)?;
    let callbacks = canvas::signatures(task.embed.get("callbacks"))?;
    let errbacks = canvas::signatures(task.embed.get("errbacks"))?;
    replacement = with_links(replacement, &callbacks, &errbacks)?;
    replacement = map_final(replacement, &mut |last| in_place_of(last, task))?;
    let mut steps = vec![replacement];
    if let Some(Value::Array(rest)) = task.embed.get("chain") {
        // Stored last step first.
        for step in rest.iter().rev() {
            steps.push(Signature::from_value(step)?);
        }
    }
    let whole = match steps.len() {
        1 => steps.remove(0),
        _ => canvas::chain(steps),
    };
    let nesting = json!(task.replaced_task_nesting() + 1);
    let whole = map_tasks(whole, Reach::All, &mut |mut leaf| {
        leaf.options
            .insert(REPLACED_TASK_NESTING.into(), nesting.clone());
        Ok(leaf)
    })?;
    canvas::sent_by(&whole, task)
}

/// `signature` with a group (alone or ending a chain) made a chord gathering its results into
/// one list, as Celery replaces with a group.
fn gathered(signature: Signature) -> Result<Signature, CanvasError> {
    match signature.subtask_type.as_deref() {
        Some("group") => {
            let gather = Signature::new("celery.accumulate", Vec::new())
                .with_kwargs(Map::from_iter([("index".to_string(), json!(0))]));
            Ok(canvas::chord(signature.members()?, gather))
        }
        Some("chain") => {
            let mut steps = signature.members()?;
            if let Some(last) = steps.pop() {
                steps.push(gathered(last)?);
            }
            Ok(with_members(signature, "tasks", &steps))
        }
        _ => Ok(signature),
    }
}

/// `signature` with the task's `callbacks` after its last step and its `errbacks` on every
/// step, along with the links the replacement (a chain) carries itself.
fn with_links(
    mut signature: Signature,
    callbacks: &[Signature],
    errbacks: &[Signature],
) -> Result<Signature, CanvasError> {
    let mut callbacks = callbacks.to_vec();
    let mut errbacks = errbacks.to_vec();
    if signature.subtask_type.is_some() {
        // A canvas' own links go where its steps can run them.
        let own = |signature: &mut Signature, option: &str| {
            canvas::signatures(signature.options.remove(option).as_ref())
        };
        callbacks.splice(0..0, own(&mut signature, "link")?);
        errbacks.splice(0..0, own(&mut signature, "link_error")?);
    }
    let signature = map_final(signature, &mut |last| {
        Ok(callbacks.iter().cloned().fold(last, Signature::link))
    })?;
    map_tasks(signature, Reach::Steps, &mut |step| {
        Ok(errbacks.iter().cloned().fold(step, Signature::link_error))
    })
}

/// `last`, the replacement's last step, taking `task`'s id and its place in a group or chord.
fn in_place_of(last: Signature, task: &TaskRequest) -> Result<Signature, CanvasError> {
    let mut last = beside(last, task);
    last.options
        .insert("task_id".into(), task.id.clone().into());
    Ok(last)
}

/// `last` taking `task`'s place in a group or chord (its group id, index and chord body), or
/// none when the task has none.
pub(crate) fn beside(mut last: Signature, task: &TaskRequest) -> Signature {
    let options = &mut last.options;
    let chord = task.embed.get("chord").filter(|c| !c.is_null());
    for (key, value) in [
        ("group_id", task.group.clone().map(Value::from)),
        ("group_index", task.group_index.map(Value::from)),
        ("chord", chord.cloned()),
    ] {
        match value {
            Some(value) => options.insert(key.into(), value),
            None => options.remove(key),
        };
    }
    last
}

pub(crate) type Edit<'a> = dyn FnMut(Signature) -> Result<Signature, CanvasError> + 'a;

/// `signature` with `edit` applied to the task whose result is its own: a chain's last step's,
/// a chord's body's, a task itself.
pub(crate) fn map_final(signature: Signature, edit: &mut Edit) -> Result<Signature, CanvasError> {
    match signature.subtask_type.as_deref() {
        Some("chain") => {
            let mut steps = signature.members()?;
            let last = steps
                .pop()
                .ok_or_else(|| CanvasError("an empty chain".into()))?;
            steps.push(map_final(last, edit)?);
            Ok(with_members(signature, "tasks", &steps))
        }
        Some("chord") => {
            let (_, body) = signature.chord_parts()?;
            let body = map_final(body, edit)?;
            let mut signature = signature;
            signature.kwargs.insert("body".into(), body.to_value());
            Ok(signature)
        }
        Some("group") => Err(CanvasError(
            "a group's results have no one id to replace a task with".into(),
        )),
        _ => edit(signature),
    }
}

/// Which tasks of a canvas [`map_tasks`] edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Each task run as a step of its own: a chain's steps, a group's members, a chord's body.
    Steps,
    /// Every task, chord headers included.
    All,
}

/// `signature` with `edit` applied to each task that `reach` names.
fn map_tasks(
    signature: Signature,
    reach: Reach,
    edit: &mut Edit,
) -> Result<Signature, CanvasError> {
    match signature.subtask_type.as_deref() {
        Some("chain" | "group") => {
            let steps = signature
                .members()?
                .into_iter()
                .map(|step| map_tasks(step, reach, edit))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(with_members(signature, "tasks", &steps))
        }
        Some("chord") => {
            let (header, body) = signature.chord_parts()?;
            let mut signature = signature;
            if reach == Reach::All {
                let header = header
                    .into_iter()
                    .map(|member| map_tasks(member, reach, edit))
                    .collect::<Result<Vec<_>, _>>()?;
                let header_value = match signature.kwargs.get("header") {
                    // A header given as a group keeps its own options (its id).
                    Some(Value::Object(_)) => {
                        let group = Signature::from_value(&signature.kwargs["header"])?;
                        with_members(group, "tasks", &header).to_value()
                    }
                    _ => Value::Array(header.iter().map(Signature::to_value).collect()),
                };
                signature.kwargs.insert("header".into(), header_value);
            }
            let body = map_tasks(body, reach, edit)?;
            signature.kwargs.insert("body".into(), body.to_value());
            Ok(signature)
        }
        _ => edit(signature),
    }
}

fn with_members(mut signature: Signature, key: &str, members: &[Signature]) -> Signature {
    let members = members.iter().map(Signature::to_value).collect();
    signature.kwargs.insert(key.into(), Value::Array(members));
    signature
}

/// `celery.accumulate`, the body Celery gathers a replacing group's results with: Python's
/// `args[index]`, or `args` itself without an index. Sent with the results as its one
/// positional argument and `index=0`, it returns them.
#[celery::task(name = "celery.accumulate")]
pub fn accumulate(var_args: Vec<Value>, index: Option<usize>) -> TaskResult<Value> {
    accumulated(var_args, index)
}

fn accumulated(mut args: Vec<Value>, index: Option<usize>) -> TaskResult<Value> {
    match index {
        None => Ok(Value::Array(args)),
        Some(index) if index < args.len() => Ok(args.swap_remove(index)),
        Some(_) => Err(raise(ExceptionInfo::builtin(
            "IndexError",
            "tuple index out of range",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The task being replaced: a step of a chain with `rest` after it (last first), linked
    /// to `callback` and `errback`, in chord `ch` at index 2, replaced once already.
    fn task(rest: Vec<Value>) -> TaskRequest {
        let mut task = TaskRequest::new("replaced", vec![], Map::new());
        task.id = "t".into();
        task.root_id = Some("root".into());
        task.group = Some("ch".into());
        task.group_index = Some(2);
        task.extra_headers
            .insert(REPLACED_TASK_NESTING.into(), json!(1));
        task.embed = json!({
            "callbacks": [Signature::new("callback", vec![]).to_value()],
            "errbacks": [Signature::new("errback", vec![]).to_value()],
            "chain": rest,
            "chord": Signature::new("body", vec![]).to_value(),
        });
        task
    }

    fn links(options: &Value, option: &str) -> Vec<String> {
        options[option]
            .as_array()
            .map(|links| {
                links
                    .iter()
                    .map(|l| l["task"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_chain_replacement_ends_as_the_task_with_its_links_and_place() {
        let own_errback = Signature::new("own_errback", vec![]);
        let replacement = crate::chain![
            Signature::new("a", vec![json!(1)]),
            Signature::new("b", vec![])
        ]
        .link(Signature::new("own_callback", vec![]))
        .link_error(own_errback);
        let mut task = task(Vec::new());
        task.embed["chain"] = Value::Null;
        let sent = plan(&task, replacement).unwrap();
        assert_eq!(sent.len(), 1, "a chain starts with its first step");
        let a = &sent[0].request;
        assert_eq!(
            (a.task.as_str(), a.args.clone()),
            ("a", vec![json!(1)]),
            "no result is passed to the first step"
        );
        assert_eq!(a.parent_id.as_deref(), Some("t"));
        assert_eq!(a.root_id.as_deref(), Some("root"));
        assert_eq!(a.group, None, "only the last step takes the task's place");
        assert_eq!(a.replaced_task_nesting(), 2);
        assert_eq!(
            links(&a.embed, "errbacks"),
            ["own_errback", "errback"],
            "errbacks on every step"
        );
        assert_eq!(links(&a.embed, "callbacks"), Vec::<String>::new());
        let b = &a.embed["chain"][0];
        let options = &b["options"];
        assert_eq!(
            options["task_id"], "t",
            "the caller's id reads the last step"
        );
        assert_eq!(
            (&options["group_id"], &options["group_index"]),
            (&json!("ch"), &json!(2))
        );
        assert_eq!(options["chord"]["task"], "body");
        assert_eq!(options[REPLACED_TASK_NESTING], 2);
        assert_eq!(links(options, "link"), ["own_callback", "callback"]);
        assert_eq!(links(options, "link_error"), ["own_errback", "errback"]);
    }

    #[test]
    fn the_rest_of_the_tasks_chain_follows_its_replacement() {
        let rest = vec![
            Signature::new("last", vec![]).to_value(),
            Signature::new("next", vec![]).to_value(),
        ];
        let sent = plan(&task(rest), Signature::new("instead", vec![])).unwrap();
        let instead = &sent[0].request;
        assert_eq!(
            (instead.id.as_str(), instead.task.as_str()),
            ("t", "instead")
        );
        let rest: Vec<_> = instead.embed["chain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["task"].clone(),
                    s["options"][REPLACED_TASK_NESTING].clone(),
                )
            })
            .collect();
        assert_eq!(
            rest,
            [(json!("last"), json!(2)), (json!("next"), json!(2))],
            "stored last first, each one nesting deeper"
        );
    }

    #[test]
    fn a_group_replacement_is_gathered_into_one_result_with_the_tasks_id() {
        let members = vec![Signature::new("m1", vec![]), Signature::new("m2", vec![])];
        let mut task = task(Vec::new());
        task.embed["chain"] = Value::Null;
        let sent = plan(&task, canvas::group(members)).unwrap();
        assert_eq!(sent.len(), 2);
        let inner = sent[0].request.group.clone().expect("a chord of its own");
        assert_ne!(inner, "ch");
        assert_eq!(sent[0].opens_chords, [(inner, 2)]);
        let gather = &sent[0].request.embed["chord"];
        assert_eq!(gather["task"], "celery.accumulate");
        assert_eq!(gather["kwargs"]["index"], 0);
        let options = &gather["options"];
        assert_eq!(options["task_id"], "t");
        assert_eq!(options["group_id"], "ch", "it counts in the task's chord");
        assert_eq!(options["chord"]["task"], "body");
        assert_eq!(links(options, "link"), ["callback"]);
        assert!(sent.iter().all(|n| n.request.replaced_task_nesting() == 2));
    }

    #[test]
    fn what_celery_refuses_is_refused() {
        assert_eq!(
            refusal(&canvas::chain(Vec::new())),
            Some("Cannot replace with an empty chain")
        );
        let mut in_chord = Signature::new("a", vec![]);
        in_chord.options.insert("chord".into(), json!({}));
        assert_eq!(
            refusal(&in_chord),
            Some("A signature replacing a task must not be part of a chord")
        );
        assert_eq!(refusal(&Signature::new("a", vec![])), None);
    }

    #[test]
    fn accumulate_returns_the_gathered_results() {
        let results = || vec![json!([1, 2])];
        assert_eq!(accumulated(results(), Some(0)).unwrap(), json!([1, 2]));
        assert_eq!(accumulated(results(), None).unwrap(), json!([[1, 2]]));
        assert!(accumulated(results(), Some(1)).is_err());
    }

    #[tokio::test]
    async fn replacing_outside_a_task_records_nothing() {
        let error = replace::<()>(Signature::new("a", vec![])).unwrap_err();
        assert!(error.to_string().contains("cannot replace"), "{error}");
        let (context, _updates) = progress::TaskContext::new(&task(Vec::new()));
        let asked = context.clone();
        let replaced = context
            .scope(async { replace::<()>(Signature::new("instead", vec![])) })
            .await;
        assert!(replaced.is_err(), "the task's code ends");
        assert_eq!(asked.take_replacement().unwrap().task, "instead");
    }
}
