//! The acknowledgements of one consuming channel, coalesced: what the consumer decided for
//! each delivery goes out in as few frames as AMQP allows, one `basic.ack` with `multiple` for
//! every run of acked deliveries that starts at the oldest unsettled one.
//!
//! Each frame costs lapin a hop to its I/O loop and RabbitMQ a method to parse; one per task was
//! a fifth of the worker's CPU. Frames go out by [`Coalesced`] writes: alone when the worker is
//! idle, so no ack waits for a timer, and many at once under load, when decisions pile up while
//! the previous frames are written.
//!
//! `multiple` acks every unsettled delivery up to its tag, so the [`Ledger`] must know every
//! delivery of the channel before anything after it is acked: deliveries are entered on lapin's
//! I/O loop, in the order the server numbered them (see `consuming::in_arrival_order`).

use std::collections::BTreeMap;

use async_trait::async_trait;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::Channel;

use crate::broker::coalesce::{Coalesced, Gathering, Writer};

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
/// decision once it has one. Pure: the frames it plans are written by [`Frames`].
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

impl Gathering for Ledger {
    type Item = (u64, Decision);
    type Batch = Vec<Frame>;

    fn add(&mut self, (tag, decision): (u64, Decision)) {
        self.decide(tag, decision);
    }

    fn take(&mut self) -> Vec<Frame> {
        self.frames()
    }
}

/// The acknowledgements of one channel: decisions entered in its [`Ledger`] as they come, and
/// sent by one write at a time (see [`Coalesced`]).
pub(super) type Acks = Coalesced<Frames>;

/// Writes the frames a [`Ledger`] planned, straight on the channel.
pub(super) struct Frames(pub(super) Channel);

#[async_trait]
impl Writer for Frames {
    type Gathering = Ledger;
    type Error = lapin::Error;

    async fn write(&self, frames: Vec<Frame>) -> Result<(), lapin::Error> {
        for frame in frames {
            match frame {
                Frame::Ack { tag, multiple } => {
                    self.0.basic_ack(tag, BasicAckOptions { multiple }).await?
                }
                Frame::Reject { tag, requeue } => {
                    self.0
                        .basic_reject(tag, BasicRejectOptions { requeue })
                        .await?
                }
            }
        }
        Ok(())
    }

    fn abandoned() -> lapin::Error {
        lapin::Error::InvalidChannelState(lapin::ChannelState::Closed)
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
