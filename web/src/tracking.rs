//! Keeps the jobs table true to the result backend, whoever runs the job (our worker or a stock
//! Python worker without events): every state write Celery publishes on `celery-task-meta-*`
//! is applied as it happens, and a periodic sweep re-reads jobs still not final, so a missed
//! message or a restart of the web app never leaves a row stale.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use runtime::backend::RedisBackend;
use runtime::protocol::result::ResultMeta;
use uuid::Uuid;

use crate::db::Pool;
use crate::error::Error;
use crate::store;

/// Jobs one sweep reconciles at most.
const SWEEP_BATCH: i64 = 500;
/// Longest pause between attempts to resubscribe after losing the backend.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Applies one meta to its row, if the row exists and the meta moves it forward.
async fn apply(pool: &Pool, id: &str, meta: &ResultMeta) -> Result<(), Error> {
    let Ok(id) = Uuid::parse_str(id) else {
        return Ok(());
    };
    let mut connection = pool.get().await?;
    store::apply(&mut connection, id, meta).await?;
    Ok(())
}

/// State writes applied at once; a shared Redis carries every worker's writes, most of them for
/// jobs of other apps, so the follower must never fall behind one write at a time.
const BATCH: usize = 256;
/// Rows updated concurrently within a batch.
const CONCURRENT_UPDATES: usize = 8;

/// Follows the backend's state writes until the process ends, resubscribing when cut off.
/// Writes that arrive together are coalesced per task (the newest wins: each is a full state)
/// and applied concurrently, one update per task, so order per task is kept.
pub async fn follow(pool: Pool, backend: RedisBackend) {
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
                            let pool = &pool;
                            async move {
                                if let Err(error) = apply(pool, &id, &meta).await {
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
pub async fn sweep(pool: Pool, backend: RedisBackend, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        if let Err(error) = sweep_once(&pool, &backend).await {
            tracing::warn!(%error, "sweep failed");
        }
    }
}

/// One reconciliation pass; returns how many rows moved.
pub async fn sweep_once(pool: &Pool, backend: &RedisBackend) -> Result<usize, Error> {
    let ids = {
        let mut connection = pool.get().await?;
        store::unfinished(&mut connection, SWEEP_BATCH).await?
    };
    let mut moved = 0;
    for id in ids {
        if let Some(meta) = backend.get(&id.to_string()).await? {
            let mut connection = pool.get().await?;
            moved += usize::from(store::apply(&mut connection, id, &meta).await?);
        }
    }
    Ok(moved)
}
