//! `POST /receive`: records a job, answers its task id once the record commits, publishes it.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::Utc;
use rocket::data::{self, Data, FromData, ToByteUnit};
use rocket::http::{ContentType, Header};
use rocket::serde::json::Json;
use rocket::{Request, State};
use runtime::client::Client;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::{Auth, Authorized};
use crate::db::Pool;
use crate::error::{DatabaseUnavailable, Error, ErrorBody, Unauthorized};
use crate::outbox::{Outbox, Recorded};
use crate::store::{self, NewJob};
use crate::submission::{parse_submission, Accepts, JobRequest, Submission};
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
    parse_submission(&body, accepts)
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

/// The body of a 202 answer.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum AcceptedBody {
    Job(JobAccepted),
    Workflow(WorkflowAccepted),
}

/// `202 Accepted` with the id to poll, where to poll it, and a `Location` header.
#[derive(rocket::Responder)]
#[response(status = 202)]
pub struct Accepted {
    body: Json<AcceptedBody>,
    location: Header<'static>,
}

/// Where the job or workflow `id` is polled.
pub(crate) fn status_url(id: Uuid) -> String {
    format!("/status/{id}")
}

impl From<AcceptedBody> for Accepted {
    fn from(body: AcceptedBody) -> Self {
        let url = match &body {
            AcceptedBody::Job(job) => job.status_url.clone(),
            AcceptedBody::Workflow(workflow) => workflow.status_url.clone(),
        };
        Self {
            body: Json(body),
            location: Header::new("Location", url),
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

/// Records the job (or each step of the workflow) as PENDING and answers once the row commits:
/// the job is durable from then on. It is published after the answer; if the broker does not
/// take it, the outbox publishes it when the broker is back (the row keeps the reason meanwhile).
#[utoipa::path(
    post,
    path = "/receive",
    tag = "jobs",
    request_body(
        content = Submission,
        description = "`Content-Type` `application/json` or any `+json` type; when a bearer \
            token is required, also none or curl's form default (read as JSON too); at most \
            `web_body_limit` bytes",
    ),
    responses(
        (status = 202, description = "recorded (durable from now on); published right after \
            the answer, or by the outbox when the broker does not take it", body = AcceptedBody,
            headers(("Location" = String, description = "the `status_url`"))),
        (status = 400, description = "malformed JSON", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 413, description = "the body is over `web_body_limit`, or a workflow's steps \
            × body bytes are over `web_workflow_max_bytes`", body = ErrorBody),
        (status = 415, description = "the body is not JSON, or, with no bearer token \
            required, not typed as JSON", body = ErrorBody),
        (status = 422, description = "a task call or workflow with wrong fields, a task not \
            accepted, or a queue that does not exist while `task_create_missing_queues` is \
            false", body = ErrorBody),
        (status = 503, response = DatabaseUnavailable),
    ),
    security(("bearer" = [])),
)]
#[rocket::post("/receive", data = "<submission>")]
pub async fn receive(
    _auth: Authorized,
    submission: Result<Submission, Error>,
    pool: &State<Pool>,
    outbox: &State<Arc<Outbox>>,
    client: &State<Client>,
) -> Result<Accepted, Error> {
    let submission = submission?;
    check_queues(&submission, client).await?;
    match submission {
        Submission::Job(job) => receive_job(job, outbox, client).await,
        Submission::Workflow { kind, steps } => {
            receive_workflow(kind, steps, pool, outbox, client).await
        }
    }
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

async fn receive_job(
    job: JobRequest,
    outbox: &Arc<Outbox>,
    client: &Client,
) -> Result<Accepted, Error> {
    let id = Uuid::new_v4();
    let row = row(job, id, client);
    outbox.journal().jobs.write(row.clone()).await?;
    // Committed: the job is durable and will run, so the answer is 202 from here on, whatever
    // the broker does (a 503 now would make the client send the same work twice).
    outbox
        .publish_after_answer(Recorded::Message(vec![row]))
        .await;
    Ok(AcceptedBody::Job(JobAccepted {
        task_id: id,
        status_url: status_url(id),
    })
    .into())
}

/// A workflow's steps are written in one statement, so it is recorded whole or not at all; a
/// group is saved in the result backend as Python's `GroupResult.save()` saves one, so Python
/// code can `GroupResult.restore()` it by the workflow's id.
async fn receive_workflow(
    kind: Kind,
    steps: Vec<JobRequest>,
    pool: &Pool,
    outbox: &Arc<Outbox>,
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
    let task_ids: Vec<Uuid> = rows.iter().map(|row| row.task_id).collect();
    let group_members: Vec<String> = task_ids.iter().map(Uuid::to_string).collect();
    // Committed: the answer is 202 from here on (as for a single job).
    let recorded = match kind {
        Kind::Chain => Recorded::Message(rows),
        Kind::Group => Recorded::InTurn(rows),
    };
    outbox.publish_after_answer(recorded).await;
    if kind == Kind::Group {
        let group_id = id.to_string();
        let saved = tokio::time::timeout(
            GROUP_SAVE_TIMEOUT,
            client.save_group(&group_id, &group_members),
        );
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
    Ok(AcceptedBody::Workflow(WorkflowAccepted {
        workflow_id: id,
        workflow: kind,
        status_url: status_url(id),
        task_ids,
    })
    .into())
}
