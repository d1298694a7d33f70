//! The signature: `celery.canvas.Signature` as JSON, its builders (`chain`, `group`, `chord`,
//! `chain!`), and freezing, which names every result of a canvas before it is sent.

use serde_json::{json, Map, Value};

use super::{given_group_id, group_id, laid_out, signatures, Splice};

/// A task call to make later.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    /// Task name.
    pub task: String,
    /// Positional arguments (the parent's result goes first unless `immutable`).
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// `apply_async` options: `task_id`, `queue`, `link`, `countdown`, ...
    pub options: Map<String, Value>,
    /// `None` for a task; `chain`, `group` or `chord` for a canvas of signatures in `kwargs`.
    pub subtask_type: Option<String>,
    /// Whether the parent's result is left out of the arguments (`.si()`).
    pub immutable: bool,
}

/// Why the next steps could not be worked out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CanvasError(pub String);

impl Signature {
    /// Reads a signature; a value that is not one is an error naming what is wrong.
    pub fn from_value(value: &Value) -> Result<Self, CanvasError> {
        let fields = value
            .as_object()
            .ok_or_else(|| CanvasError(format!("a signature must be an object, not {value}")))?;
        let task = fields
            .get("task")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| CanvasError(format!("a signature names no task: {value}")))?;
        let object = |key: &str| match fields.get(key) {
            Some(Value::Object(map)) => Ok(map.clone()),
            None | Some(Value::Null) => Ok(Map::new()),
            Some(other) => Err(CanvasError(format!(
                "a signature's {key} must be an object, not {other}"
            ))),
        };
        Ok(Self {
            task: task.to_string(),
            args: match fields.get("args") {
                Some(Value::Array(args)) => args.clone(),
                None | Some(Value::Null) => Vec::new(),
                Some(other) => {
                    return Err(CanvasError(format!(
                        "a signature's args must be a list, not {other}"
                    )))
                }
            },
            kwargs: object("kwargs")?,
            options: object("options")?,
            subtask_type: fields
                .get("subtask_type")
                .and_then(Value::as_str)
                .map(str::to_owned),
            immutable: fields
                .get("immutable")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }

    /// A string option, such as `task_id` or `queue`.
    pub fn option_str(&self, key: &str) -> Option<String> {
        self.options
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    /// A chord's header members and body (`kwargs.header`, a group or a list, and
    /// `kwargs.body`).
    pub(crate) fn chord_parts(&self) -> Result<(Vec<Signature>, Signature), CanvasError> {
        let header = match self.kwargs.get("header") {
            Some(Value::Array(members)) => members
                .iter()
                .map(Signature::from_value)
                .collect::<Result<_, _>>()?,
            Some(group @ Value::Object(_)) => Signature::from_value(group)?.members()?,
            _ => return Err(CanvasError("a chord without its header".into())),
        };
        let body = self
            .kwargs
            .get("body")
            .ok_or_else(|| CanvasError("a chord without its body".into()))
            .and_then(Signature::from_value)?;
        Ok((header, body))
    }

    /// The signatures of a `chain` or `group` (its `kwargs.tasks`).
    pub(crate) fn members(&self) -> Result<Vec<Signature>, CanvasError> {
        match self.kwargs.get("tasks") {
            Some(Value::Array(tasks)) => tasks.iter().map(Signature::from_value).collect(),
            _ => Err(CanvasError(format!(
                "a {} signature without its tasks",
                self.subtask_type.as_deref().unwrap_or("task")
            ))),
        }
    }
}

/// Building a canvas to send, as `celery.canvas` does for Python callers. A signature is frozen
/// when built (its `task_id` is set), so the caller knows the ids of the results it will read.
impl Signature {
    /// A call of `task` with `args`.
    pub fn new(task: impl Into<String>, args: Vec<Value>) -> Self {
        let mut options = Map::new();
        options.insert("task_id".into(), uuid::Uuid::new_v4().to_string().into());
        Self {
            task: task.into(),
            args,
            kwargs: Map::new(),
            options,
            subtask_type: None,
            immutable: false,
        }
    }

    /// With keyword arguments.
    pub fn with_kwargs(mut self, kwargs: Map<String, Value>) -> Self {
        self.kwargs = kwargs;
        self
    }

    /// Leaves the previous step's result out of the arguments (Celery's `.si()`).
    pub fn set_immutable(mut self) -> Self {
        self.immutable = true;
        self
    }

    /// Sent to `queue` instead of the task's route.
    pub fn on_queue(mut self, queue: impl Into<String>) -> Self {
        self.options.insert("queue".into(), queue.into().into());
        self
    }

    /// With `id` as its task id (a group's: its group id) instead of the one made for it.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.options.insert("task_id".into(), id.into().into());
        self
    }

    /// Tagged as the member at `index` of the group `group_id`, for a member sent on its own.
    pub fn member_of(mut self, group_id: impl Into<String>, index: usize) -> Self {
        self.options
            .insert("group_id".into(), group_id.into().into());
        self.options.insert("group_index".into(), index.into());
        self
    }

    /// Runs `callback` with this task's result when it succeeds.
    pub fn link(self, callback: Signature) -> Self {
        self.linked("link", callback)
    }

    /// Runs `errback` (with this task's id first) when it fails.
    pub fn link_error(self, errback: Signature) -> Self {
        self.linked("link_error", errback)
    }

    fn linked(mut self, option: &str, signature: Signature) -> Self {
        let mut all = signatures(self.options.get(option))
            .unwrap_or_default()
            .iter()
            .map(Signature::to_value)
            .collect::<Vec<_>>();
        all.push(signature.to_value());
        self.options.insert(option.into(), Value::Array(all));
        self
    }

    /// The signature as Celery serializes it.
    pub fn to_value(&self) -> Value {
        json!({
            "task": self.task,
            "args": self.args,
            "kwargs": self.kwargs,
            "options": self.options,
            "subtask_type": self.subtask_type,
            "immutable": self.immutable,
        })
    }

    /// This canvas with an id on every task and group that has none yet (Celery's `freeze()`),
    /// so the ids of its results are known before it is sent.
    pub fn frozen(&self) -> Result<Self, CanvasError> {
        let mut frozen = self.clone();
        if frozen.subtask_type.as_deref() != Some("chain") && frozen.option_str("task_id").is_none()
        {
            frozen
                .options
                .insert("task_id".into(), uuid::Uuid::new_v4().to_string().into());
        }
        let each = |value: &Value| Signature::from_value(value)?.frozen().map(|s| s.to_value());
        match frozen.subtask_type.as_deref() {
            Some("chain") => {
                let tasks = match frozen.kwargs.get("tasks") {
                    Some(Value::Array(tasks)) => {
                        tasks.iter().map(each).collect::<Result<_, _>>()?
                    }
                    _ => return Err(CanvasError(format!("a {} without its tasks", frozen.task))),
                };
                frozen.kwargs.insert("tasks".into(), Value::Array(tasks));
            }
            Some("group") => {
                let tasks = frozen_members(&frozen.members()?)?;
                frozen.kwargs.insert("tasks".into(), Value::Array(tasks));
            }
            Some("chord") => {
                let header = match frozen.kwargs.get("header") {
                    Some(Value::Array(members)) => {
                        let members = members
                            .iter()
                            .map(Signature::from_value)
                            .collect::<Result<Vec<_>, _>>()?;
                        Value::Array(frozen_members(&members)?)
                    }
                    Some(value) => each(value)?,
                    None => return Err(CanvasError("a chord without its header".into())),
                };
                let body = frozen
                    .kwargs
                    .get("body")
                    .ok_or_else(|| CanvasError("a chord without its body".into()))
                    .and_then(each)?;
                frozen.kwargs.insert("header".into(), header);
                frozen.kwargs.insert("body".into(), body);
            }
            _ => {}
        }
        Ok(frozen)
    }

    /// The ids of the results this canvas ends with: a task's own, a chain's last step's, a
    /// group's members', a chord's body's.
    pub fn final_ids(&self) -> Vec<String> {
        match self.subtask_type.as_deref() {
            Some("chain") => self
                .members()
                .ok()
                .and_then(|steps| steps.last().map(Signature::final_ids))
                .unwrap_or_default(),
            Some("group") => self
                .members()
                .map(|members| members.iter().flat_map(Signature::final_ids).collect())
                .unwrap_or_default(),
            Some("chord") => self
                .chord_parts()
                .map(|(_, body)| body.final_ids())
                .unwrap_or_default(),
            _ => self.option_str("task_id").into_iter().collect(),
        }
    }

    /// The result this frozen canvas is read through, as Celery serializes a result handle
    /// (its `as_tuple()`): `[[id, parent], null]` for a task, `[[group id, parent], [member
    /// tuples]]` for a group; a chain's is its last step's, each step the parent of the next
    /// (a group step the parent of the step after it), and a chord's its body's, whose parent
    /// is the header, as a group.
    pub fn result_tuple(&self) -> Value {
        match self.subtask_type.as_deref() {
            Some("chain") => self
                .members()
                .unwrap_or_default()
                .iter()
                .fold(Value::Null, |before, step| {
                    with_parent(step.result_tuple(), before)
                }),
            Some("chord") => match self.chord_parts() {
                Ok((header, body)) => {
                    let header = group(header).with_id(group_id(self)).result_tuple();
                    with_parent(body.result_tuple(), header)
                }
                Err(_) => Value::Null,
            },
            Some("group") => {
                let members = laid_out(&self.members().unwrap_or_default(), Splice::Frozen)
                    .unwrap_or_default()
                    .iter()
                    .map(|(_, member)| member.result_tuple())
                    .collect();
                json!([[given_group_id(self), null], Value::Array(members)])
            }
            _ => json!([[self.option_str("task_id"), null], null]),
        }
    }

    pub(super) fn canvas(kind: &str, kwargs: Value, options: Map<String, Value>) -> Self {
        Self {
            task: format!("celery.{kind}"),
            args: Vec::new(),
            kwargs: match kwargs {
                Value::Object(kwargs) => kwargs,
                _ => Map::new(),
            },
            options,
            subtask_type: Some(kind.into()),
            immutable: false,
        }
    }
}

/// The result `tuple` with `parent` as the parent of its first result (the one with none yet),
/// as Celery links a chain's results.
fn with_parent(mut tuple: Value, parent: Value) -> Value {
    let mut first = &mut tuple;
    while first[0][1].is_array() {
        first = &mut first[0][1];
    }
    if first.is_array() {
        first[0][1] = parent;
    }
    tuple
}

/// The members of a group being frozen, nested groups spliced in as Celery's freeze
/// (`group._freeze_unroll`) leaves them in the group it sends, each frozen.
pub(super) fn frozen_members(members: &[Signature]) -> Result<Vec<Value>, CanvasError> {
    laid_out(members, Splice::Frozen)?
        .iter()
        .map(|(_, member)| member.frozen().map(|m| m.to_value()))
        .collect()
}

/// Steps run one after another, each given the previous one's result.
pub fn chain(steps: Vec<Signature>) -> Signature {
    let tasks: Vec<Value> = steps.iter().map(Signature::to_value).collect();
    Signature::canvas("chain", json!({ "tasks": tasks }), Map::new())
}

/// Members run in parallel, as one group.
pub fn group(members: Vec<Signature>) -> Signature {
    let tasks: Vec<Value> = members.iter().map(Signature::to_value).collect();
    let mut options = Map::new();
    options.insert("task_id".into(), uuid::Uuid::new_v4().to_string().into());
    Signature::canvas("group", json!({ "tasks": tasks }), options)
}

/// `body` runs once with the results of every `header` member, in header order.
pub fn chord(header: Vec<Signature>, body: Signature) -> Signature {
    let header = group(header);
    let options = header.options.clone();
    Signature::canvas(
        "chord",
        json!({"header": header.to_value(), "body": body.to_value(), "kwargs": {}}),
        options,
    )
}

/// `chain![a, b, c]`: the chain of those signatures.
#[macro_export]
macro_rules! chain {
    ($($step:expr),+ $(,)?) => {
        $crate::canvas::chain(vec![$($step),+])
    };
}
