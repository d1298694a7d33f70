//! A message taken from a Redis queue and how it is settled, as kombu's Redis transport does
//! it: an ack drops its `unacked` record (the acks of a connection coalesced, many records in one
//! transaction), a reject drops it and may push the message back. Until
//! then its record is kept fresh by its [`Lease`], so no visibility timeout restores it, and a
//! message held for its ETA waits outside its consumer's prefetch window.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use redis::RedisError;
use tokio::sync::OwnedSemaphorePermit;

use super::layout;
use super::lease::{Lease, Leases};
use crate::broker::arrival::Arrival;
use crate::broker::coalesce::{Coalesced, Gathering, Writer};
use crate::broker::{Acker, Delivery, Settle};
use crate::error::Result;
use crate::protocol::envelope;
use crate::sentinel::Following;

/// The delivery of a message [`POP_AND_RECORD`] took from `list`, holding prefetch `slot`,
/// its record renewed by `leases` until it is settled over the connection of `acks` (one that
/// reconnects and follows the Sentinel master: a task that outlives its consumer's connection
/// is still acked, not run again).
pub(super) fn delivery(
    acks: &Arc<Acks>,
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
                acks: acks.clone(),
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
    acks: Arc<Acks>,
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
        self.drop_record().await
    }

    async fn reject(self: Box<Self>, again: bool) -> Result<()> {
        if !again {
            return self.drop_record().await;
        }
        // Marked as kombu marks what it requeues, so the next run sees `redelivered`.
        let marked = layout::requeued(&self.raw).map(String::into_bytes);
        let raw = marked.as_deref().unwrap_or(&self.raw);
        requeue(&self.acks.writer().connection, &self.tag, &self.list, raw).await
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

impl RedisAcker {
    /// Drops the message's `unacked` record with the other acks of its connection. The lease
    /// lives until then, since this acker does.
    async fn drop_record(&self) -> Result<()> {
        let written = self.acks.give(self.tag.clone()).await;
        written.map_err(|error| {
            RedisError::from((error.kind(), "ack failed", error.to_string())).into()
        })
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

/// The acks of one connection's consumers: the `unacked` records of acked messages, dropped
/// many in one transaction (see [`Coalesced`]).
pub(super) type Acks = Coalesced<DropRecords>;

impl Gathering for Vec<String> {
    type Item = String;
    type Batch = Vec<String>;

    fn add(&mut self, tag: String) {
        self.push(tag);
    }

    fn take(&mut self) -> Vec<String> {
        std::mem::take(self)
    }
}

/// Drops the `unacked` records of a batch of tags over `connection`.
pub(super) struct DropRecords {
    pub(super) connection: Following,
}

#[async_trait]
impl Writer for DropRecords {
    type Gathering = Vec<String>;
    type Error = Arc<RedisError>;

    /// A drop that failed with its connection is sent once more, over the connection made
    /// again: dropping a record twice is harmless and a record left behind is a run repeated.
    async fn write(&self, tags: Vec<String>) -> std::result::Result<(), Arc<RedisError>> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zrem(layout::UNACKED_INDEX, &tags)
            .hdel(layout::UNACKED, &tags);
        let first = pipe.query_async::<()>(&mut self.connection.clone()).await;
        match first {
            Err(error) if error.is_unrecoverable_error() => {
                tracing::warn!(tags = tags.len(), %error, "settling again over a new connection");
                pipe.query_async::<()>(&mut self.connection.clone()).await
            }
            settled => settled,
        }
        .map_err(Arc::new)
    }

    fn abandoned() -> Arc<RedisError> {
        Arc::new(RedisError::from((
            redis::ErrorKind::IoError,
            "the writer of acks stopped",
        )))
    }
}

/// Drops the unacked record of `tag` and pushes `raw` back to the tail of `list`, in one
/// transaction sent once: one the server took before the connection broke would run twice.
async fn requeue(connection: &Following, tag: &str, list: &str, raw: &[u8]) -> Result<()> {
    redis::pipe()
        .atomic()
        .zrem(layout::UNACKED_INDEX, tag)
        .hdel(layout::UNACKED, tag)
        .lpush(list, raw)
        .query_async::<()>(&mut connection.clone())
        .await?;
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
