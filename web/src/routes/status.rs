//! `GET /status/<uuid>`: a job's state, progress, result or error, times and worker; or, for a
//! workflow's id, what the workflow amounts to and each of its steps.

use chrono::{DateTime, Utc};
use rocket::serde::json::Json;
use rocket::State;
use runtime::protocol::result::state;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::auth::Authorized;
use crate::db::Pool;
use crate::error::Error;
use crate::store::{self, Job};
use crate::workflow::{self, Kind};

/// Progress of a running job.
#[derive(Debug, Serialize, PartialEq)]
pub struct Progress {
    pub current: i64,
    pub total: i64,
    pub percent: f64,
}

/// A job's error.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JobError {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

/// What `/status` and `/tasks` answer for one job.
#[derive(Debug, Serialize, PartialEq)]
pub struct JobView {
    pub task_id: Uuid,
    pub task: String,
    pub state: String,
    pub progress: Option<Progress>,
    pub result: Option<Value>,
    pub error: Option<JobError>,
    pub worker: Option<String>,
    pub retries: i32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The workflow this job is a step of.
    pub workflow_id: Option<Uuid>,
}

/// What `/status` answers for a workflow: its kind, what it amounts to, and its steps in order
/// as `children`. `progress` counts the steps that have ended.
#[derive(Debug, Serialize, PartialEq)]
pub struct WorkflowView {
    pub workflow_id: Uuid,
    pub workflow: &'static str,
    pub state: String,
    pub progress: Progress,
    pub result: Option<Value>,
    pub error: Option<JobError>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub children: Vec<JobView>,
}

impl WorkflowView {
    /// The view of workflow `id` of `kind`, from its steps in order (at least one).
    fn new(id: Uuid, kind: Kind, steps: Vec<Job>) -> Self {
        let outcome = workflow::outcome(kind, &steps);
        let created_at = steps
            .iter()
            .map(|job| job.created_at)
            .min()
            .unwrap_or_default();
        let children: Vec<JobView> = steps.into_iter().map(JobView::from).collect();
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
            workflow: kind.name(),
            state: outcome.state,
            progress: Progress::new(outcome.done as i64, children.len() as i64),
            result: outcome.result,
            error,
            created_at,
            finished_at: outcome.finished_at,
            children,
        }
    }
}

/// A job's view or a workflow's.
#[derive(Debug, Serialize, PartialEq)]
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

impl From<Job> for JobView {
    fn from(job: Job) -> Self {
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
                kind: "PublishError".into(),
                message: reason,
            }),
            _ => None,
        };
        Self {
            task_id: job.task_id,
            task: job.task_name,
            state: job.state,
            progress,
            result: job.result,
            error,
            worker: job.worker,
            retries: job.retries,
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            workflow_id: job.workflow_id,
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

/// The view of the job with task id `id`, or of the workflow with that id; 404 when neither.
pub async fn view(pool: &Pool, id: Uuid) -> Result<StatusView, Error> {
    let mut connection = pool.get().await?;
    if let Some(job) = store::find(&mut connection, id).await? {
        return Ok(StatusView::Job(job.into()));
    }
    let steps = store::workflow(&mut connection, id).await?;
    let kind = steps
        .first()
        .and_then(|step| step.workflow_kind.as_deref())
        .and_then(Kind::from_name)
        .ok_or_else(|| Error::NotFound(id.to_string()))?;
    Ok(StatusView::Workflow(WorkflowView::new(id, kind, steps)))
}

/// The job with this task id, or the workflow with this id.
#[rocket::get("/status/<id>")]
pub async fn status(
    _auth: Authorized,
    id: &str,
    pool: &State<Pool>,
) -> Result<Json<StatusView>, Error> {
    Ok(Json(view(pool, parse_id(id)?).await?))
}
