//! `beat`: sends the periodic tasks of `beat_schedule` when they are due, to Rust or Python
//! workers alike, as Celery beat does.
//!
//! Its state lives in the result backend's Redis, under `beat_key_prefix`:
//! - `<prefix>.last-run`, a hash of entry name to the time (epoch seconds) of its last run. A
//!   restart reads it back, so it neither skips nor repeats a run.
//! - `<prefix>.lock`, held with an expiry by the one beat that sends. A second beat started by
//!   mistake waits, and takes over within the expiry if the first one dies.

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::backend::RedisBackend;
use crate::client::{Client, SendOptions};
use crate::config::CeleryConfig;
use crate::error::{Error, Result};
use crate::schedule::{BeatEntry, Schedule};

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
                .await;
            match sent {
                Ok(sent) => {
                    tracing::info!(entry = %name, task = %entry.task, id = %sent.id, %due, "beat: sent")
                }
                // A unique task (task_annotations) whose last run still holds its lock: this run
                // is skipped, as if sent, rather than holding up the entries after it.
                Err(Error::NotUnique { holder, .. }) => {
                    tracing::info!(entry = %name, task = %entry.task, %holder, %due, "beat: not sent, the task's last run is still queued or running")
                }
                Err(error) => return Err(error),
            }
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
