//! `GET /status/<uuid>`: a job's state, progress, result or error, times and worker; or, for a
//! workflow's id, what the workflow amounts to and each of its steps.
//!
//! A view reads only the columns it shows. Results are read last, and only as many as fit in
//! [`AnswerBudget`]: a workflow's (or a `/tasks` page's) other results are linked to their
//! job's own status instead, so no answer grows with the size of what its jobs returned.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use diesel_async::AsyncPgConnection;
use rocket::serde::json::Json;
use rocket::State;
use runtime::protocol::result::state;
use runtime::telemetry::propagation;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Authorized;
use crate::db::Pool;
use crate::error::{DatabaseUnavailable, Error, ErrorBody, Unauthorized};
use crate::links::status_url;
use crate::store::{self, Shown};
use crate::workflow::{self, Kind, Step};

/// Bytes of results one answer of a workflow's steps or of `/tasks` inlines
/// (`web_answer_max_bytes`); a job's own status always carries its result.
#[derive(Debug, Clone, Copy)]
pub struct AnswerBudget(pub u64);

/// Progress of a running job (what its last custom state reported), or of a workflow (steps
/// ended of all).
#[derive(Debug, Serialize, PartialEq, ToSchema)]
pub struct Progress {
    pub current: i64,
    pub total: i64,
    /// `current` of `total` in percent, to one decimal.
    pub percent: f64,
}

/// A job's error: the exception a worker reported, `TaskRevokedError`, or `PublishError` (the
/// broker has not taken the job yet and the outbox keeps trying while the state is PENDING; with
/// FAILURE, it gave up after `web_publish_max_attempts`).
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct JobError {
    /// The exception's type name.
    #[serde(rename = "type")]
    #[schema(example = "RuntimeError")]
    pub kind: String,
    pub message: String,
}

/// What `/status` and `/tasks` answer for one job. Every field is always present, null when it
/// does not apply (yet).
#[derive(Debug, Serialize, PartialEq, ToSchema)]
pub struct JobView {
    /// The Celery task id.
    pub task_id: Uuid,
    #[schema(example = "tasks.add")]
    pub task: String,
    /// A Celery state (PENDING, STARTED, RETRY, SUCCESS, FAILURE, REVOKED) or a custom one a
    /// task reports (PROGRESS...). States only move forward.
    #[schema(example = "SUCCESS")]
    pub state: String,
    /// While a custom state reports `current` and `total`.
    #[schema(required = true)]
    pub progress: Option<Progress>,
    /// The task's return value, once SUCCESS; null in a longer answer that had no room for
    /// it (see `result_truncated`).
    #[schema(required = true)]
    pub result: Option<Value>,
    /// When this answer left the result out for its size (`web_answer_max_bytes`): the job's
    /// `status_url`, whose answer carries it.
    #[schema(
        required = true,
        example = "/status/f4d39611-b181-4004-85fd-6208e91cb392"
    )]
    pub result_truncated: Option<String>,
    /// The exception's message is cut at 4,096 characters.
    #[schema(required = true)]
    pub error: Option<JobError>,
    /// The worker's hostname, once one reported.
    #[schema(required = true, example = "celery@host")]
    pub worker: Option<String>,
    pub retries: i32,
    pub created_at: DateTime<Utc>,
    #[schema(required = true)]
    pub started_at: Option<DateTime<Utc>>,
    #[schema(required = true)]
    pub finished_at: Option<DateTime<Utc>>,
    /// The workflow this job is a step of.
    #[schema(required = true)]
    pub workflow_id: Option<Uuid>,
    /// The OpenTelemetry trace the job's request, publish and runs are in (32 hex digits),
    /// when the web app traces.
    #[schema(required = true, example = "4bf92f3577b34da6a3ce929d0e0e4736")]
    pub trace_id: Option<String>,
}

/// What `/status` answers for a workflow: its kind, what it amounts to, and its steps in order
/// as `children`. `progress` counts the steps that have ended.
#[derive(Debug, Serialize, PartialEq, ToSchema)]
pub struct WorkflowView {
    pub workflow_id: Uuid,
    pub workflow: Kind,
    /// PENDING until a step starts, then STARTED; a chain fails with its first failed step, a
    /// group once every step has ended and any failed.
    #[schema(example = "SUCCESS")]
    pub state: String,
    pub progress: Progress,
    /// A chain's last result, a group's list of results; null when a step's result is left
    /// out for its size (see `result_truncated`).
    #[schema(required = true)]
    pub result: Option<Value>,
    /// True when `result` is left out because a step's result is (`result_truncated` of
    /// the children): read it from that step's status.
    pub result_truncated: bool,
    /// The failed step's error; while nothing has run, why a message is not published yet.
    #[schema(required = true)]
    pub error: Option<JobError>,
    pub created_at: DateTime<Utc>,
    #[schema(required = true)]
    pub finished_at: Option<DateTime<Utc>>,
    /// The steps in order.
    pub children: Vec<JobView>,
}

impl WorkflowView {
    /// The view of workflow `id` of `kind`, from its steps in order (at least one) and the
    /// results the answer has room for, by task id.
    fn new(id: Uuid, kind: Kind, steps: Vec<Shown>, mut results: HashMap<Uuid, Value>) -> Self {
        let created_at = steps
            .iter()
            .map(|job| job.created_at)
            .min()
            .unwrap_or_default();
        let children: Vec<JobView> = steps
            .into_iter()
            .map(|row| {
                let result = results.remove(&row.task_id);
                JobView::new(row, result)
            })
            .collect();
        let outcome = workflow::outcome(
            kind,
            &children.iter().map(JobView::step).collect::<Vec<_>>(),
        );
        let result_truncated = outcome.result.is_some()
            && children[workflow::result_steps(kind, children.len())]
                .iter()
                .any(|child| child.result_truncated.is_some());
        // The failed step's error; else, while nothing has run, why the first message is not
        // published yet.
        let error = match outcome.failed_step {
            Some(index) => children[index].error.clone(),
            None if outcome.state == state::PENDING => {
                children.iter().find_map(|child| child.error.clone())
            }
            None => None,
        };
        Self {
            workflow_id: id,
            workflow: kind,
            state: outcome.state,
            progress: Progress::new(outcome.done as i64, children.len() as i64),
            result: outcome.result.filter(|_| !result_truncated),
            result_truncated,
            error,
            created_at,
            finished_at: outcome.finished_at,
            children,
        }
    }
}

/// A job's view or a workflow's.
#[derive(Debug, Serialize, PartialEq, ToSchema)]
#[serde(untagged)]
pub enum StatusView {
    Job(JobView),
    Workflow(WorkflowView),
}

impl Progress {
    /// `current` of `total`, with the percentage to one decimal.
    fn new(current: i64, total: i64) -> Self {
        let percent = if total > 0 {
            (current as f64 * 100.0 / total as f64 * 10.0).round() / 10.0
        } else {
            0.0
        };
        Self {
            current,
            total,
            percent,
        }
    }
}

impl JobView {
    /// The view of `job` with its `result` when the answer holds it: a result the row has
    /// and the answer does not is linked.
    pub fn new(job: Shown, result: Option<Value>) -> Self {
        let progress = match (job.progress_current, job.progress_total) {
            (Some(current), Some(total)) => Some(Progress::new(current, total)),
            _ => None,
        };
        let error = match (job.error_type, job.error_message, job.publish_error) {
            (Some(kind), message, _) => Some(JobError {
                kind,
                message: message.unwrap_or_default(),
            }),
            (None, _, Some(reason)) => Some(JobError {
                kind: store::PUBLISH_ERROR.into(),
                message: reason,
            }),
            _ => None,
        };
        Self {
            task_id: job.task_id,
            task: job.task_name,
            state: job.state,
            progress,
            result_truncated: (job.result_bytes.is_some() && result.is_none())
                .then(|| status_url(job.task_id)),
            result,
            error,
            worker: job.worker,
            retries: job.retries,
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            workflow_id: job.workflow_id,
            trace_id: job.traceparent.as_deref().and_then(propagation::trace_id),
        }
    }

    /// What a workflow's outcome reads of this step.
    fn step(&self) -> Step {
        Step {
            state: self.state.clone(),
            result: self.result.clone(),
            finished_at: self.finished_at,
        }
    }
}

impl StatusView {
    /// Whether nothing more will change.
    pub fn is_final(&self) -> bool {
        let state_name = match self {
            StatusView::Job(job) => &job.state,
            StatusView::Workflow(workflow) => &workflow.state,
        };
        state::is_ready(state_name)
    }

    /// The task ids whose rows make this view.
    pub fn task_ids(&self) -> Vec<Uuid> {
        match self {
            StatusView::Job(job) => vec![job.task_id],
            StatusView::Workflow(workflow) => workflow
                .children
                .iter()
                .map(|child| child.task_id)
                .collect(),
        }
    }
}

/// `id` read as a job's or a workflow's id: 400 when it is not a UUID.
pub fn parse_id(id: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(id).map_err(|_| Error::BadRequest(format!("{id:?} is not a task id (UUID)")))
}

/// The rows of `rows` whose results fit in `budget` bytes, in order, each result counted
/// `weight(index)` times (as often as the answer shows it); a result too large for what is
/// left is skipped and a later, smaller one may still fit.
pub fn within_budget(rows: &[Shown], budget: u64, weight: impl Fn(usize) -> u64) -> Vec<Uuid> {
    let mut left = budget;
    rows.iter()
        .enumerate()
        .filter_map(|(index, row)| {
            let bytes = u64::try_from(row.result_bytes?).unwrap_or(0);
            let cost = bytes.saturating_mul(weight(index));
            (cost <= left).then(|| {
                left -= cost;
                row.task_id
            })
        })
        .collect()
}

/// The results of `rows` that fit in `budget` (see [`within_budget`]), by task id.
pub async fn results_within(
    connection: &mut AsyncPgConnection,
    rows: &[Shown],
    budget: u64,
    weight: impl Fn(usize) -> u64,
) -> Result<HashMap<Uuid, Value>, Error> {
    let ids = within_budget(rows, budget, weight);
    Ok(store::results(connection, &ids)
        .await?
        .into_iter()
        .filter_map(|(id, result)| Some((id, result?)))
        .collect())
}

/// The view of the job with task id `id`, or of the workflow with that id; 404 when neither.
/// A job's own view carries its result whatever its size (longer answers link to it); a
/// workflow's carries what fits in `budget`.
pub async fn view(pool: &Pool, id: Uuid, budget: AnswerBudget) -> Result<StatusView, Error> {
    let mut connection = pool.get().await?;
    if let Some(job) = store::shown(&mut connection, id).await? {
        let result = match job.result_bytes {
            Some(_) => store::results(&mut connection, &[id]).await?.pop(),
            None => None,
        };
        return Ok(StatusView::Job(JobView::new(
            job,
            result.and_then(|(_, result)| result),
        )));
    }
    let steps = store::workflow(&mut connection, id).await?;
    let kind = steps
        .first()
        .and_then(|step| step.workflow_kind.as_deref())
        .and_then(Kind::from_name)
        .ok_or_else(|| Error::NotFound(id.to_string()))?;
    // A succeeded workflow shows the results that make its own twice: in its `result` and in
    // their step's view.
    let succeeded = steps.iter().all(|step| step.state == state::SUCCESS);
    let doubled = workflow::result_steps(kind, steps.len());
    let weight = |index| {
        if succeeded && doubled.contains(&index) {
            2
        } else {
            1
        }
    };
    let results = results_within(&mut connection, &steps, budget.0, weight).await?;
    Ok(StatusView::Workflow(WorkflowView::new(
        id, kind, steps, results,
    )))
}

/// The job with this task id, or the workflow with this id.
#[utoipa::path(
    get,
    path = "/status/{id}",
    tag = "jobs",
    params(("id" = Uuid, Path, description = "a task id or a workflow id")),
    responses(
        (status = 200, description = "the job's view, or the workflow's", body = StatusView),
        (status = 400, description = "`id` is not a UUID", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "no job or workflow has this id", body = ErrorBody),
        (status = 503, response = DatabaseUnavailable),
    ),
    security(("bearer" = [])),
)]
#[rocket::get("/status/<id>")]
pub async fn status(
    _auth: Authorized,
    id: &str,
    pool: &State<Pool>,
    budget: &State<AnswerBudget>,
) -> Result<Json<StatusView>, Error> {
    Ok(Json(view(pool, parse_id(id)?, *budget.inner()).await?))
}
