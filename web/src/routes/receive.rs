//! `POST /receive`: records a job, answers its task id once the record commits, publishes it.
//! With an `Idempotency-Key`, the key is recorded in the same transaction, and a repeat answers
//! the job the key first made (200) without recording or publishing anything. A unique job's lock
//! is taken before its row commits ([`crate::unique`]): 409 naming the task that holds it.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::Utc;
use rocket::data::{self, Data, FromData, ToByteUnit};
use rocket::http::{ContentType, Header, Status};
use rocket::serde::json::Json;
use rocket::{Request, State};
use runtime::client::Client;
use runtime::telemetry::{spans, Context};
use serde::Serialize;
use serde_json::Value;
use tracing::Instrument;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::{Auth, Authorized};
use crate::db::Pool;
use crate::error::{Error, ErrorBody, NotUniqueBody, Unauthorized};
use crate::idempotency::{self, IdempotencyKey, Ttl};
use crate::links::status_url;
use crate::outbox::{Outbox, Recorded};
use crate::store::{self, KeyUse, Keyed, NewJob};
use crate::submission::{parse_submission, Accepts, JobRequest, Submission};
use crate::trace::ServerSpan;
use crate::unique;
use crate::workflow::Kind;

/// How long saving a group for Python's `GroupResult.restore` may hold up the answer.
const GROUP_SAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether a body of `content_type` is read. JSON types always. With a credential required,
/// also none and curl's `-d` default (`x-www-form-urlencoded`), since `curl -d '{...}'` is how
/// people call this. Without one (`open`), JSON types only: a browser sends a form, or a body
/// of no type, to any site without asking it first (no CORS preflight), so a page elsewhere
/// could otherwise enqueue jobs here with its visitors' browsers.
fn is_json_like(content_type: Option<&ContentType>, open: bool) -> bool {
    match content_type {
        Some(ct) if ct.is_json() || ct.sub().as_str().ends_with("+json") => true,
        _ if open => false,
        None => true,
        Some(ct) => ct.is_form(),
    }
}

/// A `POST /receive` body read: what it asks for and, when the request carries an
/// `Idempotency-Key`, the digest of its bytes, which a repeat of the key must match.
pub struct Received {
    pub submission: Submission,
    pub digest: Option<Vec<u8>>,
}

#[rocket::async_trait]
impl<'r> FromData<'r> for Received {
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

async fn read(request: &Request<'_>, data: Data<'_>, accepts: &Accepts) -> Result<Received, Error> {
    let open = request.rocket().state::<Auth>().is_none_or(Auth::is_open);
    if !is_json_like(request.content_type(), open) {
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
    Ok(Received {
        submission: parse_submission(&body, accepts)?,
        // Only then: no hashing on the path of requests without a key.
        digest: request
            .headers()
            .contains(idempotency::HEADER)
            .then(|| idempotency::digest(&body)),
    })
}

/// A job accepted: its task id and where to poll it.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobAccepted {
    /// The Celery task id.
    pub task_id: Uuid,
    /// `/status/<task_id>`, also the `Location` header.
    #[schema(example = "/status/f4d39611-b181-4004-85fd-6208e91cb392")]
    pub status_url: String,
}

/// A workflow accepted: its id (a group's is its `GroupResult` id), where to poll it, and its
/// steps' task ids in order.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowAccepted {
    pub workflow_id: Uuid,
    pub workflow: Kind,
    /// `/status/<workflow_id>`, also the `Location` header.
    pub status_url: String,
    pub task_ids: Vec<Uuid>,
}

/// The body of a 202 answer, and of the 200 that answers a repeated `Idempotency-Key`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum AcceptedBody {
    Job(JobAccepted),
    Workflow(WorkflowAccepted),
}

/// `202 Accepted` (`200 OK` for a repeated key) with the id to poll, where to poll it, and a
/// `Location` header.
#[derive(rocket::Responder)]
pub struct Accepted {
    body: (Status, Json<AcceptedBody>),
    location: Header<'static>,
}

impl Accepted {
    /// `body` with `status` and its status URL as the `Location`.
    fn with(status: Status, body: AcceptedBody) -> Self {
        let url = match &body {
            AcceptedBody::Job(job) => job.status_url.clone(),
            AcceptedBody::Workflow(workflow) => workflow.status_url.clone(),
        };
        Self {
            body: (status, Json(body)),
            location: Header::new("Location", url),
        }
    }
}

/// The answer naming the job `id`, or the workflow `id` of `kind` whose steps are `task_ids`.
fn accepted_body(id: Uuid, workflow: Option<Kind>, task_ids: Vec<Uuid>) -> AcceptedBody {
    match workflow {
        None => AcceptedBody::Job(JobAccepted {
            task_id: id,
            status_url: status_url(id),
        }),
        Some(kind) => AcceptedBody::Workflow(WorkflowAccepted {
            workflow_id: id,
            workflow: kind,
            status_url: status_url(id),
            task_ids,
        }),
    }
}

/// The row that records `job` under `id`, to be published now; holding the unique lock `job`
/// asks for, or its task's `task_annotations` default, when `may_be_unique` (a message the app
/// sends itself). 422 for a `unique_key` without a duration.
fn row(job: JobRequest, id: Uuid, client: &Client, may_be_unique: bool) -> Result<NewJob, Error> {
    let lock = match may_be_unique {
        true => client
            .unique_lock(
                &job.task,
                &job.args,
                &job.kwargs,
                job.unique_for.map(std::time::Duration::from_secs_f64),
                job.unique_key.clone(),
            )
            .map_err(|error| match error {
                runtime::Error::InvalidOption(reason) => Error::Unprocessable(reason),
                other => Error::Runtime(other),
            })?,
        false => None,
    };
    let now = Utc::now();
    let after = |seconds: f64| now + chrono::Duration::milliseconds((seconds * 1e3) as i64);
    let queue = job
        .queue
        .unwrap_or_else(|| client.queue_for(&job.task).to_string());
    let row = NewJob {
        eta: job.countdown.map(after),
        expires: job.expires.map(after),
        ..NewJob::single(
            id,
            job.task,
            Value::Array(job.args),
            Value::Object(job.kwargs),
            queue,
        )
    };
    Ok(row.holding(lock))
}

/// Records the job (or each step of the workflow) as PENDING and answers once the row commits:
/// the job is durable from then on. It is published after the answer; if the broker does not
/// take it, the outbox publishes it when the broker is back (the row keeps the reason meanwhile).
/// With an `Idempotency-Key`, the key commits with the rows, and a repeat of it answers 200 with
/// what the first answered, recording and publishing nothing. A unique job (`unique_for`, or its
/// task's `task_annotations`) takes its lock before the commit and is 409 while another task
/// holds it.
#[utoipa::path(
    post,
    path = "/receive",
    tag = "jobs",
    params(
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255,
            pattern = r"^[!-~]([ -~]*[!-~])?$",
            description = "Makes a retry safe: the first request with a key records its job \
                (202); a repeat with the same key and the same body bytes within \
                `web_idempotency_ttl` seconds (default 86,400) answers 200 with the same body \
                and records and publishes nothing, also when repeats arrive at once at several \
                web processes. 1 to 255 printable ASCII characters; the draft's quoted form \
                (`\"key\"`) names the same key. Keys are per JWT `sub`; callers without one \
                share a scope. After the TTL the key is forgotten and a repeat is a new job."),
    ),
    request_body(
        content = Submission,
        description = "`Content-Type` `application/json` or any `+json` type; when a bearer \
            token is required, also none or curl's form default (read as JSON too); at most \
            `web_body_limit` bytes",
    ),
    responses(
        (status = 200, description = "a repeat of an `Idempotency-Key` within \
            `web_idempotency_ttl` with the same body: the answer the key's first request had, \
            nothing recorded or published", body = AcceptedBody,
            headers(("Location" = String, description = "the `status_url`"))),
        (status = 202, description = "recorded (durable from now on); published right after \
            the answer, or by the outbox when the broker does not take it", body = AcceptedBody,
            headers(("Location" = String, description = "the `status_url`"))),
        (status = 400, description = "malformed JSON, or an `Idempotency-Key` that is not 1 \
            to 255 printable ASCII characters (or more than one)", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 413, description = "the body is over `web_body_limit`, or a workflow's steps \
            × body bytes are over `web_workflow_max_bytes`", body = ErrorBody),
        (status = 409, description = "a unique job (`unique_for`, or the task's \
            `task_annotations`) whose lock another task holds while it is queued or running: \
            nothing recorded or published; `holder` names that task", body = NotUniqueBody),
        (status = 415, description = "the body is not JSON, or, with no bearer token \
            required, not typed as JSON", body = ErrorBody),
        (status = 422, description = "a task call or workflow with wrong fields, a task not \
            accepted, a queue that does not exist while `task_create_missing_queues` is \
            false, or an `Idempotency-Key` in use with another body", body = ErrorBody),
        (status = 503, description = "the database is unavailable, or, for a unique job, the \
            result backend that holds its lock", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
#[rocket::post("/receive", data = "<received>")]
#[allow(clippy::too_many_arguments)] // one per guard, as Rocket hands them over
pub async fn receive(
    caller: Authorized,
    key: Result<IdempotencyKey, Error>,
    received: Result<Received, Error>,
    pool: &State<Pool>,
    outbox: &State<Arc<Outbox>>,
    client: &State<Client>,
    ttl: &State<Ttl>,
    served_in: ServerSpan,
) -> Result<Accepted, Error> {
    let span = served_in.0;
    let recorded_in = spans::context_of(&span);
    async move {
        let key = key?.0;
        let Received { submission, digest } = received?;
        check_queues(&submission, client).await?;
        let planned = Planned::of(submission, client, recorded_in)?;
        let insert = || spans::named("insert", "internal", Context::new());
        match key.zip(digest) {
            None => {
                let taken = unique::take(client, &planned.rows).await?;
                let recorded = planned.record(pool, outbox).instrument(insert()).await;
                taken.unless_committed(recorded).await?
            }
            Some((key, body_sha256)) => {
                let key = KeyUse {
                    scope: idempotency::scope(&caller),
                    key,
                    body_sha256,
                    task_id: planned.id,
                    workflow_kind: planned.workflow.map(|kind| kind.name().into()),
                };
                let mut connection = pool.get().await?;
                let ttl = ttl.0.as_secs_f64();
                // The locks are taken once the key is this request's, so a repeat of the key waits
                // for it and is answered 200, never refused by the lock its first holds.
                let mut taken = None;
                let slot = &mut taken;
                let rows = &planned.rows;
                let take_locks = move || async move {
                    *slot = Some(unique::take(client, rows).await?);
                    Ok::<_, Error>(())
                };
                let keyed =
                    store::insert_keyed(&mut connection, &key, &planned.rows, ttl, take_locks)
                        .instrument(insert())
                        .await;
                let keyed = match taken {
                    Some(taken) => taken.unless_committed(keyed).await?,
                    None => keyed?,
                };
                if let Keyed::Held(held) = keyed {
                    return repeat(&mut connection, &key, held).await;
                }
            }
        }
        // Committed: the job is durable and will run, so the answer is 202 from here on, whatever
        // the broker does (a 503 now would make the client send the same work twice).
        Ok(Accepted::with(
            Status::Accepted,
            planned.publish_after_answer(outbox, client).await,
        ))
    }
    .instrument(span)
    .await
}

/// The answer to `key` found held by `held`: 200 with what its first request was answered, or
/// 422 when `key` came with another body.
async fn repeat(
    connection: &mut diesel_async::AsyncPgConnection,
    key: &KeyUse,
    held: KeyUse,
) -> Result<Accepted, Error> {
    if held.body_sha256 != key.body_sha256 {
        return Err(Error::Unprocessable(format!(
            "{} `{}` was used with another request body; a repeat must send the same bytes \
             (or use a new key for a new job)",
            idempotency::HEADER,
            key.key
        )));
    }
    let workflow = held.workflow_kind.as_deref().and_then(Kind::from_name);
    let task_ids = match workflow {
        Some(_) => store::workflow(connection, held.task_id)
            .await?
            .into_iter()
            .map(|step| step.task_id)
            .collect(),
        None => Vec::new(),
    };
    Ok(Accepted::with(
        Status::Ok,
        accepted_body(held.task_id, workflow, task_ids),
    ))
}

/// 422 for a queue named in `submission` that must not be created: one that does not exist
/// while `task_create_missing_queues` is off. When the broker cannot tell, the job is taken:
/// its publish decides (the outbox ends it with the reason if the queue is missing).
async fn check_queues(submission: &Submission, client: &Client) -> Result<(), Error> {
    let named: BTreeSet<&str> = match submission {
        Submission::Job(job) => job.queue.iter().map(String::as_str).collect(),
        Submission::Workflow { steps, .. } => {
            steps.iter().filter_map(|s| s.queue.as_deref()).collect()
        }
    };
    for queue in named {
        match client.may_publish_to(queue).await {
            Ok(true) => {}
            Ok(false) => {
                let missing = runtime::Error::MissingQueue(queue.to_string());
                return Err(Error::Unprocessable(format!("`queue`: {missing}")));
            }
            Err(error) => {
                tracing::warn!(%queue, %error, "cannot tell whether the queue exists; the job is taken")
            }
        }
    }
    Ok(())
}

/// A submission as rows: the id its answer names (the job's, or the workflow's), the kind of
/// workflow it is if it is one, and its rows (a workflow's in step order).
struct Planned {
    id: Uuid,
    workflow: Option<Kind>,
    rows: Vec<NewJob>,
}

impl Planned {
    /// The rows of `submission`. The app sends a job, a group's members and a chain's first step
    /// itself, so those may hold unique locks; a chain's later steps are sent by workers.
    /// Each row keeps `recorded_in`, the trace its publish continues.
    fn of(
        submission: Submission,
        client: &Client,
        recorded_in: Option<(String, Option<String>)>,
    ) -> Result<Self, Error> {
        let mut planned = Self::untraced(submission, client)?;
        if let Some((traceparent, tracestate)) = recorded_in {
            for row in &mut planned.rows {
                row.traceparent = Some(traceparent.clone());
                row.tracestate = tracestate.clone();
            }
        }
        Ok(planned)
    }

    /// The rows of `submission`, in no trace yet.
    fn untraced(submission: Submission, client: &Client) -> Result<Self, Error> {
        match submission {
            Submission::Job(job) => {
                let id = Uuid::new_v4();
                Ok(Self {
                    id,
                    workflow: None,
                    rows: vec![row(job, id, client, true)?],
                })
            }
            Submission::Workflow { kind, steps } => {
                let id = Uuid::new_v4();
                let rows = steps
                    .into_iter()
                    .enumerate()
                    .map(|(position, step)| {
                        let sent_by_us = kind == Kind::Group || position == 0;
                        Ok(NewJob {
                            workflow_id: Some(id),
                            workflow_kind: Some(kind.name().into()),
                            workflow_position: Some(position as i32),
                            ..row(step, Uuid::new_v4(), client, sent_by_us)?
                        })
                    })
                    .collect::<Result<_, Error>>()?;
                Ok(Self {
                    id,
                    workflow: Some(kind),
                    rows,
                })
            }
        }
    }

    /// Records the rows without a key: a job in the next group commit, a workflow's steps in one
    /// statement of their own, so it is recorded whole or not at all.
    async fn record(&self, pool: &Pool, outbox: &Outbox) -> Result<(), Error> {
        match (self.workflow, self.rows.as_slice()) {
            (None, [job]) => outbox.journal().jobs.write(job.clone()).await,
            _ => Ok(store::insert(&mut *pool.get().await?, &self.rows).await?),
        }
    }

    /// Publishes the rows, once committed, after the answer, which this returns. A group is
    /// also saved in the result backend as Python's `GroupResult.save()` saves one, so Python
    /// code can `GroupResult.restore()` it by the workflow's id.
    async fn publish_after_answer(self, outbox: &Arc<Outbox>, client: &Client) -> AcceptedBody {
        let task_ids: Vec<Uuid> = self.rows.iter().map(|row| row.task_id).collect();
        let answer = accepted_body(self.id, self.workflow, task_ids.clone());
        let recorded = match self.workflow {
            Some(Kind::Group) => Recorded::InTurn(self.rows),
            None | Some(Kind::Chain) => Recorded::Message(self.rows),
        };
        outbox.publish_after_answer(recorded).await;
        if self.workflow == Some(Kind::Group) {
            save_group(self.id, &task_ids, client).await;
        }
        answer
    }
}

/// Saves group `id` of `members` for Python's `GroupResult.restore`, within
/// [`GROUP_SAVE_TIMEOUT`]; a failure is logged, not answered (the jobs are recorded).
async fn save_group(id: Uuid, members: &[Uuid], client: &Client) {
    let members: Vec<String> = members.iter().map(Uuid::to_string).collect();
    let group_id = id.to_string();
    let saved = tokio::time::timeout(GROUP_SAVE_TIMEOUT, client.save_group(&group_id, &members));
    match saved.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%id, %error, "group not saved: Python cannot restore it by its id")
        }
        Err(_) => {
            tracing::warn!(%id, "group not saved in time: Python cannot restore it by its id")
        }
    }
}
