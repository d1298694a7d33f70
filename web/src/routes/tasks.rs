//! `GET /tasks?state=&task=&limit=&cursor=`: jobs newest first, a page at a time.

use rocket::serde::json::Json;
use rocket::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::paging::{decode_cursor, limit_of, page, without_nul};
use super::status::{results_within, AnswerBudget, JobView};
use crate::auth::Authorized;
use crate::db::Pool;
use crate::error::{DatabaseUnavailable, Error, ErrorBody, Unauthorized};
use crate::store::{self, Cursor, Listing};

/// One page of `GET /tasks`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskPage {
    /// Newest first.
    pub tasks: Vec<JobView>,
    /// The `cursor` of the next page; null on the last page.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// One page of jobs and the cursor of the next (null on the last page).
#[utoipa::path(
    get,
    path = "/tasks",
    tag = "jobs",
    params(
        ("state" = Option<String>, Query, description = "only jobs in this state"),
        ("task" = Option<String>, Query, description = "only jobs of this task"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500,
            description = "jobs per page, 50 by default"),
        ("cursor" = Option<String>, Query,
            description = "where the page starts: the `next_cursor` of the page before"),
    ),
    responses(
        (status = 200, description = "a page of jobs, newest first", body = TaskPage),
        (status = 400, description = "a `cursor` that no page gave", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 422, description = "`limit` is not 1 to 500, or `state` or `task` holds U+0000",
            body = ErrorBody),
        (status = 503, response = DatabaseUnavailable),
    ),
    security(("bearer" = [])),
)]
#[rocket::get("/tasks?<state>&<task>&<limit>&<cursor>")]
pub async fn list(
    _auth: Authorized,
    state: Option<String>,
    task: Option<String>,
    limit: Option<&str>,
    cursor: Option<&str>,
    pool: &State<Pool>,
    budget: &State<AnswerBudget>,
) -> Result<Json<TaskPage>, Error> {
    let limit = limit_of(limit)?;
    without_nul("state", &state)?;
    without_nul("task", &task)?;
    let listing = Listing {
        state,
        task,
        after: cursor.map(decode_cursor).transpose()?,
        limit: limit + 1,
    };
    let mut connection = pool.get().await?;
    let mut jobs = store::list(&mut connection, &listing).await?;
    let next = page(&mut jobs, limit, |job| Cursor {
        at: job.created_at,
        task_id: job.task_id,
    });
    let mut results = results_within(&mut connection, &jobs, budget.0, |_| 1).await?;
    Ok(Json(TaskPage {
        tasks: jobs
            .into_iter()
            .map(|job| {
                let result = results.remove(&job.task_id);
                JobView::new(job, result)
            })
            .collect(),
        next_cursor: next,
    }))
}
