//! `GET /workers`: every worker the monitor heard of, with its last heartbeat, how many tasks
//! it runs and has run, and whether it is online.

use chrono::{DateTime, Utc};
use rocket::serde::json::Json;
use rocket::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Authorized;
use crate::db::Pool;
use crate::error::{DatabaseUnavailable, Error, Unauthorized};
use crate::store::{self, WorkerRecord};

/// How many heartbeat intervals a worker may stay silent and still count as online, as
/// Celery's and Flower's state count it (an expiry window of 200 %).
const MISSED_HEARTBEATS: f64 = 2.0;

/// A worker as its last heartbeat told of it.
#[derive(Debug, Serialize, PartialEq, ToSchema)]
pub struct WorkerView {
    #[schema(example = "celery@host")]
    pub hostname: String,
    pub last_heartbeat: DateTime<Utc>,
    /// Seconds between its heartbeats.
    pub freq: f64,
    /// Tasks it was running at its last heartbeat.
    pub active: i32,
    /// Tasks it had received since it started, at its last heartbeat.
    pub processed: i64,
    /// It has not said goodbye (`worker-offline`), and its last heartbeat is not older than
    /// two of its intervals.
    pub online: bool,
    /// Its software and version, e.g. `py-celery 5.4.0` or `rcelery 0.1.0`.
    #[schema(required = true)]
    pub software: Option<String>,
}

impl WorkerView {
    /// The view of `worker` at `now`.
    pub fn at(worker: WorkerRecord, now: DateTime<Utc>) -> Self {
        let silent = (now - worker.last_heartbeat).as_seconds_f64();
        Self {
            online: worker.online && silent <= worker.freq * MISSED_HEARTBEATS,
            hostname: worker.hostname,
            last_heartbeat: worker.last_heartbeat,
            freq: worker.freq,
            active: worker.active,
            processed: worker.processed,
            software: worker.software,
        }
    }
}

/// `GET /workers`.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerList {
    /// By hostname.
    pub workers: Vec<WorkerView>,
}

/// Every worker the monitor heard of (none unless a web process runs it: `monitor = true`).
#[utoipa::path(
    get,
    path = "/workers",
    tag = "history",
    responses(
        (status = 200, description = "the workers, by hostname", body = WorkerList),
        (status = 401, response = Unauthorized),
        (status = 503, response = DatabaseUnavailable),
    ),
    security(("bearer" = [])),
)]
#[rocket::get("/workers")]
pub async fn workers(_auth: Authorized, pool: &State<Pool>) -> Result<Json<WorkerList>, Error> {
    let rows = store::workers(&mut *pool.get().await?).await?;
    let now = Utc::now();
    Ok(Json(WorkerList {
        workers: rows.into_iter().map(|w| WorkerView::at(w, now)).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(seconds_ago: i64, online: bool) -> WorkerRecord {
        WorkerRecord {
            hostname: "w@h".into(),
            last_heartbeat: Utc::now() - chrono::Duration::seconds(seconds_ago),
            freq: 2.0,
            active: 1,
            processed: 9,
            online,
            software: None,
        }
    }

    #[test]
    fn a_worker_is_online_until_it_says_goodbye_or_misses_two_heartbeats() {
        let now = Utc::now();
        assert!(WorkerView::at(worker(1, true), now).online);
        assert!(!WorkerView::at(worker(1, false), now).online);
        assert!(!WorkerView::at(worker(5, true), now).online);
    }
}
