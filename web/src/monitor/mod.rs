//! The monitor (`monitor = true`): follows the cluster's events (`celeryev`) from every worker,
//! Python's and ours, and records every task and worker in PostgreSQL (`task_history`,
//! `workers`), for `GET /history` and `GET /workers`.
//!
//! - [`follow`]: the events, on one named queue that all the web replicas share
//!   (`monitor_queue`), so that on RabbitMQ each event is recorded once and events wait there
//!   while no monitor runs (`monitor_queue_expires`). An event is acked once its rows are
//!   written, in batches ([`Batcher`]); a database outage holds it until it is.
//! - [`catch_up`]: on Redis events are PUB/SUB and lost while nobody listens, so tasks seen
//!   but not ended are read from the result backend (`celery-task-meta-<id>`) every
//!   `web_sweep_interval`; on RabbitMQ this covers events a worker dropped.
//! - [`retain`]: forgets tasks older than `monitor_retention_days`, a bounded batch at a time.
//!
//! Every write is an idempotent upsert that only moves a task forward ([`event`]), so replicas,
//! redeliveries and the catch-up may record the same news twice.

pub mod event;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use runtime::backend::RedisBackend;
use runtime::broker::{self, Delivery, Exchange, NamedSubscription};
use runtime::CeleryConfig;
use tokio::sync::mpsc;

use crate::batch::{Batcher, Written};
use crate::db::Pool;
use crate::error::Error;
use crate::store;
use event::Record;

/// Events a monitor holds unacked at once: what its batches are made of.
const PREFETCH: u16 = 1000;
/// Records written by one statement at most.
const BATCH: usize = 500;
/// Batches written at once.
const WRITERS: usize = 2;
/// Longest pause between attempts to subscribe, or to write while the database is down.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Tasks one catch-up pass reads from the result backend at most.
const CATCH_UP_BATCH: i64 = 500;
/// Rows one retention statement deletes at most, so no statement holds locks for long.
const RETENTION_BATCH: i64 = 10_000;
/// Pause between retention statements, so the deletes leave room for the writes.
const RETENTION_PAUSE: Duration = Duration::from_millis(200);
/// How often the retention runs.
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

/// The history's writer: records queued together are merged and written in one statement.
pub type Writer = Arc<Batcher<Record>>;

/// Starts the writer of the history on `pool`.
pub fn writer(pool: Pool) -> Writer {
    Arc::new(Batcher::start(BATCH, WRITERS, move |records| {
        let pool = pool.clone();
        async move { write(&pool, records).await }
    }))
}

async fn write(pool: &Pool, records: Vec<Record>) -> Result<(), Error> {
    let (tasks, workers) = event::coalesce(records);
    let mut connection = pool.get().await?;
    if !tasks.is_empty() {
        store::record_tasks(&mut connection, &tasks).await?;
    }
    if !workers.is_empty() {
        store::record_workers(&mut connection, &workers).await?;
    }
    Ok(())
}

/// Starts the monitor's loops (until the process ends): the events, the catch-up (with a
/// result backend) and the retention.
pub fn start(config: &CeleryConfig, pool: Pool, backend: Option<RedisBackend>) {
    let writer = writer(pool.clone());
    tokio::spawn(follow(config.clone(), writer.clone()));
    match backend {
        Some(backend) => {
            let since = Since(config.result_expires);
            let interval = Duration::from_secs(config.web_sweep_interval);
            tokio::spawn(catch_up(pool.clone(), backend, writer, since, interval));
        }
        None => tracing::warn!("no result_backend: the monitor cannot catch up on missed ends"),
    }
    tokio::spawn(retain(pool, config.monitor_retention_days));
}

/// Follows the events until the process ends, subscribing again (with backoff) when cut off.
pub async fn follow(config: CeleryConfig, writer: Writer) {
    let subscription = NamedSubscription {
        queue: config.monitor_queue.clone(),
        expires_ms: u32::try_from(config.monitor_queue_expires * 1000).unwrap_or(u32::MAX),
    };
    let mut backoff = Duration::from_millis(500);
    loop {
        let subscribed = async {
            let broker = broker::of(&config).await?;
            let deliveries = broker
                .subscribe_named(&Exchange::EVENTS, "#", &subscription, PREFETCH)
                .await?;
            Ok::<_, runtime::Error>((broker, deliveries))
        };
        match subscribed.await {
            Ok((_broker, deliveries)) => {
                backoff = Duration::from_millis(500);
                tracing::info!(queue = %subscription.queue, "monitor following the events");
                record_all(deliveries, &writer).await;
                tracing::warn!("monitor's event subscription ended");
            }
            Err(error) => tracing::warn!(%error, "monitor cannot subscribe to the events"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Records each delivery's events and acks it once they are written, until the deliveries end.
async fn record_all(mut deliveries: mpsc::Receiver<Delivery>, writer: &Writer) {
    while let Some(delivery) = deliveries.recv().await {
        let records = match &delivery.message {
            Ok(message) => event::records(&message.body, Utc::now()),
            Err(error) => {
                tracing::debug!(reason = %error.reason, "passing over an unreadable event");
                Vec::new()
            }
        };
        tokio::spawn(record_then_ack(delivery, records, writer.clone()));
    }
}

/// Writes `records` (again, with backoff, while the database is unavailable), then acks their
/// delivery. A record the database refuses for itself is logged and dropped.
async fn record_then_ack(delivery: Delivery, records: Vec<Record>, writer: Writer) {
    let mut backoff = Duration::from_millis(500);
    loop {
        match queue_all(&writer, records.clone()).await {
            Ok(()) => break,
            Err(Error::DatabaseUnavailable(reason)) => {
                tracing::warn!(%reason, "cannot record an event yet; trying again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(error) => {
                tracing::error!(%error, "cannot record an event; dropping it");
                break;
            }
        }
    }
    if let Err(error) = delivery.settle.ack().await {
        // Delivered again later, and recorded again: the writes are idempotent.
        tracing::warn!(%error, "cannot ack an event");
    }
}

async fn queue_all(writer: &Writer, records: Vec<Record>) -> Result<(), Error> {
    let mut written: Vec<Written> = Vec::with_capacity(records.len());
    for record in records {
        written.push(writer.queue(record).await?);
    }
    for write in written {
        write.wait().await?;
    }
    Ok(())
}

/// How far back the result backend still holds a task's state: `result_expires` seconds (0:
/// for ever).
#[derive(Debug, Clone, Copy)]
pub struct Since(pub u64);

impl Since {
    fn cutoff(self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self.0 {
            0 => DateTime::<Utc>::MIN_UTC,
            seconds => now - chrono::Duration::seconds(seconds as i64),
        }
    }
}

/// Reads tasks seen but not ended from the result backend every `interval`, until the process
/// ends.
pub async fn catch_up(
    pool: Pool,
    backend: RedisBackend,
    writer: Writer,
    since: Since,
    interval: Duration,
) {
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        if let Err(error) = catch_up_once(&pool, &backend, &writer, since).await {
            tracing::warn!(%error, "monitor catch-up failed");
        }
    }
}

/// One catch-up pass over the tasks least recently checked; returns how many it recorded news
/// of.
pub async fn catch_up_once(
    pool: &Pool,
    backend: &RedisBackend,
    writer: &Writer,
    since: Since,
) -> Result<usize, Error> {
    let now = Utc::now();
    let ids = {
        let mut connection = pool.get().await?;
        store::history_to_check(&mut connection, since.cutoff(now), CATCH_UP_BATCH).await?
    };
    let mut records = Vec::new();
    for id in ids {
        if let Some(meta) = backend.get(&id.to_string()).await? {
            records.extend(event::from_meta(id, &meta, now).map(Record::Task));
        }
    }
    let told = records.len();
    queue_all(writer, records).await?;
    Ok(told)
}

/// Forgets tasks first seen more than `days` ago (and workers last heard of then), every hour
/// from now on; 0 keeps everything.
pub async fn retain(pool: Pool, days: u64) {
    if days == 0 {
        return;
    }
    let mut ticks = tokio::time::interval(RETENTION_INTERVAL);
    loop {
        ticks.tick().await;
        let before = Utc::now() - chrono::Duration::days(days as i64);
        match forget_before(&pool, before, RETENTION_BATCH).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, %before, "forgot old task history"),
            Err(error) => tracing::warn!(%error, "history retention failed"),
        }
    }
}

/// Deletes the tasks first seen before `before`, `batch` rows a statement with a pause between,
/// and the workers last heard of before it; returns how many tasks.
pub async fn forget_before(pool: &Pool, before: DateTime<Utc>, batch: i64) -> Result<usize, Error> {
    let mut total = 0;
    loop {
        let deleted = store::forget_history_before(&mut *pool.get().await?, before, batch).await?;
        total += deleted;
        if (deleted as i64) < batch {
            break;
        }
        tokio::time::sleep(RETENTION_PAUSE).await;
    }
    store::forget_workers_before(&mut *pool.get().await?, before).await?;
    Ok(total)
}
