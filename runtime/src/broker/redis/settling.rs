//! A message taken from a Redis queue and how it is settled, as kombu's Redis transport does
//! it: an ack drops its `unacked` record, a reject drops it and may push the message back, and a
//! message held for its ETA keeps its record fresh so no visibility timeout restores it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::{layout, now_seconds};
use crate::broker::arrival::Arrival;
use crate::broker::{Acker, Delivery, Settle};
use crate::error::Result;
use crate::protocol::envelope;

/// The delivery of a message [`POP_AND_RECORD`] took from `list`, holding prefetch `slot`.
pub(super) fn delivery(
    connection: &MultiplexedConnection,
    holding: &Arc<Holding>,
    list: String,
    raw: Vec<u8>,
    slot: OwnedSemaphorePermit,
    arrival: Arrival,
) -> Delivery {
    let queue = layout::queue_of(&list).to_string();
    let (message, tag, redelivered) = match envelope::decode(&raw) {
        Ok(received) => (
            Ok(received.message),
            Some(received.delivery_tag),
            received.delivery_info.redelivered,
        ),
        // The script recorded it if its envelope had a tag: settling drops the record.
        Err(error) => (Err(error), layout::recorded_tag(&raw), false),
    };
    match tag {
        Some(tag) => Delivery {
            message,
            queue,
            redelivered,
            tag: tag.clone(),
            settle: Settle::new(RedisAcker {
                connection: connection.clone(),
                tag,
                list,
                raw,
                slot: std::sync::Mutex::new(Some(slot)),
                holding: holding.clone(),
                keeping: std::sync::Mutex::new(None),
            }),
            arrival,
        },
        None => Delivery {
            message,
            queue,
            redelivered,
            tag: "(no delivery tag)".into(),
            settle: Settle::new(Dropped { _slot: slot }),
            arrival,
        },
    }
}

struct RedisAcker {
    connection: MultiplexedConnection,
    tag: String,
    list: String,
    raw: Vec<u8>,
    /// Held until settled (or until held for an ETA outside the window): the consumer fetches
    /// no more than its prefetch.
    slot: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
    holding: Arc<Holding>,
    /// While held for an ETA: stops keeping its unacked record fresh when dropped.
    keeping: std::sync::Mutex<Option<tokio_util::sync::DropGuard>>,
}

/// What one consumer holds outside its prefetch window.
pub(super) struct Holding {
    pub(super) prefetch: u16,
    /// Messages held for their ETA whose slot was given back.
    pub(super) outside: std::sync::atomic::AtomicU16,
    pub(super) visibility_timeout: u64,
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        forget(&self.connection, &self.tag, None).await
    }

    async fn reject(self: Box<Self>, requeue: bool) -> Result<()> {
        // Marked as kombu marks what it requeues, so the next run sees `redelivered`.
        let again = requeue.then(|| layout::requeued(&self.raw).map(String::into_bytes));
        let raw = again.flatten().unwrap_or_else(|| self.raw.clone());
        let back = requeue.then_some((self.list.as_str(), raw.as_slice()));
        forget(&self.connection, &self.tag, back).await
    }

    /// Gives the prefetch slot back (our accounting is the window), and keeps the unacked
    /// record's time fresh: kombu lets a message held past `visibility_timeout` be restored to
    /// another worker, which then holds (and later runs) it too.
    async fn hold(&self, max: u16) -> bool {
        let keep = CancellationToken::new();
        *self.keeping.lock().expect("keeping lock") = Some(keep.clone().drop_guard());
        let mut connection = self.connection.clone();
        let tag = self.tag.clone();
        // Well within the timeout, so no restorer finds the record old between two refreshes.
        let every = Duration::from_millis(
            self.holding
                .visibility_timeout
                .saturating_mul(250)
                .clamp(100, 60_000),
        );
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                tokio::select! {
                    () = keep.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                let fresh = redis::cmd("ZADD")
                    .arg(layout::UNACKED_INDEX)
                    .arg("XX")
                    .arg(now_seconds())
                    .arg(&tag)
                    .query_async::<()>(&mut connection)
                    .await;
                if let Err(error) = fresh {
                    tracing::warn!(%tag, %error, "cannot keep a held message's unacked record fresh");
                }
            }
        });
        let outside = &self.holding.outside;
        let widened = outside
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (u32::from(self.holding.prefetch) + u32::from(n) < u32::from(max)).then(|| n + 1)
            })
            .is_ok();
        if widened {
            drop(self.slot.lock().expect("slot lock").take());
        }
        widened
    }

    /// Stops the refresh only: a message once outside the window stays outside (counted in
    /// `outside`) until settled, so messages due together cannot pull in more behind them.
    async fn unhold(&self, _widened: bool) {
        drop(self.keeping.lock().expect("keeping lock").take());
    }
}

impl Drop for RedisAcker {
    fn drop(&mut self) {
        let slot = self.slot.get_mut().map(|slot| slot.is_none());
        if slot.unwrap_or(false) {
            self.holding.outside.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Drops the unacked record of `tag`, pushing the message back to the tail of `list` if asked.
async fn forget(
    connection: &MultiplexedConnection,
    tag: &str,
    back: Option<(&str, &[u8])>,
) -> Result<()> {
    let mut pipe = redis::pipe();
    pipe.atomic()
        .zrem(layout::UNACKED_INDEX, tag)
        .hdel(layout::UNACKED, tag);
    if let Some((list, raw)) = back {
        pipe.lpush(list, raw);
    }
    pipe.query_async::<()>(&mut connection.clone()).await?;
    Ok(())
}

/// The settlement of a message that was never recorded: only its prefetch slot is given back.
struct Dropped {
    _slot: OwnedSemaphorePermit,
}

#[async_trait]
impl Acker for Dropped {
    async fn ack(self: Box<Self>) -> Result<()> {
        Ok(())
    }

    async fn reject(self: Box<Self>, _requeue: bool) -> Result<()> {
        Ok(())
    }
}
