//! A `POST /receive` body as the API takes it, without I/O: what the deployment accepts
//! ([`Accepts`]), one task call ([`JobRequest`]) or a workflow of them ([`Submission`]), read
//! and checked from JSON with the reason for every refusal, and the body's schema in the API
//! document, written from the same constants the reading uses.

use std::collections::BTreeSet;

use runtime::CeleryConfig;
use serde_json::{json, Map, Value};
use utoipa::openapi::schema::Schema;
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

use crate::error::Error;
use crate::workflow::{Kind, MAX_STEPS};

/// The longest `unique_key` taken, in characters.
pub const MAX_UNIQUE_KEY_CHARS: usize = 255;

/// The longest `countdown` or `expires` taken: ten years, far past any sane schedule and far
/// from the limits of date arithmetic.
pub const MAX_DELAY_SECONDS: f64 = 315_360_000.0;

/// What the deployment accepts: task names it may run, and the task for bare payloads.
pub struct Accepts {
    /// Task names a request may name: `web_default_task` and `web_allowed_tasks`.
    pub tasks: BTreeSet<String>,
    /// Task that takes a payload naming no task.
    pub default_task: String,
    /// Body size limit in bytes.
    pub body_limit: u64,
    /// Queues a job may name (`web_allowed_queues`); empty, any valid queue name.
    pub queues: BTreeSet<String>,
    /// Bound on a workflow's steps × body bytes (`web_workflow_max_bytes`).
    pub workflow_max_bytes: u64,
}

impl Accepts {
    /// What `config` accepts: `web_default_task` and the tasks `web_allowed_tasks` lists, an
    /// explicit list, so that being in a worker's registry never opens a task to the API.
    pub fn new(config: &CeleryConfig) -> Self {
        Self {
            tasks: std::iter::once(&config.web_default_task)
                .chain(&config.web_allowed_tasks)
                .cloned()
                .collect(),
            default_task: config.web_default_task.clone(),
            body_limit: config.web_body_limit,
            queues: config.web_allowed_queues.iter().cloned().collect(),
            workflow_max_bytes: config.web_workflow_max_bytes,
        }
    }
}

impl Accepts {
    /// `queue` if a job may name it: a name both brokers take (a bad one would fail every
    /// publish and hold its row in the outbox for good), and one of `web_allowed_queues` when
    /// that is set.
    fn queue(&self, queue: &str) -> Result<String, Error> {
        if let Some(problem) = runtime::broker::queue_name_problem(queue) {
            return Err(Error::Unprocessable(format!("`queue`: {problem}")));
        }
        if !self.queues.is_empty() && !self.queues.contains(queue) {
            return Err(Error::Unprocessable(format!(
                "`queue` must be one of web_allowed_queues, not `{queue}`"
            )));
        }
        Ok(queue.to_string())
    }
}

/// A validated job request.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRequest {
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub queue: Option<String>,
    pub countdown: Option<f64>,
    pub expires: Option<f64>,
    /// Seconds the job is unique for: refused (409) while the same call (or `unique_key`) is
    /// queued or running.
    pub unique_for: Option<f64>,
    /// The unique lock's name, instead of the task and its arguments.
    pub unique_key: Option<String>,
}

/// The fields of a task call.
const CALL_FIELDS: [&str; 8] = [
    "task",
    "args",
    "kwargs",
    "queue",
    "countdown",
    "expires",
    "unique_for",
    "unique_key",
];
/// The fields of a workflow's step: a chain's later steps run when the step before ends, so a
/// delay or an expiry counted from the request would mean nothing to them. The unique fields
/// are a group member's or a chain's first step's only ([`UNIQUE_FIELDS`]).
const STEP_FIELDS: [&str; 6] = [
    "task",
    "args",
    "kwargs",
    "queue",
    "unique_for",
    "unique_key",
];
/// The fields that make a call unique: only a message the web app sends itself can take a lock
/// before its row commits, and a chain's later steps are sent by the worker that ends the step
/// before.
const UNIQUE_FIELDS: [&str; 2] = ["unique_for", "unique_key"];

impl JobRequest {
    /// The default task with `payload` as its one argument.
    fn payload(payload: Value, accepts: &Accepts) -> Self {
        Self {
            task: accepts.default_task.clone(),
            args: vec![payload],
            kwargs: Map::new(),
            queue: None,
            countdown: None,
            expires: None,
            unique_for: None,
            unique_key: None,
        }
    }

    /// A task call (`{"task": ..., "args": ..., ...}`) that may have only the fields `known`;
    /// `what` names such a call in errors.
    fn from_call(
        call: &Map<String, Value>,
        accepts: &Accepts,
        known: &[&str],
        what: &str,
    ) -> Result<Self, Error> {
        let wrong = |field: &str, expected: &str| {
            Error::Unprocessable(format!("`{field}` must be {expected}"))
        };
        if let Some(field) = call.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(Error::Unprocessable(format!(
                "unknown field `{field}`; {what} takes {}",
                known.join(", ")
            )));
        }
        let task = call
            .get("task")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| wrong("task", "a task name"))?;
        if !accepts.tasks.contains(task) {
            return Err(Error::Unprocessable(format!("unknown task `{task}`")));
        }
        let seconds = |field: &str, positive: bool| -> Result<Option<f64>, Error> {
            let lowest = if positive { "more than 0" } else { "0" };
            match call.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|s| {
                        (if positive { *s > 0.0 } else { *s >= 0.0 }) && *s <= MAX_DELAY_SECONDS
                    })
                    .map(Some)
                    .ok_or_else(|| {
                        wrong(
                            field,
                            &format!("a number of seconds from {lowest} to {MAX_DELAY_SECONDS}"),
                        )
                    }),
            }
        };
        Ok(Self {
            task: task.to_string(),
            args: match call.get("args") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(args)) => args.clone(),
                Some(_) => return Err(wrong("args", "a list")),
            },
            kwargs: match call.get("kwargs") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(kwargs)) => kwargs.clone(),
                Some(_) => return Err(wrong("kwargs", "an object")),
            },
            queue: match call.get("queue") {
                None | Some(Value::Null) => None,
                Some(Value::String(queue)) => Some(accepts.queue(queue)?),
                Some(_) => return Err(wrong("queue", "a queue name")),
            },
            countdown: seconds("countdown", false)?,
            expires: seconds("expires", true)?,
            unique_for: seconds("unique_for", true)?,
            unique_key: match call.get("unique_key") {
                None | Some(Value::Null) => None,
                Some(Value::String(key))
                    if (1..=MAX_UNIQUE_KEY_CHARS).contains(&key.chars().count()) =>
                {
                    Some(key.clone())
                }
                Some(_) => {
                    return Err(wrong(
                        "unique_key",
                        &format!("text of 1 to {MAX_UNIQUE_KEY_CHARS} characters"),
                    ))
                }
            },
        })
    }
}

/// A validated `POST /receive` body: one job, or a workflow of them.
#[derive(Debug, Clone, PartialEq)]
pub enum Submission {
    Job(JobRequest),
    Workflow { kind: Kind, steps: Vec<JobRequest> },
}

impl Submission {
    /// A task call (an object with `task`), a workflow (an object whose one field is `chain` or
    /// `group`, holding a list of task calls), or any other JSON as the default task's one
    /// argument. A workflow is recognised by that exact shape, so documents that merely have a
    /// `group` or `chain` field (`{"group": "admins", ...}`) stay payloads, as they always were.
    pub fn from_json(body: Value, accepts: &Accepts) -> Result<Self, Error> {
        if holds_nul(&body) {
            return Err(Error::Unprocessable(
                "text may not hold the NUL character (\\u0000): PostgreSQL's jsonb cannot store it"
                    .into(),
            ));
        }
        let Value::Object(fields) = body else {
            return Ok(Self::Job(JobRequest::payload(body, accepts)));
        };
        if fields.contains_key("task") {
            return JobRequest::from_call(&fields, accepts, &CALL_FIELDS, "a task call")
                .map(Self::Job);
        }
        match workflow_kind(&fields) {
            Some(kind) => Self::workflow(kind, &fields[kind.name()], accepts),
            None => Ok(Self::Job(JobRequest::payload(
                Value::Object(fields),
                accepts,
            ))),
        }
    }

    /// The workflow of `kind` whose task calls are `calls` (a list).
    fn workflow(kind: Kind, calls: &Value, accepts: &Accepts) -> Result<Self, Error> {
        let name = kind.name();
        let calls = calls
            .as_array()
            .filter(|calls| (1..=MAX_STEPS).contains(&calls.len()))
            .ok_or_else(|| {
                Error::Unprocessable(format!(
                    "`{name}` must be a list of 1 to {MAX_STEPS} task calls"
                ))
            })?;
        let steps = calls
            .iter()
            .enumerate()
            .map(|(index, call)| {
                let in_step = |reason: String| {
                    Error::Unprocessable(format!("step {index} of the {name}: {reason}"))
                };
                match call {
                    Value::Object(call) if kind == Kind::Chain && index > 0 => {
                        if let Some(field) = UNIQUE_FIELDS.iter().find(|f| call.contains_key(**f)) {
                            return Err(in_step(format!(
                                "`{field}` is taken by a chain's first step only: the later \
                                 steps are sent by the worker that ends the step before"
                            )));
                        }
                        JobRequest::from_call(call, accepts, &STEP_FIELDS, "a workflow step")
                            .map_err(|e| in_step(e.to_string()))
                    }
                    Value::Object(call) => {
                        JobRequest::from_call(call, accepts, &STEP_FIELDS, "a workflow step")
                            .map_err(|e| in_step(e.to_string()))
                    }
                    _ => Err(in_step(
                        "a step must be a task call, an object with `task`".into(),
                    )),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self::Workflow { kind, steps })
    }
}

// The body's schema in the API document, written from the same constants the reading above
// uses. It is open-ended JSON, so it is written by hand, as JSON Schema: a `oneOf` of a task
// call, a chain, a group, and "any other JSON" as what it is, JSON that is none of those shapes
// (a `not`, which utoipa's schema model cannot hold: the document takes these schemas as JSON).

/// The kind of workflow `fields` are: one field, `chain` or `group`, holding a list.
fn workflow_kind(fields: &Map<String, Value>) -> Option<Kind> {
    let (name, value) = fields.iter().next().filter(|_| fields.len() == 1)?;
    Kind::from_name(name).filter(|_| value.is_array())
}

/// The schema of one field of a task call.
fn field_schema(field: &str) -> Value {
    let seconds = |what: &str| {
        json!({
            "type": ["number", "null"],
            "maximum": MAX_DELAY_SECONDS,
            "description": format!("seconds from now {what}"),
        })
    };
    match field {
        "task" => json!({
            "type": "string",
            "minLength": 1,
            "description": "a task the deployment accepts (`web_default_task` or one of \
                `web_allowed_tasks`); any other is 422",
            "example": "tasks.add",
        }),
        "args" => json!({"type": ["array", "null"], "items": {}, "example": [2, 3]}),
        "kwargs" => json!({"type": ["object", "null"], "additionalProperties": {}}),
        "queue" => json!({
            "type": ["string", "null"],
            "minLength": 1,
            "maxLength": runtime::broker::MAX_NAME_BYTES,
            "pattern": format!("^[A-Za-z0-9{}]+$", runtime::broker::QUEUE_NAME_PUNCTUATION),
            "description": "the queue to publish to; by default the one `task_routes` or \
                `task_default_queue` names. Not `amq.*` (RabbitMQ's) nor kombu's own Redis keys \
                (`unacked`, `unacked_index`, `unacked_mutex`, `_kombu.*`); one of \
                `web_allowed_queues` when that is set; any other is 422",
        }),
        "countdown" => {
            let mut schema = seconds("before the job may run");
            schema["minimum"] = json!(0);
            schema
        }
        "expires" => {
            let mut schema = seconds("after which the job is revoked rather than run");
            schema["exclusiveMinimum"] = json!(0);
            schema
        }
        "unique_for" => json!({
            "type": ["number", "null"],
            "exclusiveMinimum": 0,
            "maximum": MAX_DELAY_SECONDS,
            "description": "seconds the job is unique for: while a job of the same task and \
                arguments (or the same `unique_key`) is queued or running, the request is 409 \
                naming it. The lock lives in the result backend's Redis, taken before the row \
                commits, given back by the worker when the job ends, and expires after this \
                long whatever happens. Unset: the task's `task_annotations` `unique_for`, if \
                any. In a workflow, a group member's or a chain's first step's only",
        }),
        "unique_key" => json!({
            "type": ["string", "null"],
            "minLength": 1,
            "maxLength": MAX_UNIQUE_KEY_CHARS,
            "description": "the unique lock's name, instead of the task and its arguments: \
                jobs naming the same key are unique together. Needs `unique_for` (or the \
                task's `task_annotations` `unique_for`; else 422)",
        }),
        other => panic!("no schema for task call field `{other}`"),
    }
}

/// The schema of a task call that takes the fields `known`.
fn call_schema(known: &[&str], description: &str) -> Value {
    let properties: Map<String, Value> = known
        .iter()
        .map(|field| (field.to_string(), field_schema(field)))
        .collect();
    json!({
        "type": "object",
        "description": description,
        "required": ["task"],
        "additionalProperties": false,
        "properties": properties,
    })
}

/// The schema of a workflow of `kind`.
fn workflow_schema(kind: Kind) -> Value {
    let name = kind.name();
    let description = match kind {
        Kind::Chain => "steps run one after another, each given the result of the one before",
        Kind::Group => "steps run in parallel; the result is the list of theirs, in order",
    };
    json!({
        "type": "object",
        "description": description,
        "required": [name],
        "additionalProperties": false,
        "properties": {name: {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_STEPS,
            "items": {"$ref": "#/components/schemas/WorkflowStep"},
        }},
    })
}

/// The named schemas of a `POST /receive` body, each in the JSON the document serves.
pub fn body_schemas() -> Vec<(String, Value)> {
    let parts = ["TaskCall", "Chain", "Group"]
        .map(|name| json!({"$ref": format!("#/components/schemas/{name}")}));
    let submission = json!({
        "description": "a task call, a workflow, or any other JSON for the default task; an \
            object with `task` is read as a task call and one whose only field is a list under \
            `chain` or `group` as a workflow, and is 422 when it is not a valid one. Text may not \
            hold U+0000 (422).",
        "oneOf": parts.into_iter().chain([payload_schema()]).collect::<Vec<_>>(),
    });
    let mut schemas = vec![
        ("Submission".to_string(), submission),
        (
            "TaskCall".to_string(),
            call_schema(&CALL_FIELDS, "one job: a task and its arguments"),
        ),
        (
            "WorkflowStep".to_string(),
            call_schema(
                &STEP_FIELDS,
                "a step of a workflow: a task call without `countdown` or `expires`; \
                 `unique_for` and `unique_key` on a group's members and a chain's first step \
                 only (422 on a chain's later steps)",
            ),
        ),
    ];
    schemas.extend(Kind::ALL.map(|kind| (capitalized(kind.name()), workflow_schema(kind))));
    schemas
}

fn capitalized(name: &str) -> String {
    let mut chars = name.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// The JSON that is no task call and no workflow: anything but an object with `task` or an
/// object whose one field is a list under `chain` or `group`.
fn payload_schema() -> Value {
    let workflows = Kind::ALL.map(|kind| {
        json!({
            "required": [kind.name()],
            "maxProperties": 1,
            "properties": {kind.name(): {"type": "array"}},
        })
    });
    let shapes: Vec<Value> = std::iter::once(json!({"required": ["task"]}))
        .chain(workflows)
        .collect();
    json!({
        "description": "any other JSON (not an object with `task`, nor one whose only field is \
            a list under `chain` or `group`): the one argument of `web_default_task`",
        "not": {"type": "object", "anyOf": shapes},
    })
}

/// A `POST /receive` body in the API document: a reference to its schema, which
/// [`body_schemas`] gives.
impl PartialSchema for Submission {
    fn schema() -> RefOr<Schema> {
        Ref::from_schema_name("Submission").into()
    }
}

impl ToSchema for Submission {}

/// Whether any string or key in `value` holds U+0000, which a jsonb column refuses. The depth is
/// bounded by serde_json's recursion limit.
fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(fields) => fields.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// A `POST /receive` body read into a submission: 400 malformed JSON, 422 wrong fields or a
/// task not accepted, 413 a workflow whose steps × body bytes are over `web_workflow_max_bytes`
/// (a chain passes each result on, so a body can be stored once per step). Pure (no I/O): what
/// the route does once the body is read within the limit.
pub fn parse_submission(body: &[u8], accepts: &Accepts) -> Result<Submission, Error> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Error::BadRequest(format!("malformed JSON: {e}")))?;
    let submission = Submission::from_json(value, accepts)?;
    if let Submission::Workflow { steps, .. } = &submission {
        let stored = (steps.len() as u64).saturating_mul(body.len() as u64);
        if stored > accepts.workflow_max_bytes {
            return Err(Error::WorkflowTooLarge {
                steps: steps.len(),
                bytes: body.len(),
                max: accepts.workflow_max_bytes,
            });
        }
    }
    Ok(submission)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rocket::http::Status;

    fn accepts() -> Accepts {
        Accepts {
            tasks: ["tasks.add".to_string(), "py.mul".to_string()].into(),
            default_task: "tasks.echo".into(),
            body_limit: 1024,
            queues: BTreeSet::new(),
            workflow_max_bytes: 4096,
        }
    }

    #[test]
    fn only_the_default_task_and_web_allowed_tasks_may_run() {
        let accepts = Accepts::new(&CeleryConfig {
            web_default_task: "tasks.echo".into(),
            web_allowed_tasks: vec!["tasks.add".into(), "py.mul".into()],
            ..CeleryConfig::default()
        });
        let call = |task: &str| Submission::from_json(json!({"task": task}), &accepts);
        for task in ["tasks.echo", "tasks.add", "py.mul"] {
            assert!(call(task).is_ok(), "{task}");
        }
        // In the Rust registry, but not listed: not the API's to run.
        for task in ["tasks.sleep", "tasks.busy", "tasks.progress"] {
            let error = call(task).unwrap_err();
            assert_eq!(error.status(), Status::UnprocessableEntity, "{task}");
            assert_eq!(error.to_string(), format!("unknown task `{task}`"));
        }
    }

    #[test]
    fn a_workflow_is_bounded_by_its_steps_times_its_body() {
        let chain = |steps: usize, pad: usize| {
            let step = json!({"task": "tasks.add", "args": ["x".repeat(pad)]});
            serde_json::to_vec(&json!({ "chain": vec![step; steps] })).unwrap()
        };
        // 2 steps of a body under 2,048 bytes pass; 4 steps of the same body do not.
        let body = chain(2, 900);
        assert!(body.len() <= 2048, "{}", body.len());
        assert!(parse_submission(&body, &accepts()).is_ok());
        let body = chain(4, 900);
        let error = parse_submission(&body, &accepts()).unwrap_err();
        assert_eq!(error.status(), Status::PayloadTooLarge);
        assert!(
            error
                .to_string()
                .contains("over web_workflow_max_bytes (4096)"),
            "{error}"
        );
        // A lone job is bounded by web_body_limit alone.
        let job = serde_json::to_vec(&json!({"task": "tasks.add", "args": ["x".repeat(900)]}));
        assert!(parse_submission(&job.unwrap(), &accepts()).is_ok());
    }

    #[test]
    fn web_allowed_queues_bounds_the_queues_a_job_may_name() {
        let accepts = Accepts {
            queues: ["python".to_string()].into(),
            ..accepts()
        };
        let named = |queue: &str| {
            Submission::from_json(json!({"task": "tasks.add", "queue": queue}), &accepts)
        };
        assert!(named("python").is_ok());
        let error = named("other").unwrap_err().to_string();
        assert!(error.contains("web_allowed_queues"), "{error}");
    }

    /// The one job `body` is read as.
    fn job(body: Value) -> JobRequest {
        match Submission::from_json(body.clone(), &accepts()) {
            Ok(Submission::Job(job)) => job,
            other => panic!("{body} is not one job: {other:?}"),
        }
    }

    #[test]
    fn a_task_call_is_read_with_its_options() {
        let job = job(
            json!({"task": "tasks.add", "args": [1, 2], "kwargs": {}, "queue": "q", "countdown": 5, "expires": 60}),
        );
        assert_eq!(job.task, "tasks.add");
        assert_eq!(job.args, vec![json!(1), json!(2)]);
        assert_eq!(
            (job.queue.as_deref(), job.countdown, job.expires),
            (Some("q"), Some(5.0), Some(60.0))
        );
    }

    #[test]
    fn a_task_call_may_ask_to_be_unique() {
        let job = job(json!({"task": "tasks.add", "unique_for": 1.5, "unique_key": "k"}));
        assert_eq!(
            (job.unique_for, job.unique_key.as_deref()),
            (Some(1.5), Some("k"))
        );
        assert_unprocessable(&[
            (
                json!({"task": "tasks.add", "unique_for": 0}),
                "`unique_for` must be a number of seconds from more than 0",
            ),
            (
                json!({"task": "tasks.add", "unique_key": ""}),
                "`unique_key` must be text of 1 to 255 characters",
            ),
            (
                json!({"task": "tasks.add", "unique_key": "k".repeat(256)}),
                "`unique_key` must be text of 1 to 255 characters",
            ),
        ]);
    }

    #[test]
    fn only_a_chain_s_first_step_and_a_group_s_members_may_ask_to_be_unique() {
        let unique = json!({"task": "tasks.add", "unique_for": 60});
        let plain = json!({"task": "tasks.add"});
        for body in [
            json!({"chain": [unique.clone(), plain.clone()]}),
            json!({"group": [plain.clone(), unique.clone()]}),
        ] {
            assert!(
                Submission::from_json(body.clone(), &accepts()).is_ok(),
                "{body}"
            );
        }
        assert_unprocessable(&[
            (
                json!({"chain": [plain.clone(), unique]}),
                "step 1 of the chain: `unique_for` is taken by a chain's first step only",
            ),
            (
                json!({"chain": [plain, {"task": "tasks.add", "unique_key": "k"}]}),
                "step 1 of the chain: `unique_key` is taken by a chain's first step only",
            ),
        ]);
    }

    #[test]
    fn any_other_payload_goes_to_the_default_task() {
        for payload in [
            json!({"document": 1}),
            json!([1, 2]),
            json!("text"),
            json!(null),
        ] {
            let job = job(payload.clone());
            assert_eq!((job.task.as_str(), job.args), ("tasks.echo", vec![payload]));
        }
    }

    #[test]
    fn bad_fields_are_unprocessable_with_the_reason() {
        let cases = [
            (json!({"task": "tasks.nope"}), "unknown task `tasks.nope`"),
            (json!({"task": 5}), "`task` must be a task name"),
            (
                json!({"task": "tasks.add", "args": {"x": 1}}),
                "`args` must be a list",
            ),
            (
                json!({"task": "tasks.add", "kwargs": [1]}),
                "`kwargs` must be an object",
            ),
            (
                json!({"task": "tasks.add", "countdown": -1}),
                "`countdown` must be a number of seconds from 0 to 315360000",
            ),
            (
                json!({"task": "tasks.add", "expires": 0}),
                "`expires` must be a number of seconds from more than 0 to 315360000",
            ),
            (
                json!({"task": "tasks.add", "queue": 3}),
                "`queue` must be a queue name",
            ),
            // Names a broker refuses on every publish, which would hold their rows in the
            // outbox for good.
            (
                json!({"task": "tasks.add", "queue": "amq.x"}),
                "`queue`: the amq. prefix is RabbitMQ's own",
            ),
            (
                json!({"task": "tasks.add", "queue": "unacked"}),
                "`queue`: unacked is a key of kombu's own",
            ),
            (
                json!({"task": "tasks.add", "queue": "q".repeat(256)}),
                "`queue`: a queue name has 1 to 255 bytes",
            ),
            (
                json!({"task": "tasks.add", "queue": ""}),
                "`queue`: a queue name has 1 to 255 bytes",
            ),
            (
                json!({"chain": [{"task": "tasks.add", "queue": "a b"}]}),
                "step 0 of the chain: `queue`: a queue name has letters, digits",
            ),
            (
                json!({"task": "tasks.add", "countdown": 1e13}),
                "`countdown` must be a number of seconds from 0 to",
            ),
            (
                json!({"task": "tasks.add", "arsg": []}),
                "unknown field `arsg`",
            ),
            (
                json!({"task": "tasks.add", "kwargs": {"x": [{"y": "a\u{0}b"}]}}),
                "text may not hold the NUL character",
            ),
            (
                json!({"document": "\u{0}"}),
                "text may not hold the NUL character",
            ),
        ];
        assert_unprocessable(&cases);
    }

    fn assert_unprocessable(cases: &[(Value, &str)]) {
        for (body, reason) in cases {
            let error = Submission::from_json(body.clone(), &accepts()).unwrap_err();
            assert_eq!(error.status(), Status::UnprocessableEntity, "{body}");
            assert!(error.to_string().starts_with(reason), "{body}: {error}");
        }
    }

    #[test]
    fn a_chain_or_group_of_task_calls_is_a_workflow_of_those_steps() {
        for kind in Kind::ALL {
            let body = json!({kind.name(): [
                {"task": "tasks.add", "args": [1, 2]},
                {"task": "py.mul", "kwargs": {"y": 3}, "queue": "python"},
            ]});
            let Ok(Submission::Workflow { kind: read, steps }) =
                Submission::from_json(body.clone(), &accepts())
            else {
                panic!("{body} is not a workflow");
            };
            assert_eq!(read, kind);
            assert_eq!(
                steps.iter().map(|s| s.task.as_str()).collect::<Vec<_>>(),
                ["tasks.add", "py.mul"]
            );
            assert_eq!(steps[0].args, vec![json!(1), json!(2)]);
            assert_eq!(
                (steps[1].kwargs["y"].clone(), steps[1].queue.as_deref()),
                (json!(3), Some("python"))
            );
        }
    }

    #[test]
    fn documents_with_a_group_or_chain_field_of_another_shape_stay_payloads() {
        for payload in [
            json!({"group": "admins", "user": 5}),
            json!({"group": {"task": "tasks.add"}}),
            json!({"chain": [{"task": "tasks.add"}], "queue": "q"}),
            json!({"chain": [{"task": "tasks.add"}], "group": []}),
        ] {
            let job = job(payload.clone());
            assert_eq!((job.task.as_str(), job.args), ("tasks.echo", vec![payload]));
        }
    }

    #[test]
    fn bad_workflows_are_unprocessable_with_the_reason() {
        let too_many: Vec<Value> = (0..=MAX_STEPS)
            .map(|_| json!({"task": "tasks.add"}))
            .collect();
        assert_unprocessable(&[
            (json!({"chain": []}), "`chain` must be a list of 1 to 1000 task calls"),
            (json!({"group": too_many}), "`group` must be a list of 1 to 1000"),
            (
                json!({"chain": [{"task": "tasks.add"}, 5]}),
                "step 1 of the chain: a step must be a task call",
            ),
            (
                json!({"group": [{"task": "tasks.nope"}]}),
                "step 0 of the group: unknown task `tasks.nope`",
            ),
            (
                json!({"chain": [{"task": "tasks.add", "countdown": 5}]}),
                "step 0 of the chain: unknown field `countdown`; a workflow step takes task, args, kwargs, queue, unique_for, unique_key",
            ),
            (
                json!({"chain": [{"task": "tasks.add", "args": 1}]}),
                "step 0 of the chain: `args` must be a list",
            ),
            (
                json!({"group": [{"task": "tasks.add", "args": ["\u{0}"]}]}),
                "text may not hold the NUL character",
            ),
        ]);
    }
}
