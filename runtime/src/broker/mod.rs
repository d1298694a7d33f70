//! One interface over the brokers Celery speaks: RabbitMQ ([`amqp`]) and Redis ([`redis`]).
//!
//! A [`Broker`] publishes a [`Message`] to a queue, either returning once the broker has it or
//! returning once it is sent, with its [`Confirmation`] to await apart ([`confirmation`]), and
//! hands out [`Delivery`]s from a set of queues, at most `prefetch` unsettled at a time. Each
//! delivery is settled exactly once, by [`Settle::ack`] or [`Settle::reject`]. A connect walks
//! `broker_url`'s failover list ([`failover`]) until a broker answers.

pub mod amqp;
pub mod arrival;
mod coalesce;
pub mod confirmation;
pub mod declaration;
pub mod delayed;
pub mod failover;
pub mod redis;
pub mod remembered;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::config::{CeleryConfig, FailoverStrategy, SslOptions, TransportOptions};
use crate::error::{Error, Result};
use crate::protocol::{DecodeError, Message};
use crate::urls::redact_url;
pub use crate::urls::BrokerKind;
pub use confirmation::Confirmation;
use declaration::Topology;

pub use crate::protocol::queue_name::{queue_name_problem, MAX_NAME_BYTES, QUEUE_NAME_PUNCTUATION};

/// A message taken from a queue and not yet settled.
pub struct Delivery {
    /// The message, or why it could not be read.
    pub message: std::result::Result<Message, DecodeError>,
    /// The queue it came from.
    pub queue: String,
    /// Whether the broker delivered it before (it was given back unsettled or requeued).
    pub redelivered: bool,
    /// The broker's handle for it, for logs.
    pub tag: String,
    /// Settles it with the broker.
    pub settle: Settle,
    /// Its place among what its connection received, held until the worker has taken it in.
    pub arrival: arrival::Arrival,
}

/// A message of a [`Broker::subscribe`] subscription.
#[derive(Debug)]
pub struct Broadcast {
    /// The message.
    pub message: Message,
    /// Its place among what its connection received, to answer it only after the task
    /// deliveries that came before it.
    pub arrived: arrival::Mark,
}

/// Broker-specific settlement of one delivery.
#[async_trait]
pub trait Acker: Send + Sync {
    /// The message is done with; the broker forgets it.
    async fn ack(self: Box<Self>) -> Result<()>;
    /// The message is refused; with `requeue` it goes back to its queue.
    async fn reject(self: Box<Self>, requeue: bool) -> Result<()>;
    /// The message waits for its ETA: its consumer may take one more message in its place
    /// while its window stays at most `max` (`true` when it did), and the broker must not give
    /// it to another consumer meanwhile.
    async fn hold(&self, _max: u16) -> bool {
        false
    }
    /// The message no longer waits; `widened` is what [`Acker::hold`] answered.
    async fn unhold(&self, _widened: bool) {}
}

/// Settles one delivery; consumed by use so a delivery cannot be settled twice.
pub struct Settle {
    acker: Box<dyn Acker>,
    /// Held for an ETA (and whether that widened the window), until [`Settle::unhold`].
    held: Option<bool>,
}

impl Settle {
    /// Wraps a broker's acker.
    pub fn new(acker: impl Acker + 'static) -> Self {
        Self {
            acker: Box::new(acker),
            held: None,
        }
    }

    /// The message waits for its ETA outside its consumer's prefetch window, as Celery raises
    /// its QoS by one per ETA task, while the window stays at most `max` messages.
    pub async fn hold(&mut self, max: u16) {
        if self.held.is_none() {
            self.held = Some(self.acker.hold(max).await);
        }
    }

    /// The message is due (or settled): it counts in its consumer's window again.
    pub async fn unhold(&mut self) {
        if let Some(widened) = self.held.take() {
            self.acker.unhold(widened).await;
        }
    }

    /// Acknowledges the delivery.
    pub async fn ack(mut self) -> Result<()> {
        self.unhold().await;
        self.acker.ack().await
    }

    /// Rejects the delivery, putting it back on its queue when `requeue`.
    pub async fn reject(mut self, requeue: bool) -> Result<()> {
        self.unhold().await;
        self.acker.reject(requeue).await
    }
}

/// How an exchange routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    /// To queues bound with the routing key (on Redis: the binding table).
    Direct,
    /// To queues whose binding pattern matches (on Redis: treated as fanout, as Celery does).
    Topic,
    /// To every bound queue (on Redis: PUB/SUB).
    Fanout,
}

/// An exchange of Celery's monitoring and control traffic, declared as Celery declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    /// Its name.
    pub name: &'static str,
    /// How it routes.
    pub kind: ExchangeKind,
    /// Whether it survives a broker restart.
    pub durable: bool,
}

impl Exchange {
    /// `celeryev`: events for Flower and `celery events`.
    pub const EVENTS: Self = Self {
        name: "celeryev",
        kind: ExchangeKind::Topic,
        durable: true,
    };
    /// `celery.pidbox`: remote-control requests to workers.
    pub const CONTROL: Self = Self {
        name: "celery.pidbox",
        kind: ExchangeKind::Fanout,
        durable: false,
    };
    /// `reply.celery.pidbox`: workers' answers to control requests.
    pub const REPLY: Self = Self {
        name: "reply.celery.pidbox",
        kind: ExchangeKind::Direct,
        durable: false,
    };
}

/// The private queue of a broadcast subscriber (AMQP: exclusive, auto-delete, with expiries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Queue name, e.g. `<hostname>.celery.pidbox`.
    pub queue: String,
    /// `x-expires`: the queue goes this long after its consumer.
    pub expires_ms: u32,
    /// `x-message-ttl`: messages older than this are dropped.
    pub message_ttl_ms: u32,
}

/// A queue of its own name shared by every subscriber of that name, which outlives them for a
/// while (AMQP: durable, `x-expires`): a monitor's replicas share it, and what is routed to it
/// while none runs waits there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedSubscription {
    /// Queue name, e.g. `celeryev.monitor`.
    pub queue: String,
    /// `x-expires`: the queue and what it holds go this long after its last subscriber.
    pub expires_ms: u32,
}

/// How full a queue is, as far as the broker tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct QueueDepth {
    /// Messages waiting to be delivered.
    pub ready: u64,
    /// Messages delivered and not yet acknowledged; `None` where the broker does not tell
    /// (AMQP without the management API).
    pub unacked: Option<u64>,
    /// Consumers attached; `None` where the broker does not know (Redis).
    pub consumers: Option<u64>,
}

/// A message broker as Celery uses it.
#[async_trait]
pub trait Broker: Send + Sync {
    /// Publishes `message` to `queue` and returns once the broker has taken it.
    async fn publish(&self, queue: &str, message: &Message) -> Result<()> {
        self.send(queue, message).await?.await
    }

    /// Publishes `message` to `queue` and returns once it is on its way, after every message
    /// sent before it on this connection, with the broker's confirmation to await. RabbitMQ
    /// confirms later (publisher confirms, in order); on Redis the push's reply is the
    /// confirmation, and it has come when this returns. A caller that does not await each
    /// confirmation before its next send bounds how many it holds.
    async fn send(&self, queue: &str, message: &Message) -> Result<Confirmation>;

    /// Starts consuming `queues`; deliveries arrive on the channel, at most `prefetch` unsettled.
    /// The channel closes when the connection is lost.
    async fn consume(&self, queues: &[String], prefetch: u16) -> Result<mpsc::Receiver<Delivery>>;

    /// Publishes a transient message to `exchange` with `routing_key` (events, control traffic);
    /// no confirmation is awaited.
    async fn publish_to(
        &self,
        exchange: &Exchange,
        routing_key: &str,
        message: &Message,
    ) -> Result<()>;

    /// Publishes `messages`, each with its routing key, to `exchange` in order, as
    /// [`Broker::publish_to`] publishes one; a broker that can sends them in one round trip.
    async fn publish_all_to(
        &self,
        exchange: &Exchange,
        messages: &[(String, Message)],
    ) -> Result<()> {
        for (routing_key, message) in messages {
            self.publish_to(exchange, routing_key, message).await?;
        }
        Ok(())
    }

    /// Receives what `exchange` routes with `binding_key` to the private queue `subscription`.
    /// Messages need no ack; the channel closes when the connection is lost.
    async fn subscribe(
        &self,
        exchange: &Exchange,
        binding_key: &str,
        subscription: &Subscription,
    ) -> Result<mpsc::Receiver<Broadcast>>;

    /// Receives what `exchange` routes with `binding_key` on the named queue `subscription`, at
    /// most `prefetch` unsettled, each delivery settled as a task's is (acked once handled, so
    /// a subscriber that stops or dies loses nothing). RabbitMQ gives each message to one of the
    /// queue's subscribers and keeps the queue, and what is routed to it, for `expires_ms` after
    /// the last one left. Redis has PUB/SUB only: every subscriber gets every message, settling
    /// does nothing, and what is published while nobody listens is lost.
    async fn subscribe_named(
        &self,
        exchange: &Exchange,
        binding_key: &str,
        subscription: &NamedSubscription,
        prefetch: u16,
    ) -> Result<mpsc::Receiver<Delivery>>;

    /// Whether the connection is usable (for health checks).
    async fn check(&self) -> Result<()>;

    /// How `queue` was found declared when it was first used here (RabbitMQ); `None` where
    /// the broker has no such notion (Redis) or the queue was not used yet.
    fn declaration(&self, _queue: &str) -> Option<declaration::Declaration> {
        None
    }

    /// How full `queue` is; `None` when the broker has no such queue.
    async fn depth(&self, queue: &str) -> Result<Option<QueueDepth>>;

    /// Whether `queue` exists, so that publishing to it creates nothing
    /// (`task_create_missing_queues = false`).
    async fn exists(&self, queue: &str) -> Result<bool> {
        Ok(self.depth(queue).await?.is_some())
    }

    /// Removes `queue` with its messages and its binding (tests, and retiring a queue).
    async fn delete_queue(&self, queue: &str) -> Result<()>;

    /// Closes the connection cleanly; unsettled deliveries go back to their queues.
    async fn close(&self) -> Result<()>;
}

/// Returns a delivery nobody will take (the consumer stopped while it was fetched) to its queue.
pub(crate) async fn give_back(delivery: Delivery) {
    if let Err(error) = delivery.settle.reject(true).await {
        tracing::error!(tag = %delivery.tag, %error, "cannot give back an unwanted message");
    }
}

/// Connects to the broker `url` names, with default transport options (and, for `amqps://`
/// and `rediss://`, the TLS settings of the URL's `ssl_*` parameters only).
pub async fn connect(url: &str) -> Result<Arc<dyn Broker>> {
    connect_with(url, &TransportOptions::default(), None).await
}

/// Connects to the broker `url` names (a failover list is tried round-robin); `ssl` is
/// `broker_use_ssl`. Queues it declares are declared as Celery's defaults have them.
pub async fn connect_with(
    url: &str,
    options: &TransportOptions,
    ssl: Option<&SslOptions>,
) -> Result<Arc<dyn Broker>> {
    walk(
        url,
        FailoverStrategy::default(),
        options,
        ssl,
        Topology::default(),
    )
    .await
}

/// Connects to the broker `config` names, with its transport options and TLS settings,
/// declaring missing queues as configured. The worker, the client and the web app's outbox
/// connect and reconnect through here, so a reconnect lands on a node of the failover list
/// that answers.
pub async fn of(config: &CeleryConfig) -> Result<Arc<dyn Broker>> {
    walk(
        &config.broker_url,
        config.broker_failover_strategy,
        &config.broker_transport_options,
        config.broker_use_ssl.as_ref(),
        Topology::of(config),
    )
    .await
}

/// Tries the URLs of `list` in `strategy`'s order, once each, and keeps the first connection
/// made. The caller's backoff applies only after the whole list failed, as kombu's does.
async fn walk(
    list: &str,
    strategy: FailoverStrategy,
    options: &TransportOptions,
    ssl: Option<&SslOptions>,
    topology: Topology,
) -> Result<Arc<dyn Broker>> {
    let attempts = failover::attempts(list, strategy);
    if attempts.is_empty() {
        return Err(Error::UnsupportedUrl(redact_url(list)));
    }
    let mut refusals = Vec::new();
    for (index, url) in &attempts {
        match connect_declaring(url, options, ssl, topology.clone()).await {
            Ok(broker) => {
                failover::connected(list, *index);
                tracing::info!(url = %redact_url(url), "connected to the broker");
                return Ok(broker);
            }
            // One URL: its own error, as it always was.
            Err(error) if attempts.len() == 1 => return Err(error),
            Err(error) => {
                tracing::warn!(url = %redact_url(url), %error, "broker unreachable; trying the next of the list");
                refusals.push(format!("{} ({error})", redact_url(url)));
            }
        }
    }
    Err(Error::NoBrokerAnswered(refusals.join("; ")))
}

async fn connect_declaring(
    url: &str,
    options: &TransportOptions,
    ssl: Option<&SslOptions>,
    topology: Topology,
) -> Result<Arc<dyn Broker>> {
    Ok(match BrokerKind::of(url)? {
        BrokerKind::Amqp => Arc::new(amqp::AmqpBroker::connect(url, ssl, topology).await?),
        BrokerKind::Redis => Arc::new(redis::RedisBroker::connect(url, options, ssl).await?),
    })
}
