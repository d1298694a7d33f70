//! Keeps the jobs table true to the result backend, whoever runs the job (our worker or a stock
//! Python worker without events): every state write Celery publishes on `celery-task-meta-*`
//! is applied as it happens, and a periodic sweep re-reads jobs still not final, so a missed
//! message or a restart of the web app never leaves a row stale. Each row that moves is
//! announced on [`Changes`], which the live status streams wait on.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use runtime::backend::RedisBackend;
use runtime::protocol::result::ResultMeta;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::db::Pool;
use crate::error::Error;
use crate::store;

/// Rows the tracker moved, announced as they move; every web replica follows every backend
/// write, so each hears of every change, whoever made it.
#[derive(Clone)]
pub struct Changes(broadcast::Sender<Uuid>);

/// Changes a slow listener may fall behind by before it is told it lagged (and reads afresh).
const CHANGES_BACKLOG: usize = 4096;

impl Default for Changes {
    fn default() -> Self {
        Self(broadcast::channel(CHANGES_BACKLOG).0)
    }
}

impl Changes {
    /// The ids of the rows that move from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.0.subscribe()
    }

    fn announce(&self, id: Uuid) {
        // No listener is not an error: nobody is watching that job.
        let _ = self.0.send(id);
    }
}

/// Jobs one sweep reconciles at most.
const SWEEP_BATCH: i64 = 500;
/// Longest pause between attempts to resubscribe after losing the backend.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Applies one meta to its row, if the row exists and the meta moves it forward, and announces
/// the write even when this process did not move the row: another replica following the same
/// backend may have moved it first, and this process's listeners must still hear of it.
async fn apply(pool: &Pool, changes: &Changes, id: Uuid, meta: &ResultMeta) -> Result<bool, Error> {
    let mut connection = pool.get().await?;
    let moved = store::apply(&mut connection, id, meta).await?;
    changes.announce(id);
    Ok(moved)
}

/// State writes applied at once; a shared Redis carries every worker's writes, most of them for
/// jobs of other apps, so the follower must never fall behind one write at a time.
const BATCH: usize = 256;
/// Rows updated concurrently within a batch.
const CONCURRENT_UPDATES: usize = 8;

/// Follows the backend's state writes until the process ends, resubscribing when cut off.
/// Writes that arrive together are coalesced per task (the newest wins: each is a full state)
/// and applied concurrently, one update per task, so order per task is kept.
pub async fn follow(pool: Pool, backend: RedisBackend, changes: Changes) {
    let mut backoff = Duration::from_millis(500);
    loop {
        match backend.watch_all().await {
            Ok(writes) => {
                backoff = Duration::from_millis(500);
                tracing::info!("following result backend state writes");
                let mut batches = std::pin::pin!(writes.ready_chunks(BATCH));
                while let Some(batch) = batches.next().await {
                    let newest: HashMap<String, ResultMeta> = batch.into_iter().collect();
                    futures::stream::iter(newest)
                        .for_each_concurrent(CONCURRENT_UPDATES, |(id, meta)| {
                            let (pool, changes) = (&pool, &changes);
                            async move {
                                let Ok(task_id) = Uuid::parse_str(&id) else {
                                    return;
                                };
                                if let Err(error) = apply(pool, changes, task_id, &meta).await {
                                    tracing::warn!(%id, %error, "cannot apply state write; the sweep will retry");
                                }
                            }
                        })
                        .await;
                }
                tracing::warn!("result backend subscription ended");
            }
            Err(error) => tracing::warn!(%error, "cannot subscribe to the result backend"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Re-reads unfinished jobs from the backend every `interval`, until the process ends.
pub async fn sweep(pool: Pool, backend: RedisBackend, changes: Changes, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        if let Err(error) = sweep_once(&pool, &backend, &changes).await {
            tracing::warn!(%error, "sweep failed");
        }
    }
}

/// One reconciliation pass; returns how many rows moved.
pub async fn sweep_once(
    pool: &Pool,
    backend: &RedisBackend,
    changes: &Changes,
) -> Result<usize, Error> {
    let ids = {
        let mut connection = pool.get().await?;
        store::unfinished(&mut connection, SWEEP_BATCH).await?
    };
    let mut moved = 0;
    let mut unmoved = Vec::new();
    for id in ids {
        let applied = match backend.get(&id.to_string()).await? {
            Some(meta) => apply(pool, changes, id, &meta).await?,
            None => false,
        };
        if applied {
            moved += 1;
        } else {
            unmoved.push(id);
        }
    }
    store::checked(&mut *pool.get().await?, &unmoved).await?;
    Ok(moved)
}
