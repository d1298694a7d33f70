//! The confirmations of messages a client sent without waiting for them, awaited in the
//! background. At most a set number wait at once, so a sender faster than the broker waits for
//! it rather than holding ever more messages in memory. A message the broker did not take is
//! told on its own handle and kept for the next [`Unconfirmed::flush`], so no refusal goes
//! unreported when the handle is dropped.

use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::broker::Confirmation;
use crate::error::{Error, Refused, Result};

/// Room for one more unconfirmed message, taken before it is sent and held until its
/// confirmation is in.
pub struct Slot {
    _held: OwnedSemaphorePermit,
}

/// The confirmations being awaited, and the refusals no flush reported yet.
pub struct Unconfirmed {
    slots: Arc<Semaphore>,
    max: u32,
    refused: Mutex<Vec<Refused>>,
}

impl Unconfirmed {
    /// Awaits at most `max` confirmations at once.
    pub fn new(max: u32) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max as usize)),
            max,
            refused: Mutex::default(),
        }
    }

    /// Waits until fewer than the most allowed are unconfirmed (and for a flush begun before).
    pub async fn slot(&self) -> Slot {
        let permit = self.slots.clone().acquire_owned().await;
        Slot {
            _held: permit.expect("the slots are never closed"),
        }
    }

    /// Awaits `confirmation` of task `task_id`, sent in `slot`, in the background; the slot is
    /// free again once it is in. Returns the handle its outcome comes to.
    pub fn watch(
        self: &Arc<Self>,
        slot: Slot,
        task_id: String,
        confirmation: Confirmation,
    ) -> Confirmation {
        let (tell, told) = oneshot::channel();
        let unconfirmed = self.clone();
        let id = task_id.clone();
        tokio::spawn(async move {
            let outcome = confirmation.await;
            if let Err(error) = &outcome {
                tracing::warn!(task = %task_id, %error, "the broker did not take a task sent");
                let refused = Refused {
                    task_id,
                    reason: error.to_string(),
                };
                unconfirmed
                    .refused
                    .lock()
                    .expect("refused lock")
                    .push(refused);
            }
            // Freed only once the refusal is on record, so a flush that gets every slot sees it.
            drop(slot);
            // Nobody may be waiting on the handle: the flush reports it then.
            let _ = tell.send(outcome);
        });
        // The runtime shutting down drops the watch: the message's fate is then unknown.
        Confirmation::of(async move { told.await.unwrap_or(Err(Error::NotConfirmed(id))) })
    }

    /// Waits for every confirmation awaited when it is called (sends after it wait for it),
    /// then reports the messages the broker did not take since the last flush.
    pub async fn flush(&self) -> Result<()> {
        let all = self.slots.acquire_many(self.max).await;
        drop(all.expect("the slots are never closed"));
        let refused = std::mem::take(&mut *self.refused.lock().expect("refused lock"));
        match refused.is_empty() {
            true => Ok(()),
            false => Err(Error::Unconfirmed(refused)),
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    /// A confirmation that resolves when the test says so.
    fn pending() -> (oneshot::Sender<Result<()>>, Confirmation) {
        let (answer, answered) = oneshot::channel();
        let confirmation =
            Confirmation::of(async move { answered.await.expect("the test answers") });
        (answer, confirmation)
    }

    #[tokio::test]
    async fn no_more_than_the_most_allowed_wait_at_once() {
        let unconfirmed = Arc::new(Unconfirmed::new(2));
        let (first, confirmation) = pending();
        let first_handle = unconfirmed.watch(unconfirmed.slot().await, "a".into(), confirmation);
        let (_second, confirmation) = pending();
        let _second_handle = unconfirmed.watch(unconfirmed.slot().await, "b".into(), confirmation);
        let mut third = Box::pin(unconfirmed.slot());
        assert!(
            (&mut third).now_or_never().is_none(),
            "a third slot while two wait"
        );
        first.send(Ok(())).unwrap();
        first_handle.await.unwrap();
        third.await;
    }

    #[tokio::test]
    async fn a_refusal_comes_to_its_handle_and_to_the_next_flush_only() {
        let unconfirmed = Arc::new(Unconfirmed::new(4));
        let refused = Confirmation::of(async { Err(Error::NotConfirmed("a".into())) });
        let handle = unconfirmed.watch(unconfirmed.slot().await, "a".into(), refused);
        let taken = unconfirmed.watch(unconfirmed.slot().await, "b".into(), Confirmation::taken());
        assert!(matches!(handle.await, Err(Error::NotConfirmed(id)) if id == "a"));
        taken.await.unwrap();
        match unconfirmed.flush().await {
            Err(Error::Unconfirmed(refused)) => {
                assert_eq!(
                    refused
                        .iter()
                        .map(|r| r.task_id.as_str())
                        .collect::<Vec<_>>(),
                    ["a"]
                );
            }
            other => panic!("flush answered {other:?}"),
        }
        unconfirmed.flush().await.unwrap();
    }

    #[tokio::test]
    async fn a_flush_waits_for_every_confirmation_sent_before_it() {
        let unconfirmed = Arc::new(Unconfirmed::new(4));
        let (answer, confirmation) = pending();
        // The handle is dropped: the flush alone hears of the outcome.
        drop(unconfirmed.watch(unconfirmed.slot().await, "a".into(), confirmation));
        let mut flush = Box::pin(unconfirmed.flush());
        assert!(
            (&mut flush).now_or_never().is_none(),
            "flushed before the confirm"
        );
        answer.send(Err(Error::ConnectionLost)).unwrap();
        assert!(matches!(flush.await, Err(Error::Unconfirmed(r)) if r[0].task_id == "a"));
    }
}
