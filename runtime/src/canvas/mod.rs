//! Celery's canvas as a worker follows it when a task ends: the signatures a message carries in
//! its embed (`callbacks`, `errbacks`, `chain`) become the requests to send next. Pure: the
//! worker stores and sends.
//!
//! A signature is `celery.canvas.Signature` as JSON: `{task, args, kwargs, options,
//! subtask_type, immutable}`. The `chain` list is stored last step first, so the next step is its
//! last element, and the step after it receives what is left (an empty list at the end).
//!
//! [`signature`] holds the signature type and its builders; [`failure`] what follows a failure.

mod failure;
mod signature;

pub use failure::{after_failure, called_errback, failed_chord_body, Failed};
pub use signature::{chain, chord, group, CanvasError, Signature};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::protocol::message::REPLACED_TASK_NESTING;
use crate::protocol::TaskRequest;
use signature::frozen_members;

/// A request to send, and the queue its options name (`None`: route it by task name).
#[derive(Debug, Clone, PartialEq)]
pub struct Next {
    pub request: TaskRequest,
    pub queue: Option<String>,
    /// `(chord id, header size)` of each chord whose header this request is the first of (a
    /// chord nested in a chord header opens both with its first member): the sender records
    /// each size with [`crate::chord::open`] before sending it.
    pub opens_chords: Vec<(String, usize)>,
    /// `(chord id, header result tuple)` of each chord opened here whose header has a member
    /// ending in a group: the sender saves the tuple as the chord's group result before sending,
    /// as Celery's `apply_chord` does, so that whichever worker completes the chord gives the
    /// body that member's results as one list (see [`crate::chord::results`]).
    pub saves_headers: Vec<(String, Value)>,
}

/// The header tuple `saves_headers` (of a [`Next`]) holds for chord `chord_id`, if any.
pub fn saved_header<'a>(saves_headers: &'a [(String, Value)], chord_id: &str) -> Option<&'a Value> {
    saves_headers
        .iter()
        .find(|(id, _)| id == chord_id)
        .map(|(_, header)| header)
}

/// What `parent` sends after it succeeded with `result`: its link callbacks, then the next step
/// of its chain.
pub fn after_success(parent: &TaskRequest, result: &Value) -> Result<Sent, CanvasError> {
    let mut sent = Sent::default();
    let mut callbacks = signatures(parent.embed.get("callbacks"))?;
    if callbacks.len() == 1 {
        let callback = callbacks.remove(0);
        sent.add(
            &callback,
            apply(&callback, Some(parent), Some(result), None)?,
        );
    } else if !callbacks.is_empty() {
        // Several callbacks go out as Celery sends them: each group as it is, and the plain ones
        // together as one new group.
        let (groups, plain): (Vec<_>, Vec<_>) = callbacks
            .into_iter()
            .partition(|c| c.subtask_type.as_deref() == Some("group"));
        for callback in &groups {
            sent.add(callback, apply(callback, Some(parent), Some(result), None)?);
        }
        if !plain.is_empty() {
            let together = group(plain);
            let members = laid_out(&together.members()?, Splice::Applied)?;
            let next = members_of(
                &members,
                &group_id(&together),
                None,
                Some(parent),
                Some(result),
            )?;
            sent.add(&together, next);
        }
    }
    let mut chain = match parent.embed.get("chain") {
        Some(Value::Array(steps)) => steps.clone(),
        _ => Vec::new(),
    };
    if let Some(step) = chain.pop() {
        let step = Signature::from_value(&step)?;
        let next = apply(&step, Some(parent), Some(result), Some(chain))?;
        sent.add(&step, next);
    }
    Ok(sent)
}

/// What a finished task sends, and the `children` of its stored result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sent {
    /// The requests, in the order to send them.
    pub next: Vec<Next>,
    /// One result tuple per thing sent: `[[id, null], null]` for a task, `[[group id, null],
    /// [member tuples]]` for a group, as Celery's `as_tuple()` writes them.
    pub children: Vec<Value>,
}

impl Sent {
    fn add(&mut self, signature: &Signature, next: Vec<Next>) {
        let tuple = |n: &Next| json!([[n.request.id, null], null]);
        match (signature.subtask_type.as_deref(), next.first()) {
            // A chord's child is its header, as a group.
            (Some("group" | "chord"), Some(first)) => {
                let members: Vec<Value> = next.iter().map(tuple).collect();
                let id = given_group_id(signature).or_else(|| first.request.group.clone());
                self.children.push(json!([[id, null], members]));
            }
            _ => self.children.extend(next.iter().map(tuple)),
        }
        self.next.extend(next);
    }
}
/// The body of the chord `parent` is a header member of, if any.
pub fn chord_of(parent: &TaskRequest) -> Result<Option<Signature>, CanvasError> {
    match parent.embed.get("chord") {
        None | Some(Value::Null) => Ok(None),
        Some(body) => Signature::from_value(body).map(Some),
    }
}

/// The requests that start a chord's `body`, sent by the member `parent` that completed the
/// chord, with the members' results in header order as the body's first argument.
pub fn chord_body(
    body: &Signature,
    parent: &TaskRequest,
    results: Vec<Value>,
) -> Result<Vec<Next>, CanvasError> {
    apply(body, Some(parent), Some(&Value::Array(results)), None)
}

/// The requests that start `signature` when a client sends it, with no task before it.
pub fn start(signature: &Signature) -> Result<Vec<Next>, CanvasError> {
    apply(signature, None, None, None)
}

/// The requests that start `signature` when the running task `parent` sends it (Celery's
/// `sig.delay()` inside a task): `parent` is their parent, and its root theirs.
pub fn sent_by(signature: &Signature, parent: &TaskRequest) -> Result<Vec<Next>, CanvasError> {
    apply(signature, Some(parent), None, None)
}

/// A `link` option as the embed carries it: always a list (Python workers iterate it), or null.
fn as_list(value: Option<&Value>) -> Value {
    match value {
        None | Some(Value::Null) => Value::Null,
        Some(Value::Array(items)) => Value::Array(items.clone()),
        Some(one) => Value::Array(vec![one.clone()]),
    }
}

/// `link` / `callbacks` values: one signature, a list of them, or none.
pub(crate) fn signatures(value: Option<&Value>) -> Result<Vec<Signature>, CanvasError> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(Signature::from_value).collect(),
        Some(one) => Ok(vec![Signature::from_value(one)?]),
    }
}

/// The requests that start `signature`, sent by `parent` with `result` (if any) as the first
/// argument; `rest` is the remainder of the chain it is a step of (last step first), to run
/// after it, or `None` when it is no chain's step.
fn apply(
    signature: &Signature,
    parent: Option<&TaskRequest>,
    result: Option<&Value>,
    rest: Option<Vec<Value>>,
) -> Result<Vec<Next>, CanvasError> {
    // A chain or chord handed the rest of a chain as its `chain` option (a chord's body that is
    // itself a chord, as Celery's `chord.run` hands it on) runs that rest after itself.
    let rest = rest.or_else(|| match signature.subtask_type.as_deref() {
        Some("chain") | Some("chord") => match signature.options.get("chain") {
            Some(Value::Array(rest)) => Some(rest.clone()),
            _ => None,
        },
        _ => None,
    });
    let chained_after = rest.as_ref().is_some_and(|r| !r.is_empty());
    match signature.subtask_type.as_deref() {
        None => Ok(vec![request_for(signature, parent, result, rest)]),
        Some("chain") => {
            // The chain's own errbacks go on every step, its callbacks on the last, as Celery's
            // `chain.run` links them when it sends the chain.
            let mut steps = signature.members()?;
            for errback in signatures(signature.options.get("link_error"))? {
                steps = steps
                    .into_iter()
                    .map(|step| step.link_error(errback.clone()))
                    .collect();
            }
            if let Some(last) = steps.pop() {
                let callbacks = signatures(signature.options.get("link"))?;
                steps.push(callbacks.into_iter().fold(last, Signature::link));
            }
            let mut steps = steps.into_iter();
            let first = steps
                .next()
                .ok_or_else(|| CanvasError("an empty chain".into()))?;
            // The inner chain's steps run before what is left of the outer one.
            let mut chain = rest.unwrap_or_default();
            chain.extend(steps.rev().map(|s| s.to_value()));
            apply(&first, parent, result, Some(chain))
        }
        Some("group") if !chained_after => {
            let members = laid_out(&signature.members()?, Splice::Applied)?;
            let members = with_errbacks_of(signature, members);
            match chord_member(signature) {
                // A group ending a chord header member (see [`tagged`]): each of its members
                // counts in that chord, as Celery applies a group frozen with a chord.
                Some((chord_id, body)) => {
                    members_of(&members, &chord_id, Some(body), parent, result)
                }
                None => members_of(&members, &group_id(signature), None, parent, result),
            }
        }
        // A group with steps after it, as a chain not yet sent carries it (a chord's body):
        // Celery upgrades it to a chord whose body is the next step, and the rest follows.
        Some("group") => {
            let mut rest = rest.unwrap_or_default();
            let next = rest
                .pop()
                .ok_or_else(|| CanvasError("a group step without its next step".into()))?;
            let upgraded = Signature::canvas(
                "chord",
                json!({"header": signature.to_value(), "body": next, "kwargs": {}}),
                signature.options.clone(),
            );
            apply(&upgraded, parent, result, Some(rest))
        }
        Some("chord") => {
            let (header, body) = signature.chord_parts()?;
            // Celery freezes a chord's header whenever it runs one.
            let header = laid_out(&header, Splice::Frozen)?;
            let chord_id = group_id(signature);
            // The chord's own callbacks and errbacks are its body's, as Celery's `chord.run`
            // adds them to the body.
            let callbacks = signatures(signature.options.get("link"))?;
            let mut body = callbacks.into_iter().fold(body, Signature::link);
            for errback in signatures(signature.options.get("link_error"))? {
                body = errback_on_body(body, &errback, true)?;
            }
            // A body tagged as a member of an enclosing group or chord keeps that group's id.
            body.options
                .entry("group_id")
                .or_insert_with(|| chord_id.clone().into());
            // What follows the chord in a chain runs after its body, as Celery hands it on.
            if let Some(rest) = rest.filter(|r| !r.is_empty()) {
                body.options.insert("chain".into(), Value::Array(rest));
            }
            let body_value = body.to_value();
            // A member ending in a group gives the body a list of results: the header's
            // results are saved, nested, which needs every id in the header known.
            let nested = header
                .iter()
                .any(|(_, member)| member.result_tuple()[1].is_array());
            let header = match nested {
                true => header
                    .into_iter()
                    .map(|(index, member)| Ok((index, member.frozen()?)))
                    .collect::<Result<Vec<_>, CanvasError>>()?,
                false => header,
            };
            let mut sent = members_of(&header, &chord_id, Some(&body_value), parent, result)?;
            let size = header.iter().map(|(_, member)| counted(member)).sum();
            match sent.first_mut() {
                Some(first) => {
                    if nested {
                        let members = header.iter().map(|(_, m)| m.result_tuple()).collect();
                        let tuple = json!([[chord_id, null], Value::Array(members)]);
                        first.saves_headers.push((chord_id.clone(), tuple));
                    }
                    first.opens_chords.insert(0, (chord_id, size))
                }
                // An empty header: the body runs at once, with no results.
                None => sent = apply(&body, parent, Some(&Value::Array(Vec::new())), None)?,
            }
            Ok(sent)
        }
        Some(kind) => Err(CanvasError(format!(
            "cannot start a {kind} as a chain step with steps after it (task {})",
            signature.task
        ))),
    }
}

/// `members` of `group` as it sends them: a group's own `link_error` option, when it has one
/// (even an empty one), replaces theirs, as Celery's `group.apply_async` hands its options on.
fn with_errbacks_of(
    group: &Signature,
    members: Vec<(usize, Signature)>,
) -> Vec<(usize, Signature)> {
    let Some(errbacks) = group.options.get("link_error").filter(|e| !e.is_null()) else {
        return members;
    };
    members
        .into_iter()
        .map(|(index, mut member)| {
            member
                .options
                .insert("link_error".into(), as_list(Some(errbacks)));
            (index, member)
        })
        .collect()
}

/// `body` with a chord's `errback` linked where Celery's `chord.run` links it
/// (`_link_error_to_body_tasks`): on each task of a group body, so that they keep their own,
/// unless the group has a `link_error` option of its own (`as_group`), which replaces theirs when
/// it runs: then on that; on a chord's body; on anything else, its own. A group in a group is
/// spliced when it runs, its options dropped: its tasks get the errback.
fn errback_on_body(
    mut body: Signature,
    errback: &Signature,
    as_group: bool,
) -> Result<Signature, CanvasError> {
    match body.subtask_type.as_deref() {
        Some("group")
            if !(as_group && body.options.get("link_error").is_some_and(|e| !e.is_null())) =>
        {
            let tasks = body
                .members()?
                .into_iter()
                .map(|task| errback_on_body(task, errback, false).map(|t| t.to_value()))
                .collect::<Result<_, _>>()?;
            body.kwargs.insert("tasks".into(), Value::Array(tasks));
            Ok(body)
        }
        Some("chord") => {
            let (_, inner) = body.chord_parts()?;
            let inner = errback_on_body(inner, errback, true)?;
            body.kwargs.insert("body".into(), inner.to_value());
            Ok(body)
        }
        _ => Ok(body.link_error(errback.clone())),
    }
}

/// How the members of nested groups join the group they sit in. Celery splices them in two
/// ways, and the order of the results (and of a chord body's argument) depends on which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Splice {
    /// A group sent without being frozen first (`group._prepared`, as a worker sends a group
    /// callback): in order, each keeping its index within its own group.
    Applied,
    /// A frozen group and every chord header (`group._freeze_unroll`): the members of a nested
    /// group last first, and indexes counted through the whole spliced list.
    Frozen,
}

/// `members` with nested groups replaced by their members, each with its group index.
fn laid_out(members: &[Signature], how: Splice) -> Result<Vec<(usize, Signature)>, CanvasError> {
    let spliced = spliced(members, how)?;
    Ok(match how {
        Splice::Applied => spliced,
        Splice::Frozen => spliced.into_iter().map(|(_, m)| m).enumerate().collect(),
    })
}

/// The leaves of `members` in the order `how` puts them, each with its index in its own list.
fn spliced(members: &[Signature], how: Splice) -> Result<Vec<(usize, Signature)>, CanvasError> {
    let mut leaves = Vec::with_capacity(members.len());
    for (index, member) in members.iter().enumerate() {
        if member.subtask_type.as_deref() == Some("group") {
            let mut nested = member.members()?;
            if how == Splice::Frozen {
                nested.reverse();
            }
            leaves.extend(spliced(&nested, how)?);
        } else {
            leaves.push((index, member.clone()));
        }
    }
    Ok(leaves)
}

/// `member` tagged as the member at `index` of group `id` (and of the chord whose body is
/// `chord`). The tags go on the step whose result is the member's, as Celery puts them: a
/// chain's last step, a chord's body.
fn tagged(
    member: &Signature,
    id: &str,
    index: usize,
    chord: Option<&Value>,
) -> Result<Signature, CanvasError> {
    let mut member = member.clone();
    match member.subtask_type.as_deref() {
        None => {
            member = member.member_of(id, index);
            if let Some(body) = chord {
                member.options.insert("chord".into(), body.clone());
            }
        }
        Some("chain") => {
            let mut steps = member.members()?;
            let last = steps
                .pop()
                .ok_or_else(|| CanvasError("an empty chain".into()))?;
            steps.push(tagged(&last, id, index, chord)?);
            let tasks = steps.iter().map(Signature::to_value).collect();
            member.kwargs.insert("tasks".into(), Value::Array(tasks));
        }
        Some("chord") => {
            let (_, body) = member.chord_parts()?;
            let body = tagged(&body, id, index, chord)?;
            member.kwargs.insert("body".into(), body.to_value());
        }
        // A group whose result is the member's (ending a chain or a chord body): its members,
        // spliced as Celery freezes them, are sent as members of `id` when it runs (see
        // [`chord_member`]), and the member's result is theirs as one list.
        Some("group") => {
            let members = frozen_members(&member.members()?)?;
            member.kwargs.insert("tasks".into(), Value::Array(members));
            member = member.member_of(id, index);
            if let Some(body) = chord {
                member.options.insert("chord".into(), body.clone());
            }
        }
        Some(kind) => {
            return Err(CanvasError(format!(
                "a {kind} ending a chain or chord body in a group is not supported yet"
            )))
        }
    }
    Ok(member)
}

/// The chord of the header member whose result is `group`'s (a group ending a chain or a
/// chord body), as [`tagged`] or Celery's freeze leaves it: the chord's id (the group's
/// `group_id`) and body (its `chord`).
fn chord_member(group: &Signature) -> Option<(String, &Value)> {
    let body = group.options.get("chord").filter(|body| !body.is_null())?;
    Some((group.option_str("group_id")?, body))
}

/// How many results `member` adds to the chord whose header it is in (Celery's
/// `chord._descend`): a task one, a group each of its members', a chain its last counting
/// step's, a chord its body's.
fn counted(member: &Signature) -> usize {
    match member.subtask_type.as_deref() {
        Some("group") => member.members().map_or(0, |m| m.iter().map(counted).sum()),
        Some("chain") => member.members().map_or(0, |steps| {
            steps
                .iter()
                .rev()
                .map(counted)
                .find(|&n| n > 0)
                .unwrap_or(0)
        }),
        Some("chord") => member.chord_parts().map_or(0, |(_, body)| counted(&body)),
        _ => 1,
    }
}

/// The id a group or chord signature carries: its `task_id` option (Celery's frozen group id),
/// else its `group_id`.
fn given_group_id(signature: &Signature) -> Option<String> {
    signature
        .option_str("task_id")
        .or_else(|| signature.option_str("group_id"))
}

/// The id a group or chord is started under: the one it carries, else a new one.
fn group_id(signature: &Signature) -> String {
    given_group_id(signature).unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// The requests of group `id`'s `members` (each with its index), with `chord` as the chord
/// they are header members of, if any.
fn members_of(
    members: &[(usize, Signature)],
    id: &str,
    chord: Option<&Value>,
    parent: Option<&TaskRequest>,
    result: Option<&Value>,
) -> Result<Vec<Next>, CanvasError> {
    let mut sent = Vec::new();
    for (index, member) in members {
        sent.extend(apply(
            &tagged(member, id, *index, chord)?,
            parent,
            result,
            None,
        )?);
    }
    Ok(sent)
}

/// The request for a plain task signature.
fn request_for(
    signature: &Signature,
    parent: Option<&TaskRequest>,
    result: Option<&Value>,
    chain: Option<Vec<Value>>,
) -> Next {
    let mut args = Vec::with_capacity(signature.args.len() + 1);
    if let (Some(result), false) = (result, signature.immutable) {
        args.push(result.clone());
    }
    args.extend(signature.args.iter().cloned());
    let mut request = TaskRequest::new(&signature.task, args, signature.kwargs.clone());
    let options = &signature.options;
    if let Some(id) = signature.option_str("task_id") {
        request.id = id;
    }
    request.root_id = Some(match parent {
        Some(parent) => parent.root_id.clone().unwrap_or_else(|| parent.id.clone()),
        None => request.id.clone(),
    });
    request.parent_id = parent.map(|p| p.id.clone());
    request.group = signature.option_str("group_id");
    request.group_index = options.get("group_index").and_then(Value::as_u64);
    let null = || Value::Null;
    request.embed = json!({
        "callbacks": as_list(options.get("link")),
        "errbacks": as_list(options.get("link_error")),
        "chain": chain
            .map(Value::Array)
            .or_else(|| options.get("chain").filter(|c| c.is_array()).cloned())
            .unwrap_or_else(null),
        "chord": options.get("chord").cloned().unwrap_or_else(null),
    });
    let now = Utc::now();
    let seconds_from_now = |v: &Value| {
        v.as_f64()
            .and_then(|s| chrono::Duration::try_milliseconds((s * 1e3) as i64))
            .and_then(|d| now.checked_add_signed(d))
    };
    let date = |v: &Value| {
        v.as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|d| d.to_utc())
    };
    request.eta = options
        .get("eta")
        .and_then(date)
        .or_else(|| options.get("countdown").and_then(seconds_from_now));
    request.expires = options
        .get("expires")
        .and_then(|v| date(v).or_else(|| seconds_from_now(v)));
    if let Some(priority) = options.get("priority").and_then(Value::as_u64) {
        request.properties.priority = priority.min(255) as u8;
    }
    request.properties.reply_to = signature.option_str("reply_to");
    request.ignore_result = options
        .get("ignore_result")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    request.timelimit = (
        options.get("time_limit").and_then(Value::as_f64),
        options.get("soft_time_limit").and_then(Value::as_f64),
    );
    if let Some((names, stamps)) = crate::stamps::stamp_headers(options) {
        request
            .extra_headers
            .insert("stamped_headers".into(), names);
        request.extra_headers.insert("stamps".into(), stamps);
    }
    if let Some(nesting) = options.get("replaced_task_nesting").filter(|n| n.is_u64()) {
        request
            .extra_headers
            .insert(REPLACED_TASK_NESTING.into(), nesting.clone());
    }
    Next {
        request,
        queue: signature.option_str("queue"),
        opens_chords: Vec::new(),
        saves_headers: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Map;

    use super::*;

    fn sig(task: &str, args: Value, options: Value) -> Value {
        json!({"task": task, "args": args, "kwargs": {}, "options": options,
               "subtask_type": null, "immutable": false})
    }

    fn parent(embed: Value) -> TaskRequest {
        let mut request = TaskRequest::new("tasks.add", vec![json!(1), json!(1)], Map::new());
        request.id = "t".into();
        request.root_id = Some("r".into());
        request.embed = embed;
        request
    }

    #[test]
    fn the_next_chain_step_is_the_last_element_and_gets_the_rest() {
        // chain(add.s(1, 1), mul.s(10), xsum.s()) as the first step's embed carries it.
        let first = parent(
            json!({"callbacks": null, "errbacks": null, "chord": null, "chain": [
                sig("xsum", json!([]), json!({"task_id": "c3"})),
                sig("mul", json!([10]), json!({"task_id": "c2", "queue": "q2"})),
            ]}),
        );
        let sent = after_success(&first, &json!(2)).unwrap();
        let next = &sent.next;
        assert_eq!(next.len(), 1);
        let step = &next[0];
        assert_eq!(step.queue.as_deref(), Some("q2"));
        let r = &step.request;
        assert_eq!((r.id.as_str(), r.task.as_str()), ("c2", "mul"));
        assert_eq!(r.args, vec![json!(2), json!(10)]);
        assert_eq!(
            (r.parent_id.as_deref(), r.root_id.as_deref()),
            (Some("t"), Some("r"))
        );
        assert_eq!(
            r.embed["chain"],
            json!([sig("xsum", json!([]), json!({"task_id": "c3"}))])
        );
        // The last step gets an empty list, as Celery sends it.
        let last = after_success(r, &json!(20)).unwrap().next;
        assert_eq!(last[0].request.embed["chain"], json!([]));
        assert_eq!(last[0].request.root_id.as_deref(), Some("r"));
        assert!(after_success(&last[0].request, &json!(20))
            .unwrap()
            .next
            .is_empty());
        assert_eq!(sent.children, vec![json!([["c2", null], null])]);
    }

    #[test]
    fn a_stamped_step_is_sent_with_its_stamps() {
        // chain(add.s(1, 1), sleeping.si(4) stamped monitoring_id=m1) as the embed carries it.
        let first = parent(
            json!({"callbacks": null, "errbacks": null, "chord": null, "chain": [
                sig("sleeping", json!([4]), json!({"task_id": "c2", "monitoring_id": "m1",
                                                   "stamped_headers": ["monitoring_id"]})),
            ]}),
        );
        let sent = after_success(&first, &json!(2)).unwrap().next;
        let headers = &sent[0].request.extra_headers;
        assert_eq!(headers["stamped_headers"], json!(["monitoring_id"]));
        assert_eq!(headers["stamps"], json!({"monitoring_id": "m1"}));
    }

    #[test]
    fn links_get_the_result_unless_immutable_and_keep_their_own_options() {
        let mut immutable = sig("log", json!(["done"]), json!({}));
        immutable["immutable"] = json!(true);
        let link = sig(
            "mul",
            json!([10]),
            json!({"link": sig("after", json!([]), json!({})), "countdown": 60}),
        );
        let first = parent(
            json!({"callbacks": [link, immutable], "errbacks": null, "chain": null, "chord": null}),
        );
        let sent = after_success(&first, &json!(5)).unwrap();
        let next = &sent.next;
        let args: Vec<_> = next.iter().map(|n| n.request.args.clone()).collect();
        assert_eq!(args, vec![vec![json!(5), json!(10)], vec![json!("done")]]);
        // Several callbacks go out as one group, as Celery's worker sends them.
        let group_id = next[0].request.group.clone().expect("a group");
        let indexes: Vec<_> = next
            .iter()
            .map(|n| (n.request.group.clone(), n.request.group_index))
            .collect();
        assert_eq!(
            indexes,
            [
                (Some(group_id.clone()), Some(0)),
                (Some(group_id.clone()), Some(1))
            ]
        );
        let members: Vec<_> = next
            .iter()
            .map(|n| json!([[n.request.id, null], null]))
            .collect();
        assert_eq!(sent.children, vec![json!([[group_id, null], members])]);
        assert_eq!(
            next[0].request.embed["callbacks"][0]["task"], "after",
            "always a list"
        );
        assert_eq!(next[0].request.embed["chain"], Value::Null);
        let eta = next[0].request.eta.expect("countdown makes an eta");
        assert!(eta > Utc::now() + chrono::Duration::seconds(50));
    }

    #[test]
    fn a_failure_sends_errbacks_with_the_failed_id_and_names_the_steps_that_never_run() {
        let mut immutable = sig("log", json!(["eb"]), json!({}));
        immutable["immutable"] = json!(true);
        let first = parent(json!({
            "callbacks": [sig("never", json!([]), json!({}))],
            "errbacks": [sig("on_error", json!([1]), json!({})), immutable],
            "chord": null,
            "chain": [sig("c", json!([]), json!({"task_id": "c3"})), sig("b", json!([]), json!({"task_id": "c2"}))],
        }));
        let Failed {
            sent: errbacks,
            never,
            ..
        } = after_failure(&first, |_| false).unwrap();
        let calls: Vec<_> = errbacks
            .next
            .iter()
            .map(|n| (n.request.task.as_str(), n.request.args.clone()))
            .collect();
        assert_eq!(
            calls,
            vec![
                ("on_error", vec![json!("t"), json!(1)]),
                ("log", vec![json!("eb")])
            ]
        );
        // As Celery sends them: one new group, its result tuple the children of what failed.
        let group_id = errbacks.next[0]
            .request
            .group
            .clone()
            .expect("a group member");
        let tags: Vec<_> = errbacks
            .next
            .iter()
            .map(|n| {
                (
                    n.request.group.as_deref(),
                    n.request.group_index,
                    n.request.parent_id.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            tags,
            [
                (Some(group_id.as_str()), Some(0), Some("t")),
                (Some(group_id.as_str()), Some(1), Some("t"))
            ]
        );
        let member = |n: &Next| json!([[n.request.id, null], null]);
        assert_eq!(
            errbacks.children,
            [json!([
                [group_id, null],
                [member(&errbacks.next[0]), member(&errbacks.next[1])]
            ])]
        );
        let never: Vec<_> = never.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(never, ["c3", "c2"]);
    }

    #[test]
    fn a_group_step_fans_out_with_group_id_and_index() {
        let group = json!({"task": "celery.group", "args": [], "options": {"task_id": "g1"},
            "subtask_type": "group", "immutable": false,
            "kwargs": {"tasks": [sig("a", json!([1]), json!({})), sig("b", json!([2]), json!({}))]}});
        let first =
            parent(json!({"callbacks": null, "errbacks": null, "chord": null, "chain": [group]}));
        let next = after_success(&first, &json!(7)).unwrap().next;
        let members: Vec<_> = next
            .iter()
            .map(|n| {
                (
                    n.request.task.as_str(),
                    n.request.args.clone(),
                    n.request.group.as_deref(),
                    n.request.group_index,
                )
            })
            .collect();
        assert_eq!(
            members,
            vec![
                ("a", vec![json!(7), json!(1)], Some("g1"), Some(0)),
                ("b", vec![json!(7), json!(2)], Some("g1"), Some(1)),
            ]
        );
    }

    #[test]
    fn a_nested_chain_runs_its_steps_before_the_rest_of_the_outer_one() {
        let inner = json!({"task": "celery.chain", "args": [], "options": {}, "subtask_type": "chain",
            "immutable": false, "kwargs": {"tasks": [sig("x", json!([]), json!({})), sig("y", json!([]), json!({}))]}});
        let first = parent(json!({"callbacks": null, "errbacks": null, "chord": null,
            "chain": [sig("z", json!([]), json!({})), inner]}));
        let next = after_success(&first, &json!(1)).unwrap().next;
        assert_eq!(next[0].request.task, "x");
        let rest: Vec<_> = next[0].request.embed["chain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["task"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(rest, ["z", "y"], "y next (last), then z");
    }

    #[test]
    fn what_cannot_be_followed_is_a_clear_error() {
        let headless = json!({"task": "celery.chord", "args": [], "options": {}, "subtask_type": "chord",
            "immutable": false, "kwargs": {}});
        let first = parent(
            json!({"callbacks": null, "errbacks": null, "chord": null, "chain": [headless]}),
        );
        let error = after_success(&first, &json!(1)).unwrap_err();
        assert!(error.0.contains("a chord without its header"), "{error}");
        let bad = parent(
            json!({"callbacks": [{"args": []}], "errbacks": null, "chord": null, "chain": null}),
        );
        assert!(after_success(&bad, &json!(1))
            .unwrap_err()
            .0
            .contains("names no task"));
        let bad = parent(
            json!({"callbacks": [sig("a", json!({"x": 1}), json!({}))], "errbacks": null, "chord": null, "chain": null}),
        );
        assert!(after_success(&bad, &json!(1))
            .unwrap_err()
            .0
            .contains("args must be a list"));
    }

    #[test]
    fn a_built_chain_starts_with_its_first_step_carrying_the_rest() {
        let (a, b, c) = (
            Signature::new("a", vec![json!(1)]),
            Signature::new("b", vec![]).on_queue("qb"),
            Signature::new("c", vec![]).set_immutable(),
        );
        let ids: Vec<_> = [&a, &b, &c]
            .iter()
            .map(|s| s.option_str("task_id").unwrap())
            .collect();
        let canvas = crate::chain![a, b, c];
        assert_eq!(canvas.final_ids(), vec![ids[2].clone()]);
        let sent = start(&canvas).unwrap();
        assert_eq!(sent.len(), 1);
        let first = &sent[0].request;
        assert_eq!(
            (first.id.as_str(), first.args.clone()),
            (ids[0].as_str(), vec![json!(1)])
        );
        assert_eq!(first.root_id.as_deref(), Some(ids[0].as_str()));
        assert_eq!(first.parent_id, None);
        let rest: Vec<_> = first.embed["chain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["options"]["task_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            rest,
            [ids[2].clone(), ids[1].clone()],
            "the next step is the last element"
        );
    }

    #[test]
    fn a_built_chord_opens_with_its_size_and_carries_its_body() {
        let body = Signature::new("sum", vec![]);
        let body_id = body.option_str("task_id").unwrap();
        let header: Vec<_> = (0..3)
            .map(|i| Signature::new("mul", vec![json!(i), json!(2)]))
            .collect();
        let canvas = chord(header, body);
        assert_eq!(canvas.final_ids(), vec![body_id.clone()]);
        let sent = start(&canvas).unwrap();
        let chord_id = sent[0].request.group.clone().unwrap();
        assert_eq!(sent[0].opens_chords, [(chord_id.clone(), 3)]);
        assert!(sent[1..].iter().all(|n| n.opens_chords.is_empty()));
        for (index, next) in sent.iter().enumerate() {
            assert_eq!(next.request.group.as_deref(), Some(chord_id.as_str()));
            assert_eq!(next.request.group_index, Some(index as u64));
            let carried = &next.request.embed["chord"];
            assert_eq!(carried["options"]["task_id"], json!(body_id));
            assert_eq!(carried["options"]["group_id"], json!(chord_id));
        }
    }

    #[test]
    fn links_accumulate_and_a_group_ends_with_its_members() {
        let linked = Signature::new("a", vec![])
            .link(Signature::new("l1", vec![]))
            .link(Signature::new("l2", vec![]))
            .link_error(Signature::new("e", vec![]));
        let tasks: Vec<_> = linked.options["link"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["task"].clone())
            .collect();
        assert_eq!(tasks, [json!("l1"), json!("l2")]);
        let sent = start(&linked).unwrap();
        assert_eq!(
            sent[0].request.embed["callbacks"].as_array().unwrap().len(),
            2
        );
        assert_eq!(sent[0].request.embed["errbacks"][0]["task"], "e");
        let members = vec![Signature::new("x", vec![]), Signature::new("y", vec![])];
        let ids: Vec<_> = members
            .iter()
            .map(|m| m.option_str("task_id").unwrap())
            .collect();
        assert_eq!(group(members).final_ids(), ids);
    }

    #[test]
    fn a_chain_in_a_chord_header_counts_through_its_last_step() {
        let body = Signature::new("sum", vec![]);
        let (a, b) = (Signature::new("a", vec![]), Signature::new("b", vec![]));
        let b_id = b.option_str("task_id").unwrap();
        let canvas = chord(vec![crate::chain![a, b], Signature::new("c", vec![])], body);
        let sent = start(&canvas).unwrap();
        assert_eq!(sent.len(), 2);
        let chord_id = sent[1].request.group.clone().unwrap();
        assert_eq!(sent[0].opens_chords, [(chord_id.clone(), 2)], "two members");
        let first_step = &sent[0].request;
        assert_eq!(
            (first_step.group.as_ref(), &first_step.embed["chord"]),
            (None, &Value::Null)
        );
        let last_step = &first_step.embed["chain"][0];
        assert_eq!(last_step["options"]["task_id"], json!(b_id));
        assert_eq!(last_step["options"]["group_id"], json!(chord_id));
        assert_eq!(last_step["options"]["group_index"], json!(0));
        assert_eq!(last_step["options"]["chord"]["task"], "sum");
        // When that last step runs, it carries the chord.
        let b_request = after_success(first_step, &json!(1))
            .unwrap()
            .next
            .remove(0)
            .request;
        assert_eq!(
            (b_request.group.as_deref(), b_request.group_index),
            (Some(chord_id.as_str()), Some(0))
        );
        assert_eq!(chord_of(&b_request).unwrap().unwrap().task, "sum");
    }

    #[test]
    fn a_chord_step_is_one_group_child() {
        let canvas = crate::chain![
            Signature::new("x", vec![]),
            chord(
                vec![Signature::new("h1", vec![]), Signature::new("h2", vec![])],
                Signature::new("body", vec![])
            )
        ];
        let x = start(&canvas).unwrap().remove(0).request;
        let sent = after_success(&x, &json!(1)).unwrap();
        let chord_id = sent.next[0].request.group.clone().unwrap();
        let members: Vec<_> = sent
            .next
            .iter()
            .map(|n| json!([[n.request.id, null], null]))
            .collect();
        assert_eq!(sent.children, vec![json!([[chord_id, null], members])]);
    }

    #[test]
    fn steps_after_a_chord_run_after_its_body() {
        let canvas = crate::chain![
            Signature::new("x", vec![]),
            chord(
                vec![Signature::new("h", vec![])],
                Signature::new("body", vec![])
            ),
            Signature::new("y", vec![])
        ];
        let x = start(&canvas).unwrap().remove(0).request;
        let header = after_success(&x, &json!(1)).unwrap().next;
        assert_eq!(header[0].request.task, "h");
        let body = chord_of(&header[0].request).unwrap().unwrap();
        let body_request = chord_body(&body, &header[0].request, vec![json!(2)])
            .unwrap()
            .remove(0)
            .request;
        assert_eq!(body_request.embed["chain"][0]["task"], "y");
        let never = after_failure(&x, |_| false).unwrap().never;
        let never: Vec<_> = never.iter().map(|r| r.task.as_str()).collect();
        assert_eq!(
            never,
            ["y", "body"],
            "a failure before the chord fails its body too"
        );
    }

    #[test]
    fn steps_after_a_chord_whose_body_is_a_chord_run_after_the_inner_body() {
        // chain(x, group(h1) | group(h2) | inner_body, y): a chord whose body is a chord.
        let canvas = crate::chain![
            Signature::new("x", vec![]),
            chord(
                vec![Signature::new("h1", vec![])],
                chord(
                    vec![Signature::new("h2", vec![])],
                    Signature::new("inner_body", vec![])
                )
            ),
            Signature::new("y", vec![])
        ];
        let x = start(&canvas).unwrap().remove(0).request;
        let h1 = after_success(&x, &json!(1)).unwrap().next.remove(0).request;
        let outer_body = chord_of(&h1).unwrap().unwrap();
        let h2 = chord_body(&outer_body, &h1, vec![json!(2)])
            .unwrap()
            .remove(0)
            .request;
        assert_eq!(h2.task, "h2");
        let inner_body = chord_of(&h2).unwrap().unwrap();
        let inner = chord_body(&inner_body, &h2, vec![json!(3)])
            .unwrap()
            .remove(0)
            .request;
        assert_eq!(inner.task, "inner_body");
        assert_eq!(inner.embed["chain"][0]["task"], "y");
    }

    #[test]
    fn a_group_with_steps_after_it_becomes_a_chord_whose_body_is_the_next_step() {
        // A chord body as Celery sends it: chain(x, group(a, b), y, z), never prepared.
        let members = group(vec![
            Signature::new("a", vec![]),
            Signature::new("b", vec![]),
        ])
        .with_id("g");
        let canvas = crate::chain![
            Signature::new("x", vec![]),
            members,
            Signature::new("y", vec![]).with_id("y"),
            Signature::new("z", vec![])
        ];
        let x = start(&canvas).unwrap().remove(0).request;
        let sent = after_success(&x, &json!(1)).unwrap().next;
        let tasks: Vec<_> = sent.iter().map(|n| n.request.task.as_str()).collect();
        assert_eq!(tasks, ["a", "b"]);
        assert_eq!(sent[0].opens_chords, vec![("g".to_string(), 2)]);
        let a = &sent[0].request;
        assert_eq!(a.args, vec![json!(1)]);
        assert_eq!(a.group.as_deref(), Some("g"));
        let body = chord_of(a).unwrap().unwrap();
        let y = chord_body(&body, a, vec![json!(2), json!(3)])
            .unwrap()
            .remove(0)
            .request;
        assert_eq!((y.id.as_str(), y.args.clone()), ("y", vec![json!([2, 3])]));
        assert_eq!(y.embed["chain"][0]["task"], "z");
    }

    #[test]
    fn a_failed_chord_fails_its_group_body_and_the_steps_after_it() {
        // chain(chord([h], group(a, b)), chord([c], d)), as Celery hands the rest to the body.
        let canvas = crate::chain![
            chord(
                vec![Signature::new("h", vec![])],
                group(vec![
                    Signature::new("a", vec![]),
                    Signature::new("b", vec![])
                ])
            ),
            chord(
                vec![Signature::new("c", vec![])],
                Signature::new("d", vec![]).with_id("d")
            )
        ];
        let h = start(&canvas).unwrap().remove(0).request;
        let body = chord_of(&h).unwrap().unwrap();
        let (started, never) = failed_chord_body(&body, &h).unwrap();
        let started: Vec<_> = started.iter().map(|n| n.request.task.as_str()).collect();
        assert_eq!(started, ["a", "b"]);
        let never: Vec<_> = never.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(never, ["d"], "the chord after it fails through its body");
    }

    #[test]
    fn errbacks_called_here_get_the_failed_request_its_exception_and_traceback() {
        let failed = parent(json!({"callbacks": null, "chain": null, "chord": null,
            "errbacks": [sig("new", json!(["l"]), json!({})), sig("old", json!([]), json!({}))]}));
        let after = after_failure(&failed, |e| e.task == "new").unwrap();
        assert_eq!(after.sent.next.len(), 1);
        assert_eq!(after.sent.next[0].request.args, vec![json!("t")]);
        let call = called_errback(&after.called[0], &failed, json!("exc"), json!("tb"));
        assert_eq!(call.task, "new");
        assert_eq!(call.args[0]["id"], "t");
        assert_eq!(call.args[1..], [json!("exc"), json!("tb"), json!("l")]);
    }

    #[test]
    fn a_chains_own_links_go_on_its_steps() {
        // A chain as a chord body carries them, with link_error on the chain itself.
        let canvas = crate::chain![Signature::new("a", vec![]), Signature::new("b", vec![])]
            .link_error(Signature::new("on_error", vec![]))
            .link(Signature::new("on_success", vec![]));
        let a = start(&canvas).unwrap().remove(0).request;
        assert_eq!(a.embed["errbacks"][0]["task"], "on_error");
        assert_eq!(a.embed["callbacks"], Value::Null);
        let b = after_success(&a, &json!(1)).unwrap().next.remove(0).request;
        assert_eq!(b.embed["errbacks"][0]["task"], "on_error");
        assert_eq!(b.embed["callbacks"][0]["task"], "on_success");
    }

    #[test]
    fn a_failed_chord_fails_a_chord_body_as_one_without_starting_its_header() {
        // chord([h], chord([a, b], c)).apply_async(link_error=e), as Celery's client sends it:
        // the chord body carries the errback, and its id is its header's.
        let e = Signature::new("e", vec![]);
        let inner = chord(
            vec![Signature::new("a", vec![]), Signature::new("b", vec![])],
            Signature::new("c", vec![]),
        )
        .link_error(e.clone());
        let inner_id = inner.option_str("task_id").unwrap();
        let h = start(&chord(vec![Signature::new("h", vec![])], inner))
            .unwrap()
            .remove(0)
            .request;
        let (failed, never) = failed_chord_body(&chord_of(&h).unwrap().unwrap(), &h).unwrap();
        assert!(never.is_empty());
        let failed: Vec<_> = failed.iter().map(|n| &n.request).collect();
        assert_eq!(
            (failed.len(), failed[0].id.as_str()),
            (1, inner_id.as_str())
        );
        assert_eq!(failed[0].embed["errbacks"], json!([e.to_value()]));
    }

    #[test]
    fn a_failed_chord_fails_each_result_of_a_group_body_with_its_errbacks_and_the_groups() {
        // group(chord([a], b), c, d).set(link_error=[g]): b's errbacks, c's own and d's, then
        // g once each.
        let (e, own, g) = (
            Signature::new("e", vec![]),
            Signature::new("own", vec![]),
            Signature::new("g", vec![]),
        );
        let b = Signature::new("b", vec![]).link_error(e.clone());
        let b_id = b.option_str("task_id").unwrap();
        let c = Signature::new("c", vec![]).link_error(own.clone());
        let d = Signature::new("d", vec![]).link_error(g.clone());
        let mut body = group(vec![
            chord(vec![Signature::new("a", vec![])], b),
            c.clone(),
            d.clone(),
        ]);
        body.options
            .insert("link_error".into(), json!([g.to_value()]));
        let parent =
            parent(json!({"callbacks": null, "errbacks": null, "chain": null, "chord": null}));
        let (failed, _) = failed_chord_body(&body, &parent).unwrap();
        let failed: Vec<_> = failed
            .iter()
            .map(|n| {
                let errbacks = signatures(n.request.embed.get("errbacks")).unwrap();
                let names: Vec<_> = errbacks.into_iter().map(|e| e.task).collect();
                (n.request.id.clone(), names)
            })
            .collect();
        let id = |s: &Signature| s.option_str("task_id").unwrap();
        assert_eq!(
            failed,
            [
                (b_id, vec!["e".to_string(), "g".into()]),
                (id(&c), vec!["own".into(), "g".into()]),
                (id(&d), vec!["g".into()]),
            ]
        );
    }

    #[test]
    fn a_groups_own_errbacks_replace_those_of_its_members_when_it_runs() {
        let failing = Signature::new("fail", vec![]).link_error(Signature::new("own", vec![]));
        let mut canvas = group(vec![failing, Signature::new("ok", vec![])]);
        canvas.options.insert(
            "link_error".into(),
            json!([Signature::new("g", vec![]).to_value()]),
        );
        for next in start(&canvas).unwrap() {
            let errbacks = signatures(next.request.embed.get("errbacks")).unwrap();
            let names: Vec<_> = errbacks.iter().map(|e| e.task.as_str()).collect();
            assert_eq!(names, ["g"], "{}", next.request.task);
        }
    }

    #[test]
    fn a_chords_errbacks_go_on_each_task_of_a_group_body_which_keeps_its_own() {
        let e = Signature::new("e", vec![]);
        let names = |next: &Next| -> Vec<String> {
            signatures(next.request.embed.get("errbacks"))
                .unwrap()
                .into_iter()
                .map(|e| e.task)
                .collect()
        };
        let started = |body: Signature| {
            let canvas = chord(vec![Signature::new("h", vec![])], body).link_error(e.clone());
            let h = start(&canvas).unwrap().remove(0).request;
            chord_body(&chord_of(&h).unwrap().unwrap(), &h, vec![json!(1)]).unwrap()
        };
        // group(a with its own errback, chord([x], b)): a keeps its own, b gets e, x does not.
        let a = Signature::new("a", vec![]).link_error(Signature::new("own", vec![]));
        let inner = chord(
            vec![Signature::new("x", vec![])],
            Signature::new("b", vec![]),
        );
        let sent = started(group(vec![a.clone(), inner]));
        assert_eq!(names(&sent[0]), ["own", "e"]);
        assert_eq!(sent[1].request.task, "x");
        assert!(names(&sent[1]).is_empty());
        let b = chord_of(&sent[1].request).unwrap().unwrap();
        assert_eq!(b.options["link_error"][0]["task"], "e");
        // A group body with errbacks of its own gets the chord's with them, replacing a's.
        let mut body = group(vec![a]);
        body.options.insert(
            "link_error".into(),
            json!([Signature::new("g", vec![]).to_value()]),
        );
        assert_eq!(names(&started(body)[0]), ["g", "e"]);
    }

    #[test]
    fn a_chords_own_links_go_on_its_body() {
        let canvas = crate::chain![
            Signature::new("x", vec![]),
            chord(
                vec![Signature::new("h", vec![])],
                Signature::new("body", vec![])
            )
            .link(Signature::new("on_success", vec![]))
            .link_error(Signature::new("on_error", vec![]))
        ];
        let x = start(&canvas).unwrap().remove(0).request;
        let h = after_success(&x, &json!(1)).unwrap().next.remove(0).request;
        assert_eq!(h.embed["callbacks"], Value::Null);
        let body = chord_of(&h).unwrap().unwrap();
        let body = chord_body(&body, &h, vec![json!(2)])
            .unwrap()
            .remove(0)
            .request;
        assert_eq!(body.embed["callbacks"][0]["task"], "on_success");
        assert_eq!(body.embed["errbacks"][0]["task"], "on_error");
    }

    #[test]
    fn freezing_names_every_result_before_it_is_sent() {
        let bare = |task: &str| json!({"task": task, "args": [], "kwargs": {}, "options": {}});
        let canvas = json!({"task": "celery.chord", "subtask_type": "chord", "options": {},
            "kwargs": {"header": {"task": "celery.group", "subtask_type": "group", "options": {},
                                  "kwargs": {"tasks": [bare("a"), bare("b")]}},
                       "body": {"task": "celery.chain", "subtask_type": "chain", "options": {},
                                "kwargs": {"tasks": [bare("c"), bare("d")]}}}});
        let unfrozen = Signature::from_value(&canvas).unwrap();
        assert!(unfrozen.final_ids().is_empty());
        let frozen = unfrozen.frozen().unwrap();
        let ids = frozen.final_ids();
        assert_eq!(ids.len(), 1, "the body chain's last step");
        let sent = start(&frozen).unwrap();
        let body = &sent[0].request.embed["chord"];
        assert_eq!(
            body["kwargs"]["tasks"][1]["options"]["task_id"],
            json!(ids[0])
        );
        assert!(sent.iter().all(|n| n.request.group.is_some()));
    }

    /// `(task, group, group_index)` of each request, for comparing layouts.
    fn tags(sent: &[Next]) -> Vec<(String, Option<String>, Option<u64>)> {
        sent.iter()
            .map(|n| {
                let r = &n.request;
                (r.task.clone(), r.group.clone(), r.group_index)
            })
            .collect()
    }

    fn group_value(id: &str, tasks: Vec<Value>) -> Value {
        json!({"task": "celery.group", "args": [], "options": {"task_id": id},
               "subtask_type": "group", "immutable": false, "kwargs": {"tasks": tasks}})
    }

    #[test]
    fn a_group_sent_unfrozen_splices_nested_groups_in_order_keeping_their_indexes() {
        let nested = group_value(
            "inner",
            vec![
                sig("a", json!([]), json!({})),
                sig("b", json!([]), json!({})),
            ],
        );
        let outer = group_value("g", vec![nested, sig("c", json!([]), json!({}))]);
        let first =
            parent(json!({"callbacks": null, "errbacks": null, "chord": null, "chain": [outer]}));
        let sent = after_success(&first, &json!(1)).unwrap();
        let g = Some("g".to_string());
        assert_eq!(
            tags(&sent.next),
            [
                ("a".into(), g.clone(), Some(0)),
                ("b".into(), g.clone(), Some(1)),
                ("c".into(), g.clone(), Some(1)),
            ],
            "group._prepared: each index is the one in its own group"
        );
        assert_eq!(sent.children.len(), 1, "one group child");
        assert_eq!(sent.children[0][0][0], json!("g"));
        assert_eq!(sent.children[0][1].as_array().unwrap().len(), 3);
    }

    #[test]
    fn freezing_splices_nested_groups_last_first_and_indexes_them_through() {
        let (a, b, c, d) = (
            Signature::new("a", vec![]),
            Signature::new("b", vec![]),
            Signature::new("c", vec![]),
            Signature::new("d", vec![]),
        );
        let id = |s: &Signature| s.option_str("task_id").unwrap();
        let ids = [id(&a), id(&b), id(&c), id(&d)];
        // group(a, group(b, group(c, d))) freezes, as Celery's does, to group(a, d, c, b).
        let canvas = group(vec![a, group(vec![b, group(vec![c, d])])]);
        let frozen = canvas.frozen().unwrap();
        assert_eq!(
            frozen.final_ids(),
            [&ids[0], &ids[3], &ids[2], &ids[1]].map(String::clone)
        );
        let sent = start(&frozen).unwrap();
        let g = canvas.option_str("task_id");
        let tasks: Vec<_> = ["a", "d", "c", "b"]
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), g.clone(), Some(i as u64)))
            .collect();
        assert_eq!(tags(&sent), tasks);
    }

    #[test]
    fn a_group_in_a_chord_header_is_spliced_as_celery_freezes_the_header() {
        // chain(x, chord([group(a, b), c], body)) as a Python client sends it, unfrozen.
        let header = group_value(
            "h",
            vec![
                group_value(
                    "inner",
                    vec![
                        sig("a", json!([]), json!({})),
                        sig("b", json!([]), json!({})),
                    ],
                ),
                sig("c", json!([]), json!({})),
            ],
        );
        let step = json!({"task": "celery.chord", "args": [], "options": {"task_id": "ch"},
            "subtask_type": "chord", "immutable": false,
            "kwargs": {"header": header, "body": sig("body", json!([]), json!({"task_id": "bd"}))}});
        let first =
            parent(json!({"callbacks": null, "errbacks": null, "chord": null, "chain": [step]}));
        let sent = after_success(&first, &json!(1)).unwrap().next;
        let ch = Some("ch".to_string());
        assert_eq!(
            tags(&sent),
            [
                ("b".into(), ch.clone(), Some(0)),
                ("a".into(), ch.clone(), Some(1)),
                ("c".into(), ch.clone(), Some(2)),
            ]
        );
        assert_eq!(
            sent[0].opens_chords,
            [("ch".to_string(), 3)],
            "every leaf counts"
        );
        assert!(sent
            .iter()
            .all(|n| n.request.embed["chord"]["options"]["task_id"] == "bd"));
    }

    #[test]
    fn a_chord_in_a_group_is_the_member_through_its_body() {
        let body = Signature::new("body", vec![]);
        let c = Signature::new("c", vec![]);
        let (body_id, c_id) = (
            body.option_str("task_id").unwrap(),
            c.option_str("task_id").unwrap(),
        );
        let inner = chord(
            vec![Signature::new("a", vec![]), Signature::new("b", vec![])],
            body,
        );
        let canvas = group(vec![inner.clone(), c]);
        let g = canvas.option_str("task_id").unwrap();
        let chord_id = inner.option_str("task_id").unwrap();
        assert_eq!(canvas.final_ids(), [body_id.clone(), c_id]);
        let sent = start(&canvas.frozen().unwrap()).unwrap();
        let (ch, g_some) = (Some(chord_id.clone()), Some(g.clone()));
        assert_eq!(
            tags(&sent),
            [
                ("a".into(), ch.clone(), Some(0)),
                ("b".into(), ch, Some(1)),
                ("c".into(), g_some, Some(1)),
            ]
        );
        assert_eq!(
            sent[0].opens_chords,
            [(chord_id, 2)],
            "only the chord opens"
        );
        let carried = &sent[0].request.embed["chord"];
        assert_eq!(carried["options"]["task_id"], json!(body_id));
        assert_eq!(
            (
                &carried["options"]["group_id"],
                &carried["options"]["group_index"]
            ),
            (&json!(g), &json!(0)),
            "the body's result is the group's first member"
        );
        // The body, once sent, is a member of the group but of no chord.
        let body_request = chord_body(
            &chord_of(&sent[1].request).unwrap().unwrap(),
            &sent[1].request,
            vec![json!(1), json!(2)],
        )
        .unwrap()
        .remove(0)
        .request;
        assert_eq!(
            (body_request.group.as_deref(), body_request.group_index),
            (Some(g.as_str()), Some(0))
        );
        assert_eq!(chord_of(&body_request).unwrap(), None);
    }

    #[test]
    fn a_chord_in_a_chord_header_counts_its_body_in_the_outer_chord() {
        let inner_body = Signature::new("inner_body", vec![]);
        let inner = chord(
            vec![Signature::new("a", vec![]), Signature::new("b", vec![])],
            inner_body,
        );
        let inner_id = inner.option_str("task_id").unwrap();
        let outer = chord(
            vec![inner, Signature::new("c", vec![])],
            Signature::new("outer_body", vec![]),
        );
        let outer_id = outer.option_str("task_id").unwrap();
        let sent = start(&outer.frozen().unwrap()).unwrap();
        assert_eq!(
            sent[0].opens_chords,
            [(outer_id.clone(), 2), (inner_id.clone(), 2)],
            "the inner chord counts once in the outer one, through its body"
        );
        assert_eq!(
            tags(&sent)[2],
            ("c".into(), Some(outer_id.clone()), Some(1))
        );
        let a = &sent[0].request;
        assert_eq!(a.group.as_deref(), Some(inner_id.as_str()));
        let inner_body = chord_of(a).unwrap().unwrap();
        let body_request = chord_body(&inner_body, a, vec![json!(1), json!(2)])
            .unwrap()
            .remove(0)
            .request;
        assert_eq!(
            (body_request.group.as_deref(), body_request.group_index),
            (Some(outer_id.as_str()), Some(0))
        );
        assert_eq!(chord_of(&body_request).unwrap().unwrap().task, "outer_body");
    }

    #[test]
    fn a_group_ending_a_header_chain_counts_its_members_as_that_members_results() {
        // chord([chain(a, group(b, c)), d], body), as in Celery's test_nested_group_chain.
        let (a, b, c, d) = (
            Signature::new("a", vec![]),
            Signature::new("b", vec![]),
            Signature::new("c", vec![]),
            Signature::new("d", vec![]),
        );
        let id = |s: &Signature| s.option_str("task_id").unwrap();
        let (a_id, b_id, c_id, d_id) = (id(&a), id(&b), id(&c), id(&d));
        let inner = group(vec![b, c]);
        let inner_id = id(&inner);
        let ends_in_group = crate::chain![a, inner];
        let canvas = chord(vec![ends_in_group, d], Signature::new("body", vec![]));
        let chord_id = id(&canvas);
        let sent = start(&canvas).unwrap();
        assert_eq!(
            tags(&sent)[1],
            ("d".into(), Some(chord_id.clone()), Some(1))
        );
        assert_eq!(
            sent[0].opens_chords,
            [(chord_id.clone(), 3)],
            "each member of the group counts"
        );
        let member = |id: &str| json!([[id, null], null]);
        let header = json!([
            [chord_id, null],
            [
                [[inner_id, member(&a_id)], [member(&b_id), member(&c_id)]],
                member(&d_id)
            ]
        ]);
        assert_eq!(sent[0].saves_headers, [(chord_id.clone(), header)]);
        // Once a has run, the group's members are sent as the chord's, at their own indexes.
        let a = &sent[0].request;
        assert_eq!((a.group.as_ref(), &a.embed["chord"]), (None, &Value::Null));
        let members = after_success(a, &json!(1)).unwrap();
        let ch = Some(chord_id);
        assert_eq!(
            tags(&members.next),
            [("b".into(), ch.clone(), Some(0)), ("c".into(), ch, Some(1))]
        );
        assert!(members
            .next
            .iter()
            .all(|n| n.request.embed["chord"]["task"] == "body"));
        assert_eq!(members.children[0][0][0], json!(inner_id));
    }

    #[test]
    fn a_result_tuple_links_each_step_to_the_one_before() {
        // add.s(1, 1) | add.s(2) | group(add.s(3), add.s(4)) | add.s(5), as Celery's
        // build_chain_inside_task sends it: the group is the parent of the last step.
        let steps: Vec<_> = (1..=5)
            .map(|i| Signature::new(format!("s{i}"), vec![]))
            .collect();
        let id = |i: usize| steps[i].option_str("task_id").unwrap();
        let task = |i: usize, parent: Value| json!([[id(i), parent], null]);
        let members = group(vec![steps[2].clone(), steps[3].clone()]);
        let group_id = members.option_str("task_id").unwrap();
        let canvas = crate::chain![
            steps[0].clone(),
            steps[1].clone(),
            members,
            steps[4].clone()
        ];
        let parent = json!([
            [group_id, task(1, task(0, Value::Null))],
            [task(2, Value::Null), task(3, Value::Null)]
        ]);
        assert_eq!(canvas.result_tuple(), task(4, parent));
        // A chord's result is its body's, the header its parent.
        let canvas = chord(vec![steps[0].clone()], steps[1].clone());
        let chord_id = canvas.option_str("task_id").unwrap();
        let header = json!([[chord_id, null], [task(0, Value::Null)]]);
        assert_eq!(canvas.result_tuple(), task(1, header));
    }
}
