//! A periodic task of `beat_schedule` and when it runs, without I/O: the settings check the
//! entries and `beat` sends them.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use croner::Cron;
use serde::{Deserialize, Serialize};

/// One periodic task of `beat_schedule`: what to send and when (every `schedule` seconds, or
/// at the times a `crontab` expression names, in UTC).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BeatEntry {
    /// Task name.
    pub task: String,
    /// Seconds between runs.
    #[serde(default)]
    pub schedule: Option<f64>,
    /// `minute hour day-of-month month day-of-week`, as Celery's `crontab()` takes them.
    #[serde(default)]
    pub crontab: Option<String>,
    /// Positional arguments.
    #[serde(default)]
    pub args: Vec<serde_json::Value>,
    /// Keyword arguments.
    #[serde(default)]
    pub kwargs: serde_json::Map<String, serde_json::Value>,
    /// Queue to send to (default: the task's route).
    #[serde(default)]
    pub queue: Option<String>,
    /// Seconds after which a sent run is discarded if not started.
    #[serde(default)]
    pub expires: Option<f64>,
}

/// When an entry runs.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Every so many seconds.
    Every(chrono::Duration),
    /// At the times a crontab expression names (UTC).
    Crontab(Box<Cron>),
}

impl Schedule {
    /// The schedule of `entry`: exactly one of `schedule` (seconds, more than 0) and `crontab`.
    pub fn of(entry: &BeatEntry) -> std::result::Result<Self, String> {
        match (entry.schedule, &entry.crontab) {
            (Some(seconds), None) if seconds > 0.0 && seconds.is_finite() => {
                chrono::Duration::try_milliseconds((seconds * 1e3) as i64)
                    .filter(|d| !d.is_zero())
                    .map(Schedule::Every)
                    .ok_or_else(|| format!("schedule {seconds} is not a usable number of seconds"))
            }
            (Some(seconds), None) => Err(format!(
                "schedule must be more than 0 seconds, not {seconds}"
            )),
            (None, Some(expression)) => Cron::from_str(expression)
                .map(|cron| Schedule::Crontab(Box::new(cron)))
                .map_err(|e| format!("crontab {expression:?}: {e}")),
            _ => Err("give exactly one of schedule (seconds) and crontab".into()),
        }
    }

    /// The first run time after `last`.
    pub fn next_after(&self, last: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every(period) => last.checked_add_signed(*period),
            Schedule::Crontab(cron) => cron.find_next_occurrence(&last, false).ok(),
        }
    }

    /// What to record as the last run when a run due at `due` is sent at `now`: `due`, which
    /// keeps the cadence, unless beat was away so long that the next run is also past; then
    /// `now`, so that missed runs are not all sent at once (one run stands for them, as in
    /// Celery).
    pub fn recorded_run(&self, due: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
        match self.next_after(due) {
            Some(next) if next > now => due,
            _ => now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(schedule: Option<f64>, crontab: Option<&str>) -> BeatEntry {
        BeatEntry {
            task: "tasks.add".into(),
            schedule,
            crontab: crontab.map(str::to_owned),
            args: Vec::new(),
            kwargs: Default::default(),
            queue: None,
            expires: None,
        }
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    #[test]
    fn an_entry_has_exactly_one_valid_schedule() {
        assert!(Schedule::of(&entry(Some(1.5), None)).is_ok());
        assert!(Schedule::of(&entry(None, Some("*/5 * * * *"))).is_ok());
        for (bad, reason) in [
            (entry(None, None), "exactly one"),
            (entry(Some(1.0), Some("* * * * *")), "exactly one"),
            (entry(Some(0.0), None), "more than 0"),
            (entry(Some(f64::NAN), None), "more than 0"),
            (entry(None, Some("not cron")), "crontab"),
        ] {
            let error = Schedule::of(&bad).unwrap_err();
            assert!(error.contains(reason), "{error}");
        }
    }

    #[test]
    fn runs_follow_the_schedule_and_a_long_absence_sends_one_run() {
        let every = Schedule::of(&entry(Some(10.0), None)).unwrap();
        let last = at("2026-11-27T10:00:00Z");
        assert_eq!(every.next_after(last), Some(at("2026-11-27T10:00:10Z")));
        // Sent a little late: the cadence is kept.
        let due = at("2026-11-27T10:00:10Z");
        assert_eq!(every.recorded_run(due, at("2026-11-27T10:00:12Z")), due);
        // Away for a minute: one run now, the schedule restarts from it.
        let now = at("2026-11-27T10:01:00Z");
        assert_eq!(every.recorded_run(due, now), now);
        let cron = Schedule::of(&entry(None, Some("*/5 * * * *"))).unwrap();
        assert_eq!(
            cron.next_after(at("2026-11-27T10:02:30Z")),
            Some(at("2026-11-27T10:05:00Z"))
        );
    }
}
