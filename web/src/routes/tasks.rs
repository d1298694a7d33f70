//! `GET /tasks?state=&task=&limit=&cursor=`: jobs newest first, a page at a time.

use chrono::DateTime;
use rocket::serde::json::Json;
use rocket::State;
use serde_json::{json, Value};
use uuid::Uuid;

use super::status::JobView;
use crate::auth::Authorized;
use crate::db::Pool;
use crate::error::Error;
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

/// One page of jobs and the cursor of the next (null on the last page).
#[rocket::get("/tasks?<state>&<task>&<limit>&<cursor>")]
pub async fn list(
    _auth: Authorized,
    state: Option<String>,
    task: Option<String>,
    limit: Option<&str>,
    cursor: Option<&str>,
    pool: &State<Pool>,
) -> Result<Json<Value>, Error> {
    let limit = match limit {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| Error::Unprocessable(format!("`limit` must be 1 to {MAX_LIMIT}")))?,
    };
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
    let views: Vec<JobView> = jobs.into_iter().map(JobView::from).collect();
    Ok(Json(
        json!({ "tasks": views, "next_cursor": next.flatten() }),
    ))
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
