//! Leases on the messages a Redis connection's consumers hold: delivered and not yet settled
//! (prefetched, held for an ETA, or running with `task_acks_late`).
//!
//! Any kombu consumer, Python's or ours, restores an `unacked` record whose `unacked_index`
//! score (the time it was taken) is older than its `visibility_timeout`: that is how a dead
//! worker's messages come back, and also how a live worker's long task used to run a second
//! time. So while a message is held, its score is moved forward: one renewer per connection
//! scores every held tag with the current time in one round trip, at an interval well within
//! the timeout, over the connection settlements use, which is made again when lost and follows
//! a Sentinel failover to the new master. When the process dies, renewal stops and the restore
//! works as before.
//!
//! `ZADD XX` only updates members that exist: a tag settled (or restored) between the renewer's
//! snapshot and its write is not recorded again, so a renewal cannot resurrect a settled
//! message.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{layout, now_seconds};
use crate::sentinel::Following;

/// Tags renewed per `ZADD`; a renewal sends them all in one pipeline.
const TAGS_PER_COMMAND: usize = 1_000;

/// The tags a connection's consumers hold, renewed until settled.
#[derive(Default)]
pub(super) struct Leases {
    held: Mutex<HashSet<String>>,
}

impl Leases {
    /// Renews `tag` until the returned lease is dropped (its message settled or let go).
    pub(super) fn take(self: &Arc<Self>, tag: &str) -> Lease {
        self.held
            .lock()
            .expect("leases lock")
            .insert(tag.to_string());
        Lease {
            leases: self.clone(),
            tag: tag.to_string(),
        }
    }

    fn snapshot(&self) -> Vec<String> {
        self.held
            .lock()
            .expect("leases lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Scores every held tag with the current time, in one round trip; returns how many.
    async fn renew(&self, connection: &Following) -> redis::RedisResult<usize> {
        let tags = self.snapshot();
        if tags.is_empty() {
            return Ok(0);
        }
        let now = now_seconds();
        let mut pipe = redis::pipe();
        for chunk in tags.chunks(TAGS_PER_COMMAND) {
            let command = pipe.cmd("ZADD").arg(layout::UNACKED_INDEX).arg("XX");
            for tag in chunk {
                command.arg(now).arg(tag);
            }
            command.ignore();
        }
        pipe.query_async::<()>(&mut connection.clone()).await?;
        Ok(tags.len())
    }
}

/// One held message's claim on renewal; dropping it stops renewing the tag.
pub(super) struct Lease {
    leases: Arc<Leases>,
    tag: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.leases
            .held
            .lock()
            .expect("leases lock")
            .remove(&self.tag);
    }
}

/// How often leases are renewed for `visibility_timeout` seconds: a quarter of it, so that three
/// renewals in a row may be late or fail before a restorer sees the record as abandoned; at
/// most once a minute (the default timeout is an hour) and at least every 100 ms.
pub(super) fn renew_every(visibility_timeout: u64) -> Duration {
    Duration::from_millis(visibility_timeout.saturating_mul(250))
        .clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// Renews `leases` on `connection` every [`renew_every`] until `closing` is cancelled.
pub(super) async fn keep_renewing(
    leases: Arc<Leases>,
    connection: Following,
    visibility_timeout: u64,
    closing: CancellationToken,
) {
    let mut ticks = tokio::time::interval(renew_every(visibility_timeout));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = closing.cancelled() => break,
            _ = ticks.tick() => {}
        }
        match leases.renew(&connection).await {
            Ok(renewed) => tracing::trace!(renewed, "renewed the leases of held messages"),
            Err(error) => tracing::warn!(
                %error,
                "cannot renew the leases of held messages: past visibility_timeout another \
                 consumer may restore them"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_renewed_until_dropped() {
        let leases = Arc::new(Leases::default());
        let first = leases.take("a");
        let second = leases.take("b");
        let mut held = leases.snapshot();
        held.sort();
        assert_eq!(held, ["a", "b"]);
        drop(first);
        assert_eq!(leases.snapshot(), ["b"]);
        drop(second);
        assert!(leases.snapshot().is_empty());
    }

    #[test]
    fn renewals_come_well_within_the_timeout() {
        assert_eq!(renew_every(5), Duration::from_millis(1_250));
        assert_eq!(renew_every(3600), Duration::from_secs(60));
        assert_eq!(renew_every(0), Duration::from_millis(100));
        assert_eq!(renew_every(u64::MAX), Duration::from_secs(60));
    }
}
