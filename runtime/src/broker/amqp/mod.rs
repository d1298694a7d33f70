//! RabbitMQ through lapin, with Celery's topology: durable queues, each bound to a direct exchange
//! of its own name, tasks published to the default exchange with the queue as routing key.
//!
//! [`consuming`] hands deliveries on and settles them, and keeps each channel's prefetch window;
//! [`acks`] coalesces a channel's acknowledgements.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::tcp::{HandshakeResult, RustlsConnector, TcpStream};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{mpsc, Mutex};

mod acks;
mod consuming;

use consuming::{consume, forward, in_arrival_order, Window};

use super::arrival::Arrivals;
use super::declaration::{Declaration, Topology};
use super::delayed::{self, Declare};
use super::remembered::Remembered;
use super::{
    Broadcast, Broker, Confirmation, Delivery, Exchange, NamedSubscription, QueueDepth,
    Subscription,
};
use crate::config::SslOptions;
use crate::error::{Error, Result};
use crate::protocol::amqp::{message_of, properties_of, short};
use crate::protocol::Message;
use crate::urls::{is_tls_url, redact_url};

/// A connection to RabbitMQ with one confirming channel for publishing tasks, and one without
/// confirms for monitoring traffic.
pub struct AmqpBroker {
    connection: Connection,
    publisher: Channel,
    /// Events and control replies: sent, never confirmed. Not the confirming channel, where lapin
    /// keeps every confirmation dropped unawaited until the channel closes (a worker sending
    /// events would grow by one per event).
    announcer: Channel,
    /// Queues declared or found on this connection, as the broker holds them (the most
    /// recently used ones: forgetting one costs a redeclare).
    declared: std::sync::Mutex<Remembered<Declaration>>,
    /// How this connection declares what is missing.
    topology: Topology,
    /// Whether native delayed delivery's topology is in place, made once per connection.
    delay_topology: tokio::sync::OnceCell<bool>,
    declared_exchanges: Mutex<HashSet<&'static str>>,
    /// The order of what every consumer of the connection receives.
    arrivals: Arc<Arrivals>,
}

impl AmqpBroker {
    /// Connects to `url` (`pyamqp://` is read as `amqp://`, as kombu does); `amqps://` over
    /// TLS as `ssl` (`broker_use_ssl`) says. What it declares, it declares as `topology` says.
    pub async fn connect(url: &str, ssl: Option<&SslOptions>, topology: Topology) -> Result<Self> {
        let url = url.strip_prefix("py").unwrap_or(url);
        let properties = ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio);
        let connection = if is_tls_url(url) {
            // lapin's own TLS set-up can add a CA but not turn verification off, so the
            // TLS stream is made here from our rustls configuration.
            let (url, options) = crate::tls::split_url(url, ssl)?;
            let connector = RustlsConnector::from(crate::tls::client_config(&url, &options)?);
            let uri: AMQPUri = url
                .parse()
                .map_err(|e| Error::Config(format!("broker_url {}: {e}", redact_url(&url))))?;
            #[allow(clippy::result_large_err)] // lapin's type, not ours to shrink
            let connect = move |uri: &AMQPUri| tls_stream(uri, &connector);
            Connection::connector(uri, Box::new(connect), properties).await?
        } else {
            Connection::connect(url, properties).await?
        };
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let announcer = connection.create_channel().await?;
        Ok(Self {
            connection,
            publisher,
            announcer,
            declared: std::sync::Mutex::default(),
            topology,
            delay_topology: tokio::sync::OnceCell::new(),
            declared_exchanges: Mutex::new(HashSet::new()),
            arrivals: Arc::default(),
        })
    }

    /// Makes sure `queue` exists, declared as Celery declares it (durable, of the configured
    /// type, bound to an exchange of its own name) when it does not exist yet, and learns how
    /// it is declared when it does: a queue someone else declared is used as it is, whatever
    /// its arguments.
    async fn ensure_queue(&self, queue: &str) -> Result<Declaration> {
        self.ensure_declared(queue, self.topology.declaration(queue))
            .await
    }

    /// Makes sure `queue` exists, declared as `declaration` says when it does not exist yet;
    /// when it does, learns how it is declared and uses it so.
    async fn ensure_declared(&self, queue: &str, declaration: Declaration) -> Result<Declaration> {
        if let Some(known) = self.declaration(queue) {
            return Ok(known);
        }
        short(queue, "a queue name")?;
        let mut declaration = declaration;
        let mut refusals = 0;
        // Each refusal names one difference and closes its channel: a channel per attempt.
        loop {
            match self.declare(queue, &declaration).await {
                Ok(()) => break,
                Err(lapin::Error::ProtocolError(refusal))
                    if *refusal.kind()
                        == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
                        && refusals < MAX_REFUSALS
                        && declaration.learn(refusal.get_message().as_str()) =>
                {
                    refusals += 1;
                }
                Err(error) => return Err(error.into()),
            }
        }
        if refusals > 0 {
            tracing::info!(
                %queue,
                quorum = declaration.is_quorum(),
                arguments = ?declaration.arguments_json(),
                exchange_type = %declaration.exchange_type,
                "queue exists with other arguments; using it as declared"
            );
        }
        if self.topology.delays_natively(&declaration) && self.delay_topology().await {
            self.bind_for_delays(queue, &declaration).await?;
        }
        self.declared
            .lock()
            .expect("declared lock")
            .insert(queue.to_string(), declaration.clone());
        Ok(declaration)
    }

    /// Makes native delayed delivery's exchanges and queues, once per connection (as Celery's
    /// worker does at start, and here also a publisher before its first delayed message, so
    /// that no message is published into a topology nobody made yet). `false` when it cannot
    /// be had: ETA messages then wait in the worker, as on a classic queue.
    async fn delay_topology(&self) -> bool {
        let Some(queue_type) = self.topology.native_delayed_delivery else {
            return false;
        };
        *self
            .delay_topology
            .get_or_init(|| async {
                let made = async {
                    let channel = self.connection.create_channel().await?;
                    for step in delayed::topology(queue_type) {
                        apply(&channel, &step).await?;
                    }
                    let _ = channel.close(200, "declared").await;
                    lapin::Result::Ok(())
                };
                match made.await {
                    Ok(()) => true,
                    Err(error) => {
                        // Someone else's delay queues (of another type) serve as well as ours.
                        let exists = self.exchange_exists(delayed::ENTRY_EXCHANGE).await
                            && self.exchange_exists(delayed::DELIVERY_EXCHANGE).await;
                        tracing::warn!(%error, using_existing = exists, "cannot declare native delayed delivery's queues");
                        exists
                    }
                }
            })
            .await
    }

    /// Binds `queue` (through its exchange) to the end of the delay queues.
    async fn bind_for_delays(&self, queue: &str, declaration: &Declaration) -> Result<()> {
        let channel = self.connection.create_channel().await?;
        for step in delayed::destination(queue, queue, queue) {
            apply(&channel, &step).await?;
        }
        let _ = channel.close(200, "bound").await;
        tracing::debug!(%queue, exchange_type = %declaration.exchange_type, "ETA messages wait in the delay queues");
        Ok(())
    }

    /// Whether `exchange` exists (a passive declare, on a channel of its own).
    async fn exchange_exists(&self, exchange: &str) -> bool {
        let Ok(channel) = self.connection.create_channel().await else {
            return false;
        };
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let exists = channel
            .exchange_declare(
                exchange,
                ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            )
            .await
            .is_ok();
        let _ = channel.close(200, "inspected").await;
        exists
    }

    /// Where `message` for `queue`, declared as `declaration`, is published: through the delay
    /// queues when its ETA is at least a second away and the queue waits there (it was bound to
    /// them when it was ensured, once the delay topology was in place), else straight to it.
    fn route(
        &self,
        queue: &str,
        declaration: &Declaration,
        message: &Message,
    ) -> (&'static str, String) {
        let waits_there =
            self.topology.delays_natively(declaration) && self.delay_topology.get() == Some(&true);
        let delayed = waits_there
            .then(|| message.eta())
            .flatten()
            .and_then(|eta| {
                // Rounded up: delivered at its ETA or just after, never held by a worker.
                let micros = (eta - chrono::Utc::now()).num_microseconds()?;
                let seconds = u64::try_from(micros).ok()?.div_ceil(1_000_000);
                delayed::routing_key(seconds, queue)
            })
            // 56 bytes of delay digits in front of a long queue name may not fit a short
            // string: such a message waits in the worker instead.
            .filter(|key| key.len() <= super::MAX_NAME_BYTES);
        match delayed {
            Some(key) => (delayed::ENTRY_EXCHANGE, key),
            None => ("", queue.to_string()),
        }
    }

    /// Declares `queue`, its exchange and their binding as `declaration` says, on a channel of
    /// its own (a refusal closes it).
    async fn declare(&self, queue: &str, declaration: &Declaration) -> lapin::Result<()> {
        let channel = self.connection.create_channel().await?;
        let options = QueueDeclareOptions {
            durable: declaration.durable,
            auto_delete: declaration.auto_delete,
            ..Default::default()
        };
        channel
            .queue_declare(queue, options, declaration.arguments.clone())
            .await?;
        let exchange = ExchangeDeclareOptions {
            durable: declaration.exchange_durable,
            ..Default::default()
        };
        let kind = match declaration.exchange_type.as_str() {
            "direct" => ExchangeKind::Direct,
            "topic" => ExchangeKind::Topic,
            "fanout" => ExchangeKind::Fanout,
            "headers" => ExchangeKind::Headers,
            other => ExchangeKind::Custom(other.to_string()),
        };
        channel
            .exchange_declare(queue, kind, exchange, FieldTable::default())
            .await?;
        bind(&channel, queue, queue, queue).await?;
        let _ = channel.close(200, "declared").await;
        Ok(())
    }
}

/// Binds `queue` to `exchange` under `key`, with no options or arguments, as every binding we
/// make is.
async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
    let options = QueueBindOptions::default();
    channel
        .queue_bind(queue, exchange, key, options, FieldTable::default())
        .await
}

/// Declares one thing of native delayed delivery's topology.
async fn apply(channel: &Channel, step: &Declare) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let none = FieldTable::default;
    match step {
        Declare::Exchange(name) => {
            channel
                .exchange_declare(name, ExchangeKind::Topic, durable, none())
                .await
        }
        Declare::Queue { name, arguments } => {
            let durable = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            channel
                .queue_declare(name, durable, arguments.clone())
                .await
                .map(drop)
        }
        Declare::BindQueue {
            queue,
            exchange,
            key,
        } => bind(channel, queue, exchange, key).await,
        Declare::BindExchange {
            destination,
            source,
            key,
        } => {
            channel
                .exchange_bind(
                    destination,
                    source,
                    key,
                    ExchangeBindOptions::default(),
                    none(),
                )
                .await
        }
    }
}

/// Differences learnt before a queue's declaration is given up on: more than any queue has
/// arguments.
const MAX_REFUSALS: usize = 32;

/// What lapin's own `amqps://` connect does (connection timeout from the URL), with our
/// connector.
#[allow(clippy::result_large_err)] // lapin's connector type, not ours to shrink
fn tls_stream(uri: &AMQPUri, connector: &RustlsConnector) -> HandshakeResult {
    let address = (uri.authority.host.as_str(), uri.authority.port);
    let stream = match uri.query.connection_timeout {
        Some(ms) => TcpStream::connect_timeout(address, std::time::Duration::from_millis(ms)),
        None => TcpStream::connect(address),
    }?;
    let stream = stream.into_rustls(connector, &uri.authority.host)?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

impl AmqpBroker {
    /// Declares `exchange` once per connection, as Celery declares it (publishing to a missing
    /// exchange would close the channel).
    async fn ensure_exchange(&self, channel: &Channel, exchange: &Exchange) -> Result<()> {
        if self.declared_exchanges.lock().await.contains(exchange.name) {
            return Ok(());
        }
        let kind = match exchange.kind {
            super::ExchangeKind::Direct => ExchangeKind::Direct,
            super::ExchangeKind::Topic => ExchangeKind::Topic,
            super::ExchangeKind::Fanout => ExchangeKind::Fanout,
        };
        let options = ExchangeDeclareOptions {
            durable: exchange.durable,
            ..Default::default()
        };
        channel
            .exchange_declare(exchange.name, kind, options, FieldTable::default())
            .await?;
        self.declared_exchanges.lock().await.insert(exchange.name);
        Ok(())
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn send(&self, queue: &str, message: &Message) -> Result<Confirmation> {
        let declaration = self.ensure_queue(queue).await?;
        let (exchange, routing_key) = self.route(queue, &declaration, message);
        let confirm = self
            .publisher
            .basic_publish(
                exchange,
                &routing_key,
                BasicPublishOptions::default(),
                &message.body,
                properties_of(message)?,
            )
            .await?;
        let id = message.properties.correlation_id.clone();
        Ok(Confirmation::of(async move {
            match confirm.await? {
                confirmed if confirmed.is_nack() => {
                    Err(Error::NotConfirmed(id.unwrap_or_default()))
                }
                _ => Ok(()),
            }
        }))
    }

    async fn consume(&self, queues: &[String], prefetch: u16) -> Result<mpsc::Receiver<Delivery>> {
        let mut quorum = false;
        for queue in queues {
            quorum |= self.ensure_queue(queue).await?.is_quorum();
        }
        let channel = self.connection.create_channel().await?;
        // Global QoS bounds what is held across several queues, as Celery's worker sets it. A
        // quorum queue refuses to be consumed under it (by closing the whole connection), so
        // with one among them the bound is per consumer, as Celery's worker then sets it. With
        // one queue (the worker's way: a channel per queue) the two bounds are the same, and
        // per consumer needs no detection: RabbitMQ 4 can accept a quorum queue's redeclaration
        // without its type (a vhost's default queue type, relaxed checks), hiding what it is.
        let global = !quorum && queues.len() > 1;
        channel
            .basic_qos(prefetch, BasicQosOptions { global })
            .await?;
        let (sender, receiver) = mpsc::channel(usize::from(prefetch).max(1));
        let window = Window::new(
            channel.clone(),
            self.arrivals.clone(),
            (!global).then(|| queues.first().cloned()).flatten(),
            &sender,
            prefetch,
        );
        let mut tags = Vec::new();
        let mut forwarders = tokio::task::JoinSet::new();
        for queue in queues {
            let consumer = consume(&channel, queue).await?;
            tags.push(consumer.tag());
            forwarders.spawn(forward(
                consumer,
                queue.clone(),
                window.clone(),
                sender.clone(),
            ));
        }
        // When the receiver goes, stop the deliveries; the channel stays open so messages
        // already handed out can still be acked. When the connection goes, the forwarders end
        // and this last sender is dropped, so the receiver learns it.
        tokio::spawn(async move {
            tokio::select! {
                () = sender.closed() => {
                    tags.append(&mut window.take_extras().await);
                    for tag in tags {
                        let _ = channel.basic_cancel(tag.as_str(), BasicCancelOptions::default()).await;
                    }
                    // Let them give back what was prefetched (dropping the set would abort them).
                    while forwarders.join_next().await.is_some() {}
                }
                () = async { while forwarders.join_next().await.is_some() {} } => {}
            }
        });
        Ok(receiver)
    }

    async fn publish_to(
        &self,
        exchange: &Exchange,
        routing_key: &str,
        message: &Message,
    ) -> Result<()> {
        // A control reply's routing key is the caller's word, whoever the caller is.
        short(routing_key, "a routing key")?;
        self.ensure_exchange(&self.announcer, exchange).await?;
        // Sent, not confirmed: monitoring traffic must never hold a task up.
        self.announcer
            .basic_publish(
                exchange.name,
                routing_key,
                BasicPublishOptions::default(),
                &message.body,
                properties_of(message)?,
            )
            .await?;
        Ok(())
    }

    async fn subscribe(
        &self,
        exchange: &Exchange,
        binding_key: &str,
        subscription: &Subscription,
    ) -> Result<mpsc::Receiver<Broadcast>> {
        short(&subscription.queue, "a queue name")?;
        let channel = self.connection.create_channel().await?;
        self.ensure_exchange(&channel, exchange).await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongUInt(subscription.expires_ms),
        );
        arguments.insert(
            "x-message-ttl".into(),
            AMQPValue::LongUInt(subscription.message_ttl_ms),
        );
        let private = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let queue = subscription.queue.as_str();
        channel.queue_declare(queue, private, arguments).await?;
        bind(&channel, queue, exchange.name, binding_key).await?;
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let consumer = channel
            .basic_consume(queue, "", no_ack, FieldTable::default())
            .await?;
        let arrivals = self.arrivals.clone();
        let arrived = in_arrival_order(&consumer, move |_| arrivals.mark());
        let (sender, receiver) = mpsc::channel(256);
        let queue = queue.to_string();
        tokio::spawn(async move {
            tokio::pin!(arrived);
            while let Some(Ok((delivery, mark))) = arrived.next().await {
                let message = match message_of(&delivery.properties, delivery.data) {
                    Ok(message) => message,
                    Err(error) => {
                        tracing::warn!(%queue, reason = %error.reason, "dropping a broadcast message");
                        continue;
                    }
                };
                let broadcast = Broadcast {
                    message,
                    arrived: mark,
                };
                if sender.send(broadcast).await.is_err() {
                    break;
                }
            }
        });
        Ok(receiver)
    }

    async fn subscribe_named(
        &self,
        exchange: &Exchange,
        binding_key: &str,
        subscription: &NamedSubscription,
        prefetch: u16,
    ) -> Result<mpsc::Receiver<Delivery>> {
        let queue = subscription.queue.as_str();
        self.ensure_declared(queue, Declaration::expiring(subscription.expires_ms))
            .await?;
        let channel = self.connection.create_channel().await?;
        self.ensure_exchange(&channel, exchange).await?;
        bind(&channel, queue, exchange.name, binding_key).await?;
        let _ = channel.close(200, "bound").await;
        self.consume(&[queue.to_string()], prefetch).await
    }

    fn declaration(&self, queue: &str) -> Option<Declaration> {
        self.declared
            .lock()
            .expect("declared lock")
            .get(queue)
            .cloned()
    }

    async fn check(&self) -> Result<()> {
        match self.connection.status().connected() {
            true => Ok(()),
            false => Err(Error::ConnectionLost),
        }
    }

    /// A passive declare: ready messages and consumers. AMQP itself does not tell how many
    /// messages are delivered and unacknowledged (only the management API does).
    async fn depth(&self, queue: &str) -> Result<Option<QueueDepth>> {
        // A passive declare of a missing queue closes its channel: it gets one of its own.
        let channel = self.connection.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match channel
            .queue_declare(queue, passive, FieldTable::default())
            .await
        {
            Ok(declared) => {
                let _ = channel.close(200, "inspected").await;
                Ok(Some(QueueDepth {
                    ready: u64::from(declared.message_count()),
                    unacked: None,
                    consumers: Some(u64::from(declared.consumer_count())),
                }))
            }
            Err(lapin::Error::ProtocolError(error))
                if *error.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) =>
            {
                Ok(None)
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        let channel = self.connection.create_channel().await?;
        channel
            .queue_delete(queue, QueueDeleteOptions::default())
            .await?;
        channel
            .exchange_delete(queue, ExchangeDeleteOptions::default())
            .await?;
        self.declared.lock().expect("declared lock").remove(queue);
        let _ = channel.close(200, "deleted").await;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        Ok(self.connection.close(200, "bye").await?)
    }
}
