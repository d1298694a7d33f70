//! `GET /history?state=&name=&worker=&since=&until=&q=&limit=&cursor=`: the tasks the monitor
//! recorded from the cluster's events, whoever sent or ran them, newest first, a page at a time.

use chrono::{DateTime, Utc};
use rocket::serde::json::Json;
use rocket::State;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::paging::{decode_cursor, limit_of, page, without_nul};
use crate::auth::Authorized;
use crate::db::Pool;
use crate::error::{DatabaseUnavailable, Error, ErrorBody, Unauthorized};
use crate::store::{self, Cursor, HistoryListing, TaskRecord};

/// A task as the events (and, for an end no event told, the result backend) told of it.
#[derive(Debug, Serialize, PartialEq, ToSchema)]
pub struct HistoryView {
    pub task_id: Uuid,
    /// Null while only events without it were seen (`task-started`...).
    #[schema(required = true, example = "tasks.add")]
    pub name: Option<String>,
    /// PENDING (sent), RECEIVED, STARTED, a custom state, RETRY, REJECTED, or a final one
    /// (SUCCESS, FAILURE, REVOKED). States only move forward.
    #[schema(example = "SUCCESS")]
    pub state: String,
    /// The positional arguments as the events show them (Python's repr), cut at 8,192
    /// characters.
    #[schema(required = true, example = "(2, 3)")]
    pub args: Option<String>,
    #[schema(required = true, example = "{}")]
    pub kwargs: Option<String>,
    /// The hostname of the worker that received it, or that ended it (after a retry elsewhere).
    #[schema(required = true, example = "celery@host")]
    pub worker: Option<String>,
    #[schema(required = true, example = "celery")]
    pub queue: Option<String>,
    #[schema(required = true)]
    pub sent_at: Option<DateTime<Utc>>,
    #[schema(required = true)]
    pub received_at: Option<DateTime<Utc>>,
    #[schema(required = true)]
    pub started_at: Option<DateTime<Utc>>,
    #[schema(required = true)]
    pub finished_at: Option<DateTime<Utc>>,
    /// Seconds the run took, as its worker measured it.
    #[schema(required = true)]
    pub runtime: Option<f64>,
    /// The return value's repr, once SUCCESS.
    #[schema(required = true, example = "5")]
    pub result: Option<String>,
    /// The exception's repr (FAILURE, RETRY), or why it was revoked (`revoked`, `expired`,
    /// `terminated`).
    #[schema(required = true, example = "RuntimeError('boom')")]
    pub exception: Option<String>,
    #[schema(required = true)]
    pub traceback: Option<String>,
    pub retries: i32,
    #[schema(required = true)]
    pub root_id: Option<Uuid>,
    #[schema(required = true)]
    pub parent_id: Option<Uuid>,
    /// The time of its first event: the order of the listing and what `since` and `until`
    /// compare.
    pub seen_at: DateTime<Utc>,
}

impl From<TaskRecord> for HistoryView {
    fn from(row: TaskRecord) -> Self {
        Self {
            task_id: row.task_id,
            name: row.name,
            state: row.state,
            args: row.args,
            kwargs: row.kwargs,
            worker: row.worker,
            queue: row.queue,
            sent_at: row.sent_at,
            received_at: row.received_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            runtime: row.runtime,
            result: row.result,
            exception: row.exception,
            traceback: row.traceback,
            retries: row.retries,
            root_id: row.root_id,
            parent_id: row.parent_id,
            seen_at: row.seen_at,
        }
    }
}

/// One page of `GET /history`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryPage {
    /// Newest first (by first event).
    pub tasks: Vec<HistoryView>,
    /// The `cursor` of the next page; null on the last page.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// An RFC 3339 time of a query parameter; 422 for anything else (also read by
/// `GET /history/throughput`).
pub fn time_of(name: &str, text: Option<&str>) -> Result<Option<DateTime<Utc>>, Error> {
    text.map(|text| {
        DateTime::parse_from_rfc3339(text)
            .map(|time| time.to_utc())
            .map_err(|_| {
                Error::Unprocessable(format!(
                    "`{name}` must be an RFC 3339 time such as 2026-12-07T15:00:00Z"
                ))
            })
    })
    .transpose()
}

/// One page of the task history and the cursor of the next (null on the last page). Empty
/// unless a web process runs the monitor (`monitor = true`).
#[utoipa::path(
    get,
    path = "/history",
    tag = "history",
    params(
        ("state" = Option<String>, Query, description = "only tasks in this state"),
        ("name" = Option<String>, Query, description = "only tasks of this name"),
        ("worker" = Option<String>, Query, description = "only tasks of this worker (hostname)"),
        ("since" = Option<String>, Query, format = DateTime,
            description = "only tasks first seen at or after this RFC 3339 time"),
        ("until" = Option<String>, Query, format = DateTime,
            description = "only tasks first seen before this RFC 3339 time"),
        ("q" = Option<String>, Query,
            description = "only tasks whose arguments (positional or keyword) hold this text, case aside"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500,
            description = "tasks per page, 50 by default"),
        ("cursor" = Option<String>, Query,
            description = "where the page starts: the `next_cursor` of the page before"),
    ),
    responses(
        (status = 200, description = "a page of tasks, newest first", body = HistoryPage),
        (status = 400, description = "a `cursor` that no page gave", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 422, description = "`limit` is not 1 to 500, `since` or `until` is not an RFC 3339 time, or a text filter holds U+0000",
            body = ErrorBody),
        (status = 503, response = DatabaseUnavailable),
    ),
    security(("bearer" = [])),
)]
#[rocket::get("/history?<state>&<name>&<worker>&<since>&<until>&<q>&<limit>&<cursor>")]
#[allow(clippy::too_many_arguments)] // one per query parameter, as Rocket binds them
pub async fn history(
    _auth: Authorized,
    state: Option<String>,
    name: Option<String>,
    worker: Option<String>,
    since: Option<&str>,
    until: Option<&str>,
    q: Option<String>,
    limit: Option<&str>,
    cursor: Option<&str>,
    pool: &State<Pool>,
) -> Result<Json<HistoryPage>, Error> {
    let limit = limit_of(limit)?;
    for (parameter, value) in [
        ("state", &state),
        ("name", &name),
        ("worker", &worker),
        ("q", &q),
    ] {
        without_nul(parameter, value)?;
    }
    let listing = HistoryListing {
        state,
        name,
        worker,
        since: time_of("since", since)?,
        until: time_of("until", until)?,
        text: q.filter(|text| !text.is_empty()),
        after: cursor.map(decode_cursor).transpose()?,
        limit: limit + 1,
    };
    let mut rows = store::history(&mut *pool.get().await?, &listing).await?;
    let next_cursor = page(&mut rows, limit, |row| Cursor {
        at: row.seen_at,
        task_id: row.task_id,
    });
    Ok(Json(HistoryPage {
        tasks: rows.into_iter().map(HistoryView::from).collect(),
        next_cursor,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc_3339_or_refused() {
        let time = time_of("since", Some("2026-12-07T15:00:00+01:00")).unwrap();
        assert_eq!(time.unwrap().to_rfc3339(), "2026-12-07T14:00:00+00:00");
        assert_eq!(time_of("since", None).unwrap(), None);
        for bad in ["yesterday", "2026-12-07", "1765119600"] {
            assert!(time_of("until", Some(bad)).is_err(), "{bad}");
        }
    }
}
