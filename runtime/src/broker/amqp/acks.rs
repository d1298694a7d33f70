//! The acknowledgements of one consuming channel, coalesced: what the consumer decided for
//! each delivery goes out in as few frames as AMQP allows, one `basic.ack` with `multiple` for
//! every run of acked deliveries that starts at the oldest unsettled one.
//!
//! Each frame costs lapin a hop to its I/O loop and RabbitMQ a method to parse; one per task was
//! a fifth of the worker's CPU. Frames go out as soon as a flush is free ("natural batching"):
//! alone when the worker is idle, so no ack waits for a timer, and many at once under load,
//! when decisions pile up while the previous frames are written.
//!
//! `multiple` acks every unsettled delivery up to its tag, so the [`Ledger`] must know every
//! delivery of the channel before anything after it is acked: deliveries are entered on lapin's
//! I/O loop, in the order the server numbered them (see `consuming::in_arrival_order`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::Channel;
use tokio::sync::oneshot;

use crate::error::Result;

/// What the consumer decided for one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    Ack,
    Reject { requeue: bool },
}

/// One frame to send, in the order given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Frame {
    Ack { tag: u64, multiple: bool },
    Reject { tag: u64, requeue: bool },
}

/// The deliveries of one channel not yet settled with the server, each with the consumer's
/// decision once it has one. Pure: the frames it plans are sent by [`Acks`].
#[derive(Debug, Default)]
pub(super) struct Ledger {
    unsettled: BTreeMap<u64, Option<Decision>>,
}

impl Ledger {
    /// The server delivered `tag`: nothing after it may be acked with `multiple` until the
    /// consumer decides for it.
    pub(super) fn delivered(&mut self, tag: u64) {
        self.unsettled.insert(tag, None);
    }

    /// The consumer decided for `tag`.
    pub(super) fn decide(&mut self, tag: u64, decision: Decision) {
        self.unsettled.insert(tag, Some(decision));
    }

    /// The frames that say every decision taken so far, which the ledger then forgets: rejects
    /// one by one first, so that what remains unsettled before an ack is only what is still
    /// undecided; then one ack for the run of acked deliveries at the oldest, `multiple` when
    /// it covers more than one; then each ack after an undecided delivery on its own.
    pub(super) fn frames(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        self.unsettled.retain(|&tag, decision| match decision {
            Some(Decision::Reject { requeue }) => {
                frames.push(Frame::Reject {
                    tag,
                    requeue: *requeue,
                });
                false
            }
            _ => true,
        });
        let mut run = 0;
        while let Some(entry) = self.unsettled.first_entry() {
            if *entry.get() != Some(Decision::Ack) {
                break;
            }
            let tag = entry.remove_entry().0;
            run += 1;
            if self.unsettled.first_key_value().map(|(_, d)| *d) != Some(Some(Decision::Ack)) {
                frames.push(Frame::Ack {
                    tag,
                    multiple: run > 1,
                });
            }
        }
        self.unsettled.retain(|&tag, decision| match decision {
            Some(_) => {
                frames.push(Frame::Ack {
                    tag,
                    multiple: false,
                });
                false
            }
            None => true,
        });
        frames
    }
}

/// The acknowledgements of one channel: decisions recorded as they come, sent by one flush at
/// a time, each decider told when the frame that carries its decision was written.
pub(super) struct Acks {
    channel: Channel,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    ledger: Ledger,
    /// Those whose decisions are in the ledger and not yet sent.
    waiting: Vec<oneshot::Sender<std::result::Result<(), lapin::Error>>>,
    /// Whether a flush is running; it takes what is decided meanwhile before it ends.
    flushing: bool,
}

impl Acks {
    pub(super) fn new(channel: Channel) -> Arc<Self> {
        Arc::new(Self {
            channel,
            state: Mutex::default(),
        })
    }

    /// The server delivered `tag`. Called on lapin's I/O loop, before the delivery is handed on.
    pub(super) fn delivered(&self, tag: u64) {
        self.state().ledger.delivered(tag);
    }

    /// Settles `tag` as decided, once the frame that says so is written.
    pub(super) async fn settle(self: &Arc<Self>, tag: u64, decision: Decision) -> Result<()> {
        let (told, outcome) = oneshot::channel();
        let lead = {
            let mut state = self.state();
            state.ledger.decide(tag, decision);
            state.waiting.push(told);
            !std::mem::replace(&mut state.flushing, true)
        };
        if lead {
            // A task of its own: a decider's future may be dropped (a cold shutdown), and the
            // frames it would have sent for the others must still go.
            tokio::spawn(self.clone().flush());
        }
        match outcome.await {
            Ok(written) => Ok(written?),
            Err(_) => Err(lapin::Error::InvalidChannelState(lapin::ChannelState::Closed).into()),
        }
    }

    /// Sends what is decided until nothing is left, then lets the next decider lead.
    async fn flush(self: Arc<Self>) {
        loop {
            let (frames, waiting) = {
                let mut state = self.state();
                if state.waiting.is_empty() {
                    state.flushing = false;
                    return;
                }
                (state.ledger.frames(), std::mem::take(&mut state.waiting))
            };
            let written = self.send(&frames).await;
            for told in waiting {
                let _ = told.send(written.clone());
            }
        }
    }

    async fn send(&self, frames: &[Frame]) -> std::result::Result<(), lapin::Error> {
        for frame in frames {
            match *frame {
                Frame::Ack { tag, multiple } => {
                    self.channel
                        .basic_ack(tag, BasicAckOptions { multiple })
                        .await?
                }
                Frame::Reject { tag, requeue } => {
                    self.channel
                        .basic_reject(tag, BasicRejectOptions { requeue })
                        .await?
                }
            }
        }
        Ok(())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays whole when a holder panics: no holder runs code that can.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(delivered: impl IntoIterator<Item = u64>) -> Ledger {
        let mut ledger = Ledger::default();
        for tag in delivered {
            ledger.delivered(tag);
        }
        ledger
    }

    const ACK: Decision = Decision::Ack;

    #[test]
    fn acks_in_order_go_out_as_one_multiple_ack() {
        let mut ledger = ledger(1..=5);
        for tag in 1..=4 {
            ledger.decide(tag, ACK);
        }
        assert_eq!(
            ledger.frames(),
            [Frame::Ack {
                tag: 4,
                multiple: true
            }]
        );
        ledger.decide(5, ACK);
        assert_eq!(
            ledger.frames(),
            [Frame::Ack {
                tag: 5,
                multiple: false
            }]
        );
        assert!(ledger.frames().is_empty());
    }

    #[test]
    fn an_undecided_delivery_keeps_the_acks_after_it_single() {
        let mut ledger = ledger(1..=5);
        for tag in [1, 2, 4, 5] {
            ledger.decide(tag, ACK);
        }
        assert_eq!(
            ledger.frames(),
            [
                Frame::Ack {
                    tag: 2,
                    multiple: true
                },
                Frame::Ack {
                    tag: 4,
                    multiple: false
                },
                Frame::Ack {
                    tag: 5,
                    multiple: false
                },
            ]
        );
        // 3 is still unsettled, so a later multiple ack must stop before it.
        ledger.delivered(6);
        ledger.decide(6, ACK);
        assert_eq!(
            ledger.frames(),
            [Frame::Ack {
                tag: 6,
                multiple: false
            }]
        );
        ledger.decide(3, ACK);
        assert_eq!(
            ledger.frames(),
            [Frame::Ack {
                tag: 3,
                multiple: false
            }]
        );
    }

    #[test]
    fn a_reject_goes_first_so_a_multiple_ack_around_it_leaves_it_alone() {
        let mut ledger = ledger(1..=3);
        ledger.decide(1, ACK);
        ledger.decide(2, Decision::Reject { requeue: true });
        ledger.decide(3, ACK);
        assert_eq!(
            ledger.frames(),
            [
                Frame::Reject {
                    tag: 2,
                    requeue: true
                },
                Frame::Ack {
                    tag: 3,
                    multiple: true
                },
            ]
        );
    }

    #[test]
    fn nothing_decided_sends_nothing() {
        let mut ledger = ledger(1..=3);
        assert!(ledger.frames().is_empty());
        ledger.decide(2, Decision::Reject { requeue: false });
        assert_eq!(
            ledger.frames(),
            [Frame::Reject {
                tag: 2,
                requeue: false
            }]
        );
        assert!(ledger.frames().is_empty());
    }
}
