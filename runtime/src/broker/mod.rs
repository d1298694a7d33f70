//! One interface over the brokers Celery speaks: RabbitMQ ([`amqp`]) and Redis ([`redis`]).
//!
//! A [`Broker`] publishes a [`Message`] to a queue (returning only once the broker has it) and
//! hands out [`Delivery`]s from a set of queues, at most `prefetch` unsettled at a time. Each
//! delivery is settled exactly once, by [`Settle::ack`] or [`Settle::reject`].

pub mod amqp;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::config::{SslOptions, TransportOptions};
use crate::error::{Error, Result};
use crate::protocol::{DecodeError, Message};

/// Which transport a URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// `amqp://`, `amqps://`, `pyamqp://`.
    Amqp,
    /// `redis://`, `rediss://`, `sentinel://` (a list of Redis sentinels).
    Redis,
}

impl BrokerKind {
    /// The transport for `url`, or an error naming the (redacted) URL.
    pub fn of(url: &str) -> Result<Self> {
        let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
        match scheme {
            "amqp" | "amqps" | "pyamqp" => Ok(Self::Amqp),
            "redis" | "rediss" | "sentinel" => Ok(Self::Redis),
            _ => Err(Error::UnsupportedUrl(crate::config::redact_url(url))),
        }
    }
}

/// A message taken from a queue and not yet settled.
pub struct Delivery {
    /// The message, or why it could not be read.
    pub message: std::result::Result<Message, DecodeError>,
    /// The queue it came from.
    pub queue: String,
    /// The broker's handle for it, for logs.
    pub tag: String,
    /// Settles it with the broker.
    pub settle: Settle,
}

/// Broker-specific settlement of one delivery.
#[async_trait]
pub trait Acker: Send + Sync {
    /// The message is done with; the broker forgets it.
    async fn ack(self: Box<Self>) -> Result<()>;
    /// The message is refused; with `requeue` it goes back to its queue.
    async fn reject(self: Box<Self>, requeue: bool) -> Result<()>;
}

/// Settles one delivery; consumed by use so a delivery cannot be settled twice.
pub struct Settle(Box<dyn Acker>);

impl Settle {
    /// Wraps a broker's acker.
    pub fn new(acker: impl Acker + 'static) -> Self {
        Self(Box::new(acker))
    }

    /// Acknowledges the delivery.
    pub async fn ack(self) -> Result<()> {
        self.0.ack().await
    }

    /// Rejects the delivery, putting it back on its queue when `requeue`.
    pub async fn reject(self, requeue: bool) -> Result<()> {
        self.0.reject(requeue).await
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
    async fn publish(&self, queue: &str, message: &Message) -> Result<()>;

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

    /// Receives what `exchange` routes with `binding_key` to the private queue `subscription`.
    /// Messages need no ack; the channel closes when the connection is lost.
    async fn subscribe(
        &self,
        exchange: &Exchange,
        binding_key: &str,
        subscription: &Subscription,
    ) -> Result<mpsc::Receiver<Message>>;

    /// Whether the connection is usable (for health checks).
    async fn check(&self) -> Result<()>;

    /// How full `queue` is; `None` when the broker has no such queue.
    async fn depth(&self, queue: &str) -> Result<Option<QueueDepth>>;

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

/// Connects to the broker `url` names; `ssl` is `broker_use_ssl`.
pub async fn connect_with(
    url: &str,
    options: &TransportOptions,
    ssl: Option<&SslOptions>,
) -> Result<Arc<dyn Broker>> {
    Ok(match BrokerKind::of(url)? {
        BrokerKind::Amqp => Arc::new(amqp::AmqpBroker::connect(url, ssl).await?),
        BrokerKind::Redis => Arc::new(redis::RedisBroker::connect(url, options, ssl).await?),
    })
}
