//! `GET /status/<uuid>`: a job's state, progress, result or error, times and worker.

use chrono::{DateTime, Utc};
use rocket::serde::json::Json;
use rocket::State;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::auth::Authorized;
use crate::db::Pool;
use crate::error::Error;
use crate::store::{self, Job};

/// Progress of a running job.
#[derive(Debug, Serialize, PartialEq)]
pub struct Progress {
    pub current: i64,
    pub total: i64,
    pub percent: f64,
}

/// A job's error.
#[derive(Debug, Serialize, PartialEq)]
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
}

impl From<Job> for JobView {
    fn from(job: Job) -> Self {
        let progress = match (job.progress_current, job.progress_total) {
            (Some(current), Some(total)) => {
                let percent = if total > 0 {
                    (current as f64 * 100.0 / total as f64 * 10.0).round() / 10.0
                } else {
                    0.0
                };
                Some(Progress {
                    current,
                    total,
                    percent,
                })
            }
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
        }
    }
}

/// The job with this task id.
#[rocket::get("/status/<id>")]
pub async fn status(
    _auth: Authorized,
    id: &str,
    pool: &State<Pool>,
) -> Result<Json<JobView>, Error> {
    let task_id = Uuid::parse_str(id)
        .map_err(|_| Error::BadRequest(format!("{id:?} is not a task id (UUID)")))?;
    let mut connection = pool.get().await?;
    let job = store::find(&mut connection, task_id)
        .await?
        .ok_or_else(|| Error::NotFound(id.to_string()))?;
    Ok(Json(job.into()))
}
