//! `GET /history/throughput?since=&until=`: how many tasks of each name the history saw per
//! minute, the last hour unless asked otherwise: what the `/ui` page charts.

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use rocket::serde::json::Json;
use rocket::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::history::time_of;
use crate::auth::Authorized;
use crate::db::Pool;
use crate::error::{DatabaseUnavailable, Error, ErrorBody, Unauthorized};
use crate::store::{self, MinuteCount};

/// The window when `since` is not given: the hour before `until`.
const DEFAULT_WINDOW: TimeDelta = TimeDelta::hours(1);
/// The longest window: its answer stays at most 1,440 minutes per name.
const MAX_WINDOW: TimeDelta = TimeDelta::hours(24);

/// Tasks of a name first seen in one minute.
#[derive(Debug, Serialize, PartialEq, ToSchema)]
pub struct MinuteView {
    /// The minute's start.
    pub minute: DateTime<Utc>,
    #[schema(example = 42)]
    pub tasks: i64,
}

/// The minutes of one task name that saw a task.
#[derive(Debug, Serialize, PartialEq, ToSchema)]
pub struct Series {
    /// Null for tasks whose name no event told yet.
    #[schema(required = true, example = "tasks.add")]
    pub name: Option<String>,
    /// Its tasks in the whole window.
    pub total: i64,
    /// Oldest first; a minute without a task is left out.
    pub minutes: Vec<MinuteView>,
}

/// `GET /history/throughput`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Throughput {
    /// The window's start: `since` down to its whole minute.
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    /// By name; tasks without a name last.
    pub series: Vec<Series>,
}

/// The window asked for: `until` now by default, `since` an hour before it, down to its minute
/// (so that every minute but the last is whole); 422 when it is empty or over 24 hours.
fn window(
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), Error> {
    let until = until.unwrap_or(now);
    let since = since.unwrap_or(until - DEFAULT_WINDOW);
    let since = since
        .duration_trunc(TimeDelta::minutes(1))
        .map_err(|_| Error::Unprocessable("`since` is out of range".into()))?;
    if since >= until || until - since > MAX_WINDOW {
        return Err(Error::Unprocessable(
            "`since` must be before `until`, by at most 24 hours".into(),
        ));
    }
    Ok((since, until))
}

/// The counts (by name, then minute) as one series per name.
fn series(counts: Vec<MinuteCount>) -> Vec<Series> {
    let mut all: Vec<Series> = Vec::new();
    for count in counts {
        let minute = MinuteView {
            minute: count.minute,
            tasks: count.tasks,
        };
        match all.last_mut() {
            Some(last) if last.name == count.name => {
                last.total += count.tasks;
                last.minutes.push(minute);
            }
            _ => all.push(Series {
                name: count.name,
                total: count.tasks,
                minutes: vec![minute],
            }),
        }
    }
    all
}

/// Tasks per minute and name in the window, by their first event (as `GET /history`'s `since`
/// and `until` count them). Empty unless a web process runs the monitor (`monitor = true`).
#[utoipa::path(
    get,
    path = "/history/throughput",
    tag = "history",
    params(
        ("since" = Option<String>, Query, format = DateTime,
            description = "the window's start (RFC 3339), down to its minute; an hour before `until` by default"),
        ("until" = Option<String>, Query, format = DateTime,
            description = "the window's end (RFC 3339), now by default"),
    ),
    responses(
        (status = 200, description = "per task name, its tasks per minute", body = Throughput),
        (status = 401, response = Unauthorized),
        (status = 422, description = "`since` or `until` is not an RFC 3339 time, or the window \
            is empty or longer than 24 hours", body = ErrorBody),
        (status = 503, response = DatabaseUnavailable),
    ),
    security(("bearer" = [])),
)]
#[rocket::get("/history/throughput?<since>&<until>")]
pub async fn throughput(
    _auth: Authorized,
    since: Option<&str>,
    until: Option<&str>,
    pool: &State<Pool>,
) -> Result<Json<Throughput>, Error> {
    let (since, until) = window(
        time_of("since", since)?,
        time_of("until", until)?,
        Utc::now(),
    )?;
    let counts = store::minute_counts(&mut *pool.get().await?, since, until).await?;
    Ok(Json(Throughput {
        since,
        until,
        series: series(counts),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    #[test]
    fn the_window_is_the_last_hour_from_a_whole_minute_and_at_most_a_day() {
        let now = at("2026-12-07T15:00:30.5Z");
        assert_eq!(
            window(None, None, now).unwrap(),
            (at("2026-12-07T14:00:00Z"), now)
        );
        let until = at("2026-12-07T12:00:00Z");
        assert_eq!(
            window(None, Some(until), now).unwrap(),
            (at("2026-12-07T11:00:00Z"), until)
        );
        assert!(window(Some(at("2026-12-06T12:00:00Z")), Some(until), now).is_ok());
        for since in [
            "2026-12-06T11:59:00Z",
            "2026-12-07T12:00:00Z",
            "2026-12-07T13:00:00Z",
        ] {
            assert!(
                window(Some(at(since)), Some(until), now).is_err(),
                "{since}"
            );
        }
    }

    #[test]
    fn counts_become_one_series_per_name() {
        let count = |name: Option<&str>, minute: &str, tasks| MinuteCount {
            name: name.map(String::from),
            minute: at(minute),
            tasks,
        };
        let all = series(vec![
            count(Some("a"), "2026-12-07T14:00:00Z", 2),
            count(Some("a"), "2026-12-07T14:05:00Z", 3),
            count(Some("b"), "2026-12-07T14:01:00Z", 1),
            count(None, "2026-12-07T14:01:00Z", 4),
        ]);
        let summary: Vec<_> = all
            .iter()
            .map(|s| (s.name.as_deref(), s.total, s.minutes.len()))
            .collect();
        assert_eq!(
            summary,
            [(Some("a"), 5, 2), (Some("b"), 1, 1), (None, 4, 1)]
        );
        assert_eq!(
            all[0].minutes[1],
            MinuteView {
                minute: at("2026-12-07T14:05:00Z"),
                tasks: 3
            }
        );
    }
}
