//! `GET /tasks?state=&task=&limit=&cursor=`: jobs newest first, a page at a time.

use chrono::DateTime;
use rocket::serde::json::Json;
use rocket::State;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::status::{results_within, AnswerBudget, JobView};
use crate::auth::Authorized;
use crate::db::Pool;
use crate::error::{DatabaseUnavailable, Error, ErrorBody, Unauthorized};
use crate::store::{self, Cursor, Listing};

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;

/// The opaque cursor text: creation time in microseconds and the id of the page's last job.
fn encode_cursor(cursor: Cursor) -> String {
    format!(
        "{}_{}",
        cursor.created_at.timestamp_micros(),
        cursor.task_id.simple()
    )
}

fn decode_cursor(text: &str) -> Result<Cursor, Error> {
    let bad = || Error::BadRequest(format!("invalid cursor {text:?}"));
    let (micros, id) = text.split_once('_').ok_or_else(bad)?;
    let created_at = micros
        .parse()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    let task_id = Uuid::parse_str(id).map_err(|_| bad())?;
    Ok(Cursor {
        created_at,
        task_id,
    })
}

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
    let limit = match limit {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| Error::Unprocessable(format!("`limit` must be 1 to {MAX_LIMIT}")))?,
    };
    // PostgreSQL's text cannot hold U+0000, so no row can match such a filter; sent as a query
    // parameter, it would fail the statement (an encoding error, not a database gone away).
    for (name, value) in [("state", &state), ("task", &task)] {
        if value.as_deref().is_some_and(|text| text.contains('\0')) {
            return Err(Error::Unprocessable(format!(
                "`{name}` may not hold the NUL character (\\u0000)"
            )));
        }
    }
    let listing = Listing {
        state,
        task,
        after: cursor.map(decode_cursor).transpose()?,
        limit: limit + 1,
    };
    let mut connection = pool.get().await?;
    let mut jobs = store::list(&mut connection, &listing).await?;
    let next = (jobs.len() as i64 > limit).then(|| {
        jobs.truncate(limit as usize);
        jobs.last().map(|job| {
            encode_cursor(Cursor {
                created_at: job.created_at,
                task_id: job.task_id,
            })
        })
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
        next_cursor: next.flatten(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let cursor = Cursor {
            created_at: DateTime::from_timestamp_micros(1_795_584_251_734_160).unwrap(),
            task_id: Uuid::new_v4(),
        };
        assert_eq!(decode_cursor(&encode_cursor(cursor)).unwrap(), cursor);
        for bad in ["", "x_y", "123", "123_not-a-uuid"] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
    }
}
