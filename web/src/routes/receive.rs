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
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::auth::Authorized;
use crate::db::Pool;
use crate::error::Error;
use crate::outbox::{self, Journal};
use crate::store::NewJob;

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

impl JobRequest {
    /// A task call (`{"task": ..., "args": ..., ...}`), or any other JSON as the default task's
    /// one argument.
    pub fn from_json(body: Value, accepts: &Accepts) -> Result<Self, Error> {
        if holds_nul(&body) {
            return Err(Error::Unprocessable(
                "text may not hold the NUL character (\\u0000): PostgreSQL's jsonb cannot store it"
                    .into(),
            ));
        }
        let call = match body {
            Value::Object(ref fields) if fields.contains_key("task") => fields.clone(),
            payload => {
                return Ok(Self {
                    task: accepts.default_task.clone(),
                    args: vec![payload],
                    kwargs: Map::new(),
                    queue: None,
                    countdown: None,
                    expires: None,
                })
            }
        };
        let wrong = |field: &str, expected: &str| {
            Error::Unprocessable(format!("`{field}` must be {expected}"))
        };
        let known = ["task", "args", "kwargs", "queue", "countdown", "expires"];
        if let Some(field) = call.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(Error::Unprocessable(format!(
                "unknown field `{field}`; a task call takes {}",
                known.join(", ")
            )));
        }
        let task = call["task"]
            .as_str()
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
impl<'r> FromData<'r> for JobRequest {
    type Error = Error;

    async fn from_data(request: &'r Request<'_>, data: Data<'r>) -> data::Outcome<'r, Self> {
        let accepts = request
            .rocket()
            .state::<Accepts>()
            .expect("Accepts is managed");
        match read(request, data, accepts).await {
            Ok(job) => data::Outcome::Success(job),
            Err(error) => data::Outcome::Error((error.status(), error)),
        }
    }
}

async fn read(
    request: &Request<'_>,
    data: Data<'_>,
    accepts: &Accepts,
) -> Result<JobRequest, Error> {
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
    parse_job(&body, accepts)
}

/// A `POST /receive` body read into a job request: 400 malformed JSON, 422 wrong fields or a
/// task not accepted. Pure (no I/O): what the route does once the body is read within the limit.
pub fn parse_job(body: &[u8], accepts: &Accepts) -> Result<JobRequest, Error> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Error::BadRequest(format!("malformed JSON: {e}")))?;
    JobRequest::from_json(value, accepts)
}

/// `202 Accepted` with the job's id, where to poll it, and a `Location` header.
#[derive(rocket::Responder)]
#[response(status = 202)]
pub struct Accepted {
    body: Json<Value>,
    location: Header<'static>,
}

/// Records the job as PENDING, then publishes it. The job is durable once its row commits: if
/// the broker does not take it now, the outbox publishes it when the broker is back, so the
/// answer is 202 either way (the row keeps the reason meanwhile).
#[rocket::post("/receive", data = "<job>")]
pub async fn receive(
    _auth: Authorized,
    job: Result<JobRequest, Error>,
    pool: &State<Pool>,
    journal: &State<Arc<Journal>>,
    client: &State<Client>,
) -> Result<Accepted, Error> {
    let job = job?;
    let id = Uuid::new_v4();
    let now = Utc::now();
    let after = |seconds: f64| now + chrono::Duration::milliseconds((seconds * 1e3) as i64);
    let row = NewJob {
        task_id: id,
        queue: job
            .queue
            .clone()
            .unwrap_or_else(|| client.queue_for(&job.task).to_string()),
        task_name: job.task,
        args: Value::Array(job.args),
        kwargs: Value::Object(job.kwargs),
        eta: job.countdown.map(after),
        expires: job.expires.map(after),
    };
    journal.jobs.write(row.clone()).await?;
    // Committed: the job is durable and will run. Its published mark is written in the
    // background (the answer need not wait for it). Should the database fail before the
    // publish is recorded, the outbox publishes the job again later (at least once), so the
    // answer is still 202: a 503 now would make the client send the same work twice.
    if let Err(error) = outbox::publish(pool, journal, client, &row).await {
        tracing::warn!(%id, %error, "job accepted; its publish is not on record, the outbox will send it");
    }
    let status_url = format!("/status/{id}");
    Ok(Accepted {
        body: Json(json!({ "task_id": id, "status_url": status_url })),
        location: Header::new("Location", status_url),
    })
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
        }
    }

    #[test]
    fn a_task_call_is_read_with_its_options() {
        let job = JobRequest::from_json(
            json!({"task": "tasks.add", "args": [1, 2], "kwargs": {}, "queue": "q", "countdown": 5, "expires": 60}),
            &accepts(),
        )
        .unwrap();
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
            let job = JobRequest::from_json(payload.clone(), &accepts()).unwrap();
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
        for (body, reason) in cases {
            let error = JobRequest::from_json(body.clone(), &accepts()).unwrap_err();
            assert_eq!(error.status(), Status::UnprocessableEntity, "{body}");
            assert!(error.to_string().starts_with(reason), "{body}: {error}");
        }
    }
}
