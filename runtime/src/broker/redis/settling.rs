//! A message taken from a Redis queue and how it is settled, as kombu's Redis transport does
//! it: an ack drops its `unacked` record, a reject drops it and may push the message back. Until
//! then its record is kept fresh by its [`Lease`], so no visibility timeout restores it, and a
//! message held for its ETA waits outside its consumer's prefetch window.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::OwnedSemaphorePermit;

use super::layout;
use super::lease::{Lease, Leases};
use crate::broker::arrival::Arrival;
use crate::broker::{Acker, Delivery, Settle};
use crate::error::Result;
use crate::protocol::envelope;
use crate::sentinel::Following;

/// The delivery of a message [`POP_AND_RECORD`] took from `list`, holding prefetch `slot`,
/// its record renewed by `leases` until it is settled over `connection` (one that reconnects
/// and follows the Sentinel master: a task that outlives its consumer's connection is still
/// acked, not run again).
pub(super) fn delivery(
    connection: &Following,
    leases: &Arc<Leases>,
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
                _lease: leases.take(&tag),
                tag,
                list,
                raw,
                slot: std::sync::Mutex::new(Some(slot)),
                holding: holding.clone(),
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
    connection: Following,
    /// Keeps the record fresh until the acker is consumed by its settlement (or dropped); a
    /// renewal racing the settlement cannot bring the record back (see [`super::lease`]).
    _lease: Lease,
    tag: String,
    list: String,
    raw: Vec<u8>,
    /// Held until settled (or until held for an ETA outside the window): the consumer fetches
    /// no more than its prefetch.
    slot: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
    holding: Arc<Holding>,
}

/// What one consumer holds outside its prefetch window.
pub(super) struct Holding {
    pub(super) prefetch: u16,
    /// Messages held for their ETA whose slot was given back.
    pub(super) outside: std::sync::atomic::AtomicU16,
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

    /// Gives the prefetch slot back (our accounting is the window). A message once outside the
    /// window stays outside (counted in `outside`) until settled, so messages due together
    /// cannot pull in more behind them: `unhold` has nothing to do. Its record stays fresh by
    /// its lease, as every held message's does (kombu lets a message held past
    /// `visibility_timeout` be restored to another worker, which then holds and runs it too).
    async fn hold(&self, max: u16) -> bool {
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
/// A drop alone that failed with its connection is sent once more, over the connection made
/// again: dropping a record twice is harmless and a record left behind is a run repeated. A
/// push back is sent once, since one the server took before the connection broke would run twice.
async fn forget(connection: &Following, tag: &str, back: Option<(&str, &[u8])>) -> Result<()> {
    let mut pipe = redis::pipe();
    pipe.atomic()
        .zrem(layout::UNACKED_INDEX, tag)
        .hdel(layout::UNACKED, tag);
    if let Some((list, raw)) = back {
        pipe.lpush(list, raw);
    }
    let first = pipe.query_async::<()>(&mut connection.clone()).await;
    match first {
        Err(error) if back.is_none() && error.is_unrecoverable_error() => {
            tracing::warn!(%tag, %error, "settling again over a new connection");
            pipe.query_async::<()>(&mut connection.clone()).await?;
        }
        settled => settled?,
    }
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
