//! `beat`: sends the periodic tasks of `beat_schedule` when they are due, to Rust or Python
//! workers alike, as Celery beat does.
//!
//! Its state lives in the result backend's Redis, under `beat_key_prefix`:
//! - `<prefix>.last-run`, a hash of entry name to the time (epoch seconds) of its last run. A
//!   restart reads it back, so it neither skips nor repeats a run.
//! - `<prefix>.lock`, held with an expiry by the one beat that sends. A second beat started by
//!   mistake waits, and takes over within the expiry if the first one dies.

use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use croner::Cron;

use crate::backend::RedisBackend;
use crate::client::{Client, SendOptions};
use crate::config::{BeatEntry, CeleryConfig};
use crate::error::{Error, Result};

/// How often beat looks at its schedule: the most a run is late.
const TICK: Duration = Duration::from_millis(100);
/// How long the lock holds without being renewed.
const LOCK_MS: u64 = 5_000;

/// Takes the lock KEYS[1] for token ARGV[1], or renews it if that token holds it, for ARGV[2]
/// ms. Returns 1 while the caller holds it.
static HOLD: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#,
    )
});

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

/// The scheduler.
pub struct Beat {
    client: Client,
    backend: RedisBackend,
    entries: Vec<(String, Schedule, BeatEntry)>,
    lock_key: String,
    last_run_key: String,
    token: String,
}

impl Beat {
    /// A beat for the schedule of `config`, which needs a Redis result backend for its state.
    pub async fn new(config: CeleryConfig) -> Result<Self> {
        let backend = RedisBackend::of_expiring(&config, 0)
            .await?
            .ok_or_else(|| {
                Error::Config(
                    "beat keeps its state in the result backend's Redis: set result_backend".into(),
                )
            })?;
        let entries = config
            .beat_schedule
            .iter()
            .map(|(name, entry)| {
                Schedule::of(entry)
                    .map(|schedule| (name.clone(), schedule, entry.clone()))
                    .map_err(|reason| Error::Config(format!("beat_schedule {name}: {reason}")))
            })
            .collect::<Result<_>>()?;
        let prefix = config.beat_key_prefix.clone();
        Ok(Self {
            client: Client::new(config).await?,
            backend,
            entries,
            lock_key: format!("{prefix}.lock"),
            last_run_key: format!("{prefix}.last-run"),
            token: uuid::Uuid::new_v4().to_string(),
        })
    }

    /// Sends what is due until `shutdown` completes, while holding the lock.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        tracing::info!(entries = self.entries.len(), "beat: starting");
        let mut leading = false;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(TICK) => {}
            }
            match self.hold().await {
                Ok(true) if !leading => {
                    tracing::info!("beat: holding the lock; sending the schedule");
                    leading = true;
                }
                Ok(true) => {}
                Ok(false) => {
                    if leading {
                        tracing::warn!("beat: lost the lock; another beat sends now");
                    }
                    leading = false;
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, "beat: cannot reach Redis; trying again");
                    leading = false;
                    continue;
                }
            }
            if let Err(error) = self.send_due(Utc::now()).await {
                tracing::warn!(%error, "beat: round failed; trying again");
            }
        }
        if leading {
            let _ = self
                .backend
                .delete_if_held(&self.lock_key, &self.token)
                .await;
        }
        self.client.close().await
    }

    async fn hold(&self) -> Result<bool> {
        let held: i64 = HOLD
            .key(&self.lock_key)
            .arg(&self.token)
            .arg(LOCK_MS)
            .invoke_async(&mut self.backend.connection())
            .await?;
        Ok(held == 1)
    }

    /// Sends each entry due at `now` and records its run. An entry seen for the first time
    /// starts its schedule now, as Celery's does.
    async fn send_due(&self, now: DateTime<Utc>) -> Result<()> {
        let mut redis = self.backend.connection();
        for (name, schedule, entry) in &self.entries {
            let last: Option<f64> = redis::cmd("HGET")
                .arg(&self.last_run_key)
                .arg(name)
                .query_async(&mut redis)
                .await?;
            let Some(last) = last.and_then(from_epoch) else {
                self.record(name, now).await?;
                continue;
            };
            let Some(due) = schedule.next_after(last).filter(|due| *due <= now) else {
                continue;
            };
            let options = SendOptions {
                queue: entry.queue.clone(),
                expires: entry.expires,
                ..SendOptions::default()
            };
            let sent = self
                .client
                .send_task(
                    &entry.task,
                    entry.args.clone(),
                    entry.kwargs.clone(),
                    options,
                )
                .await?;
            tracing::info!(entry = %name, task = %entry.task, id = %sent.id, %due, "beat: sent");
            self.record(name, schedule.recorded_run(due, now)).await?;
        }
        Ok(())
    }

    async fn record(&self, name: &str, run: DateTime<Utc>) -> Result<()> {
        redis::cmd("HSET")
            .arg(&self.last_run_key)
            .arg(name)
            .arg(run.timestamp_micros() as f64 / 1e6)
            .query_async::<()>(&mut self.backend.connection())
            .await?;
        Ok(())
    }
}

fn from_epoch(seconds: f64) -> Option<DateTime<Utc>> {
    Utc.timestamp_micros((seconds * 1e6) as i64).single()
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
