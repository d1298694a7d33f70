//! The consuming side of a channel: each delivery handed on to the worker, in its place in the
//! connection's arrival order, settled through the channel's coalesced [`Acks`], and the
//! channel's prefetch window, widened while messages wait for their ETA.

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::Channel;
use tokio::sync::{mpsc, Mutex};

use super::acks::{Acks, Decision, Frames};
use crate::broker::arrival::Arrivals;
use crate::broker::{Acker, Delivery, Settle};
use crate::error::Result;
use crate::protocol::amqp::message_of;

/// A consumer of `queue` on `channel`, with a tag of the server's choosing.
pub(super) async fn consume(channel: &Channel, queue: &str) -> lapin::Result<lapin::Consumer> {
    channel
        .basic_consume(
            queue,
            "",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// The deliveries of `consumer`, each with what `place` gave it as lapin read it off the
/// socket (on lapin's I/O loop, so in the order the connection received them, whichever
/// consumer they are for); the stream ends when the consumer does (cancelled, or after an
/// error, its connection lost).
pub(super) fn in_arrival_order<P: Send + 'static>(
    consumer: &lapin::Consumer,
    place: impl Fn(&lapin::message::Delivery) -> P + Send + Sync + 'static,
) -> impl futures::Stream<Item = lapin::Result<(lapin::message::Delivery, P)>> {
    let (sender, receiver) = mpsc::unbounded_channel();
    consumer.set_delegate(move |next: lapin::message::DeliveryResult| {
        // lapin keeps the delegate, so its sender, alive: the end is sent as `None`.
        let _ = sender.send(
            next.map(|delivery| {
                delivery.map(|d| {
                    let placed = place(&d);
                    (d, placed)
                })
            })
            .transpose(),
        );
        std::future::ready(())
    });
    futures::stream::unfold(receiver, |mut receiver| async move {
        let arrived = receiver.recv().await.flatten()?;
        Some((arrived, receiver))
    })
}

/// Hands each delivery of `consumer` to `sender` until the consumer ends (cancelled, or its
/// connection lost).
pub(super) async fn forward(
    consumer: lapin::Consumer,
    queue: String,
    window: Arc<Window>,
    sender: mpsc::Sender<Delivery>,
) {
    let arrivals = window.arrivals.clone();
    let acks = window.acks.clone();
    let deliveries = in_arrival_order(&consumer, move |delivery| {
        acks.gathered(|ledger| ledger.delivered(delivery.delivery_tag));
        arrivals.task()
    });
    tokio::pin!(deliveries);
    while let Some(next) = deliveries.next().await {
        let (delivery, arrival) = match next {
            Ok(arrived) => arrived,
            Err(error) => {
                tracing::error!(%queue, %error, "AMQP consumer failed");
                break;
            }
        };
        let delivery = Delivery {
            message: message_of(&delivery.properties, delivery.data),
            queue: queue.clone(),
            redelivered: delivery.redelivered,
            tag: delivery.delivery_tag.to_string(),
            settle: Settle::new(AmqpAcker {
                tag: delivery.delivery_tag,
                window: window.clone(),
            }),
            arrival,
        };
        // After a cancel the stream ends once what was prefetched is given back.
        if let Err(mpsc::error::SendError(unwanted)) = sender.send(delivery).await {
            crate::broker::give_back(unwanted).await;
        }
    }
}

struct AmqpAcker {
    tag: u64,
    /// Also keeps the channel open while the delivery is unsettled: a closed channel requeues
    /// all it held, so a task that finishes after its consumer was cancelled (a warm shutdown
    /// with `task_acks_late`) could not be acked and would run again.
    window: Arc<Window>,
}

impl AmqpAcker {
    /// Settles the delivery as decided, once the frame that says so is written.
    async fn settle(&self, decision: Decision) -> Result<()> {
        Ok(self.window.acks.give((self.tag, decision)).await?)
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.settle(Decision::Ack).await
    }

    async fn reject(self: Box<Self>, requeue: bool) -> Result<()> {
        self.settle(Decision::Reject { requeue }).await
    }

    async fn hold(&self, max: u16) -> bool {
        self.window.widen(max).await
    }

    async fn unhold(&self, widened: bool) {
        if widened {
            self.window.narrow().await;
        }
    }
}

/// The prefetch window of one consuming channel, widened by one for each message held for its
/// ETA, as Celery raises its QoS. RabbitMQ applies a new global prefetch count at once, but a
/// new per-consumer one only to consumers made after it: so with per-consumer QoS (one queue,
/// the worker's way, and any quorum queue) each widening is one more consumer of the queue
/// with a prefetch of one, cancelled when the held message is due.
pub(super) struct Window {
    channel: Channel,
    /// Where its connection's deliveries take their places.
    arrivals: Arc<Arrivals>,
    /// The acknowledgements of its channel, for every consumer on it.
    acks: Arc<Acks>,
    /// The queue extra consumers take from (the first, when a quorum queue is one of several);
    /// `None` with global QoS.
    queue: Option<String>,
    /// Weak, so that a lost connection still ends the receiver while messages are held.
    sender: mpsc::WeakSender<Delivery>,
    held: Mutex<Held>,
}

struct Held {
    /// The prefetch count asked for; 0 is RabbitMQ's "no limit", which never widens.
    prefetch: u16,
    /// With global QoS, one empty tag per widening; else the tags of the extra consumers.
    extras: Vec<ShortString>,
}

impl Window {
    /// The window of `channel`, at `prefetch`, whose extra consumers (per-consumer QoS) take
    /// from `queue` and send to `sender`.
    pub(super) fn new(
        channel: Channel,
        arrivals: Arc<Arrivals>,
        queue: Option<String>,
        sender: &mpsc::Sender<Delivery>,
        prefetch: u16,
    ) -> Arc<Self> {
        Arc::new(Self {
            acks: Acks::new(Frames(channel.clone())),
            channel,
            arrivals,
            queue,
            sender: sender.downgrade(),
            held: Mutex::new(Held {
                prefetch,
                extras: Vec::new(),
            }),
        })
    }

    /// The tags of every widening, which the window no longer holds: for cancelling them all.
    pub(super) async fn take_extras(&self) -> Vec<ShortString> {
        std::mem::take(&mut self.held.lock().await.extras)
    }

    /// Lets one more message in while the window stays at most `max`; `true` when it did.
    async fn widen(self: &Arc<Self>, max: u16) -> bool {
        let mut held = self.held.lock().await;
        let size = usize::from(held.prefetch) + held.extras.len();
        if held.prefetch == 0 || size >= usize::from(max) {
            return false;
        }
        let widened = match &self.queue {
            None => self
                .set_global(size + 1)
                .await
                .map(|()| ShortString::from("")),
            Some(queue) => self.add_consumer(queue).await,
        };
        match widened {
            Ok(tag) => {
                held.extras.push(tag);
                true
            }
            Err(error) => {
                tracing::warn!(%error, "cannot widen the prefetch window for a held message");
                false
            }
        }
    }

    /// Undoes one [`Window::widen`].
    async fn narrow(&self) {
        let mut held = self.held.lock().await;
        let Some(tag) = held.extras.pop() else {
            return;
        };
        let narrowed = match self.queue {
            None => {
                self.set_global(usize::from(held.prefetch) + held.extras.len())
                    .await
            }
            // Its message, if it took one, stays unacked on the channel and can be settled.
            Some(_) => {
                self.channel
                    .basic_cancel(tag.as_str(), BasicCancelOptions::default())
                    .await
            }
        };
        if let Err(error) = narrowed {
            tracing::warn!(%error, "cannot narrow the prefetch window");
        }
    }

    async fn set_global(&self, size: usize) -> lapin::Result<()> {
        let size = u16::try_from(size).unwrap_or(u16::MAX);
        self.channel
            .basic_qos(size, BasicQosOptions { global: true })
            .await
    }

    /// One more consumer of `queue` with a prefetch of one, forwarding as the first does.
    async fn add_consumer(self: &Arc<Self>, queue: &str) -> lapin::Result<ShortString> {
        let Some(sender) = self.sender.upgrade() else {
            return Err(lapin::Error::InvalidChannelState(
                lapin::ChannelState::Closing,
            ));
        };
        self.channel
            .basic_qos(1, BasicQosOptions { global: false })
            .await?;
        let consumer = consume(&self.channel, queue).await?;
        let tag = consumer.tag();
        tokio::spawn(forward(consumer, queue.to_string(), self.clone(), sender));
        Ok(tag)
    }
}
