//! `POST /receive`: records a job, publishes it, answers its task id at once.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::Utc;
use rocket::data::{self, Data, FromData, ToByteUnit};
use rocket::http::{ContentType, Header};
use rocket::serde::json::Json;
use rocket::{Request, State};
use runtime::client::Client;
use runtime::CeleryConfig;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::auth::Authorized;
use crate::db::Pool;
use crate::error::Error;
use crate::outbox::{self, Journal};
use crate::store::{self, NewJob};
use crate::workflow::{Kind, MAX_STEPS};

/// The longest `countdown` or `expires` taken: ten years, far past any sane schedule and far
/// from the limits of date arithmetic.
pub const MAX_DELAY_SECONDS: f64 = 315_360_000.0;

/// What the deployment accepts: task names it may run, and the task for bare payloads.
pub struct Accepts {
    /// Allowed task names (the Rust registry plus `web_allowed_tasks`).
    pub tasks: BTreeSet<String>,
    /// Task that takes a payload naming no task.
    pub default_task: String,
    /// Body size limit in bytes.
    pub body_limit: u64,
}

impl Accepts {
    /// What `config` accepts: the Rust registry's tasks plus `web_allowed_tasks`.
    pub fn new(config: &CeleryConfig) -> Self {
        Self {
            tasks: tasks::registry()
                .names()
                .map(str::to_owned)
                .chain(config.web_allowed_tasks.iter().cloned())
                .collect(),
            default_task: config.web_default_task.clone(),
            body_limit: config.web_body_limit,
        }
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
}

/// The fields of a task call.
const CALL_FIELDS: [&str; 6] = ["task", "args", "kwargs", "queue", "countdown", "expires"];
/// The fields of a workflow's step: a chain's later steps run when the step before ends, so a
/// delay or an expiry counted from the request would mean nothing to them.
const STEP_FIELDS: [&str; 4] = ["task", "args", "kwargs", "queue"];

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
                Some(Value::String(queue)) if !queue.is_empty() => Some(queue.clone()),
                Some(_) => return Err(wrong("queue", "a queue name")),
            },
            countdown: seconds("countdown", false)?,
            expires: seconds("expires", true)?,
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
    /// A task call (an object with `task`), a workflow (an object with `chain` or `group`, a
    /// list of task calls), or any other JSON as the default task's one argument.
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
        match Kind::ALL
            .into_iter()
            .find(|kind| fields.contains_key(kind.name()))
        {
            Some(kind) => Self::workflow(kind, &fields, accepts),
            None => Ok(Self::Job(JobRequest::payload(
                Value::Object(fields),
                accepts,
            ))),
        }
    }

    /// The workflow `{"<kind>": [task calls]}`.
    fn workflow(kind: Kind, fields: &Map<String, Value>, accepts: &Accepts) -> Result<Self, Error> {
        let name = kind.name();
        if let Some(field) = fields.keys().find(|k| *k != name) {
            return Err(Error::Unprocessable(format!(
                "unknown field `{field}`; a workflow is one field, `chain` or `group`, holding its task calls"
            )));
        }
        let calls = fields[name]
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

/// JSON types, or none; curl's `-d` default (`x-www-form-urlencoded`) is read as JSON too, since
/// a form body would not parse as JSON anyway and `curl -d '{...}'` is how people call this.
fn is_json_like(content_type: Option<&ContentType>) -> bool {
    match content_type {
        None => true,
        Some(ct) => ct.is_json() || ct.sub().as_str().ends_with("+json") || ct.is_form(),
    }
}

#[rocket::async_trait]
impl<'r> FromData<'r> for Submission {
    type Error = Error;

    async fn from_data(request: &'r Request<'_>, data: Data<'r>) -> data::Outcome<'r, Self> {
        let accepts = request
            .rocket()
            .state::<Accepts>()
            .expect("Accepts is managed");
        match read(request, data, accepts).await {
            Ok(submission) => data::Outcome::Success(submission),
            Err(error) => data::Outcome::Error((error.status(), error)),
        }
    }
}

async fn read(
    request: &Request<'_>,
    data: Data<'_>,
    accepts: &Accepts,
) -> Result<Submission, Error> {
    if !is_json_like(request.content_type()) {
        let given = request
            .content_type()
            .map(ToString::to_string)
            .unwrap_or_default();
        return Err(Error::UnsupportedMediaType(format!(
            "expected application/json, got {given}"
        )));
    }
    let body = data
        .open(accepts.body_limit.bytes())
        .into_bytes()
        .await
        .map_err(|e| Error::BadRequest(format!("cannot read the body: {e}")))?;
    if !body.is_complete() {
        return Err(Error::TooLarge(accepts.body_limit));
    }
    parse_submission(&body, accepts)
}

/// A `POST /receive` body read into a submission: 400 malformed JSON, 422 wrong fields or a
/// task not accepted. Pure (no I/O): what the route does once the body is read within the limit.
pub fn parse_submission(body: &[u8], accepts: &Accepts) -> Result<Submission, Error> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Error::BadRequest(format!("malformed JSON: {e}")))?;
    Submission::from_json(value, accepts)
}

/// `202 Accepted` with the id to poll, where to poll it, and a `Location` header.
#[derive(rocket::Responder)]
#[response(status = 202)]
pub struct Accepted {
    body: Json<Value>,
    location: Header<'static>,
}

impl Accepted {
    /// The answer for `id` (`id_field` names it), with `more` fields.
    fn new(id_field: &str, id: Uuid, more: Map<String, Value>) -> Self {
        let status_url = format!("/status/{id}");
        let mut body = more;
        body.insert(id_field.into(), id.to_string().into());
        body.insert("status_url".into(), status_url.clone().into());
        Self {
            body: Json(Value::Object(body)),
            location: Header::new("Location", status_url),
        }
    }
}

/// The row that records `job` under `id`, to be published now.
fn row(job: JobRequest, id: Uuid, client: &Client) -> NewJob {
    let now = Utc::now();
    let after = |seconds: f64| now + chrono::Duration::milliseconds((seconds * 1e3) as i64);
    let queue = job
        .queue
        .unwrap_or_else(|| client.queue_for(&job.task).to_string());
    NewJob {
        eta: job.countdown.map(after),
        expires: job.expires.map(after),
        ..NewJob::single(
            id,
            job.task,
            Value::Array(job.args),
            Value::Object(job.kwargs),
            queue,
        )
    }
}

/// Records the job (or each step of the workflow) as PENDING, then publishes it. A job is
/// durable once its row commits: if the broker does not take it now, the outbox publishes it
/// when the broker is back, so the answer is 202 either way (the row keeps the reason
/// meanwhile).
#[rocket::post("/receive", data = "<submission>")]
pub async fn receive(
    _auth: Authorized,
    submission: Result<Submission, Error>,
    pool: &State<Pool>,
    journal: &State<Arc<Journal>>,
    client: &State<Client>,
) -> Result<Accepted, Error> {
    match submission? {
        Submission::Job(job) => receive_job(job, pool, journal, client).await,
        Submission::Workflow { kind, steps } => {
            receive_workflow(kind, steps, pool, journal, client).await
        }
    }
}

async fn receive_job(
    job: JobRequest,
    pool: &Pool,
    journal: &Journal,
    client: &Client,
) -> Result<Accepted, Error> {
    let id = Uuid::new_v4();
    let row = row(job, id, client);
    journal.jobs.write(row.clone()).await?;
    // Committed: the job is durable and will run. Its published mark is written in the
    // background (the answer need not wait for it). Should the database fail before the
    // publish is recorded, the outbox publishes the job again later (at least once), so the
    // answer is still 202: a 503 now would make the client send the same work twice.
    if let Err(error) = outbox::publish(pool, journal, client, &row, &[]).await {
        tracing::warn!(%id, %error, "job accepted; its publish is not on record, the outbox will send it");
    }
    Ok(Accepted::new("task_id", id, Map::new()))
}

/// A workflow's steps are written in one statement, so it is recorded whole or not at all; a
/// group is saved in the result backend as Python's `GroupResult.save()` saves one, so Python
/// code can `GroupResult.restore()` it by the workflow's id.
async fn receive_workflow(
    kind: Kind,
    steps: Vec<JobRequest>,
    pool: &Pool,
    journal: &Journal,
    client: &Client,
) -> Result<Accepted, Error> {
    let id = Uuid::new_v4();
    let rows: Vec<NewJob> = steps
        .into_iter()
        .enumerate()
        .map(|(position, step)| NewJob {
            workflow_id: Some(id),
            workflow_kind: Some(kind.name().into()),
            workflow_position: Some(position as i32),
            ..row(step, Uuid::new_v4(), client)
        })
        .collect();
    store::insert(&mut *pool.get().await?, &rows).await?;
    let task_ids: Vec<String> = rows.iter().map(|row| row.task_id.to_string()).collect();
    let published = match kind {
        Kind::Chain => vec![outbox::publish(pool, journal, client, &rows[0], &rows[1..]).await],
        Kind::Group => {
            if let Err(error) = client.save_group(&id.to_string(), &task_ids).await {
                tracing::warn!(%id, %error, "group not saved: Python cannot restore it by its id");
            }
            futures::future::join_all(
                rows.iter()
                    .map(|row| outbox::publish(pool, journal, client, row, &[])),
            )
            .await
        }
    };
    for error in published.into_iter().filter_map(Result::err) {
        tracing::warn!(%id, %error, "workflow accepted; a publish is not on record, the outbox will send it");
    }
    let mut more = Map::new();
    more.insert("workflow".into(), kind.name().into());
    more.insert("task_ids".into(), task_ids.into());
    Ok(Accepted::new("workflow_id", id, more))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rocket::http::Status;
    use serde_json::json;

    fn accepts() -> Accepts {
        Accepts {
            tasks: ["tasks.add".to_string(), "py.mul".to_string()].into(),
            default_task: "tasks.echo".into(),
            body_limit: 1024,
        }
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
    fn bad_workflows_are_unprocessable_with_the_reason() {
        let too_many: Vec<Value> = (0..=MAX_STEPS)
            .map(|_| json!({"task": "tasks.add"}))
            .collect();
        assert_unprocessable(&[
            (json!({"chain": []}), "`chain` must be a list of 1 to 1000 task calls"),
            (json!({"group": {"task": "tasks.add"}}), "`group` must be a list of 1 to"),
            (json!({"group": too_many}), "`group` must be a list of 1 to 1000"),
            (
                json!({"chain": [{"task": "tasks.add"}], "queue": "q"}),
                "unknown field `queue`; a workflow is one field",
            ),
            (
                json!({"chain": [{"task": "tasks.add"}], "group": []}),
                "unknown field `group`",
            ),
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
                "step 0 of the chain: unknown field `countdown`; a workflow step takes task, args, kwargs, queue",
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
