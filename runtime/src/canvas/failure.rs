//! What follows a failure: the errbacks sent (as one group) or called by the failing worker
//! itself, the chain steps that will never run, and what a failed chord fails in its body.

use serde_json::{json, Value};

use super::{
    apply, group, laid_out, request_for, signatures, CanvasError, Next, Sent, Signature, Splice,
};
use crate::protocol::TaskRequest;

/// What follows the failure of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Failed {
    /// Errbacks to send, as Celery sends them to a worker of any language: together as one new
    /// group, each given the failed task's id first unless it is immutable, then its own
    /// arguments. Its `children` is that group's result tuple.
    pub sent: Sent,
    /// Errbacks the failing worker calls itself, as Celery calls a "new style" errback: with
    /// the failed request, its exception and traceback first (see [`called_errback`]).
    pub called: Vec<Signature>,
    /// The chain steps that will now never run (a chord step: its body), each to be stored
    /// failed as well and, when it is a chord member, counted in its chord.
    pub never: Vec<TaskRequest>,
}

/// What follows the failure of `parent`; `called_here` says which errbacks this worker calls
/// itself rather than sends (those of its own tasks that
/// [`crate::registry::takes_the_failed_request`]).
pub fn after_failure(
    parent: &TaskRequest,
    called_here: impl Fn(&Signature) -> bool,
) -> Result<Failed, CanvasError> {
    let (called, sent): (Vec<_>, Vec<_>) = signatures(parent.embed.get("errbacks"))?
        .into_iter()
        .partition(called_here);
    let mut failed = Failed {
        sent: Sent::default(),
        called,
        never: match parent.embed.get("chain") {
            Some(Value::Array(steps)) => never_run(steps, parent)?,
            _ => Vec::new(),
        },
    };
    if !sent.is_empty() {
        let together = group(sent);
        let id = Value::String(parent.id.clone());
        let next = apply(&together, Some(parent), Some(&id), None)?;
        failed.sent.add(&together, next);
    }
    Ok(failed)
}

/// The call of a "new style" `errback` for the failure of `failed` with `exc` and `traceback`:
/// the request (as an object of its fields), the exception and the traceback first, unless the
/// errback is immutable, then its own arguments.
pub fn called_errback(
    errback: &Signature,
    failed: &TaskRequest,
    exc: Value,
    traceback: Value,
) -> TaskRequest {
    let mut args = Vec::with_capacity(errback.args.len() + 3);
    if !errback.immutable {
        let request = json!({
            "id": failed.id,
            "task": failed.task,
            "args": failed.args,
            "kwargs": failed.kwargs,
            "root_id": failed.root_id,
            "parent_id": failed.parent_id,
            "group": failed.group,
            "group_index": failed.group_index,
            "retries": failed.retries,
            "origin": failed.origin,
        });
        args.extend([request, exc, traceback]);
    }
    args.extend(errback.args.iter().cloned());
    let mut call = TaskRequest::new(&errback.task, args, errback.kwargs.clone());
    call.root_id = failed.root_id.clone().or_else(|| Some(failed.id.clone()));
    call.parent_id = Some(failed.id.clone());
    call
}

/// The chain `steps` that will never run after `parent` failed, each to be stored failed.
fn never_run(steps: &[Value], parent: &TaskRequest) -> Result<Vec<TaskRequest>, CanvasError> {
    let mut never = Vec::new();
    for step in steps {
        let step = Signature::from_value(step)?;
        // A chord step's caller waits on its body.
        let step = match step.subtask_type.as_deref() {
            Some("chord") => step.chord_parts()?.1,
            _ => step,
        };
        if step.subtask_type.is_none() && step.option_str("task_id").is_some() {
            never.push(request_for(&step, Some(parent), None, None).request);
        }
    }
    Ok(never)
}

/// What the failure of the chord whose `body` the member `parent` completed fails, as Celery's
/// chord error handling fails it: the results the body would have given, each to be stored
/// failed with the errbacks linked to it called, and the steps of the chain after the chord that
/// will now never run, as for a failed task. Celery stores those results without their requests,
/// so none of them counts in a chord it is a member of.
///
/// A chord body fails as one, under its own id, with its own errbacks: its header never starts.
/// A group body fails member by member, each with the errbacks of its result and the group's
/// own. Any other body fails through the requests it would have started.
pub fn failed_chord_body(
    body: &Signature,
    parent: &TaskRequest,
) -> Result<(Vec<Next>, Vec<TaskRequest>), CanvasError> {
    let mut body = body.clone();
    let never = match body.options.remove("chain") {
        Some(Value::Array(steps)) => never_run(&steps, parent)?,
        _ => Vec::new(),
    };
    let failed = match body.subtask_type.as_deref() {
        Some("chord") => vec![request_for(&body, Some(parent), None, None)],
        Some("group") => {
            let own = signatures(body.options.get("link_error"))?;
            let mut failed = Vec::new();
            for (_, member) in laid_out(&body.members()?, Splice::Frozen)? {
                let (mut result, mut errbacks) = linked_to_result(&member)?;
                for errback in &own {
                    if !errbacks.contains(errback) {
                        errbacks.push(errback.clone());
                    }
                }
                let errbacks = errbacks.iter().map(Signature::to_value).collect();
                result
                    .options
                    .insert("link_error".into(), Value::Array(errbacks));
                failed.push(request_for(&result, Some(parent), None, None));
            }
            failed
        }
        _ => apply(&body, Some(parent), None, None)?,
    };
    Ok((failed, never))
}

/// The signature whose result is `member`'s, and every errback linked to that result (Celery's
/// `_result_errbacks`): a chord's body's, with the chord's own; a chain's last step's, with the
/// chain's own; a group's own with its members'.
fn linked_to_result(member: &Signature) -> Result<(Signature, Vec<Signature>), CanvasError> {
    let mut errbacks = signatures(member.options.get("link_error"))?;
    let last = match member.subtask_type.as_deref() {
        Some("chord") => member.chord_parts()?.1,
        Some("chain") => member
            .members()?
            .pop()
            .ok_or_else(|| CanvasError("an empty chain".into()))?,
        Some("group") => {
            for nested in member.members()? {
                errbacks.extend(linked_to_result(&nested)?.1);
            }
            return Ok((member.clone(), errbacks));
        }
        _ => return Ok((member.clone(), errbacks)),
    };
    let (result, more) = linked_to_result(&last)?;
    errbacks.extend(more);
    Ok((result, errbacks))
}
