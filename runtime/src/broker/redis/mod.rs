//! Redis as kombu uses it: each queue a list (plus priority sub-lists), messages as JSON
//! envelopes, acks emulated with the `unacked` hash and `unacked_index` sorted set so Python
//! and Rust workers share queues and recovery state.
//!
//! Unlike kombu, which takes a message with BRPOP and records it as unacked with a later command
//! (a consumer killed in between loses the message), we take and record it in one server-side
//! script. A script cannot block, so an idle consumer waits apart from taking: it blocks (on a
//! connection of its own) until its queue's list holds a message, without removing it, then runs
//! the script. See [`wait_for_work`]. What is taken is settled as [`settling`] says, and until
//! then its record is kept from the restore by its [`lease`].

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use tokio::sync::{mpsc, Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

use super::arrival::Arrivals;
use super::remembered::Remembered;
use super::{
    give_back, Acker, Broadcast, Broker, Confirmation, Delivery, Exchange, ExchangeKind,
    NamedSubscription, QueueDepth, Settle, Subscription,
};
use crate::config::{SslOptions, TransportOptions};
use crate::error::{Error, Result};
use crate::protocol::envelope::{self, DeliveryInfo};
use crate::sentinel::Following;
mod lease;
mod settling;

use lease::Leases;
use settling::{delivery, Acks, DropRecords, Holding};

use crate::protocol::kombu_redis as layout;
use crate::protocol::Message;

/// How long our hold of `unacked_mutex` lasts if we die holding it. kombu takes 300 s; a restore
/// pass takes milliseconds, and a worker killed during one would otherwise stop every restore
/// of its database for five minutes. (A pass outliving this may run beside another: both could
/// put the same message back, a duplicate, never a loss.)
const RESTORE_MUTEX_MS: u64 = 30_000;
/// Longest wait of an idle consumer before it looks at every list again: a message on a list it
/// is not blocked on (another queue's, a priority sub-list) waits at most this long.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// Pops up to ARGV[2] messages from the lists `KEYS[3..]`, the first lists first, and records
/// each whose envelope is readable as kombu does (`unacked` = KEYS[1], `unacked_index` = KEYS[2],
/// scored ARGV[1]) in the same atomic step. Returns `{list, envelope, list, envelope, ...}`, empty
/// when every list is. The entry embeds the envelope's own text, so what is restored is byte
/// for byte what was published.
const POP_AND_RECORD: &str = r#"
local taken = {}
local wanted = tonumber(ARGV[2])
for i = 3, #KEYS do
  while #taken < 2 * wanted do
    local raw = redis.call('RPOP', KEYS[i])
    if not raw then break end
    local ok, envelope = pcall(cjson.decode, raw)
    local properties = ok and type(envelope) == 'table' and envelope['properties']
    if type(properties) == 'table' and type(properties['delivery_tag']) == 'string'
        and type(properties['delivery_info']) == 'table' then
      local info = properties['delivery_info']
      local text = function(v) if type(v) == 'string' then return v end return '' end
      local entry = '[' .. raw .. ',' .. cjson.encode(text(info['exchange'])) .. ','
        .. cjson.encode(text(info['routing_key'])) .. ']'
      redis.call('HSET', KEYS[1], properties['delivery_tag'], entry)
      redis.call('ZADD', KEYS[2], ARGV[1], properties['delivery_tag'])
    end
    taken[#taken + 1] = KEYS[i]
    taken[#taken + 1] = raw
  end
end
return taken
"#;

/// Messages one fetch takes at most: one round trip fills up to this many free prefetch slots.
const TAKE_AT_ONCE: usize = 64;

/// Seconds since the epoch, as kombu scores `unacked_index`.
fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A Redis broker connection.
pub struct RedisBroker {
    client: redis::Client,
    connection: MultiplexedConnection,
    /// Where deliveries are settled and their leases renewed, made at the first `consume` (a
    /// broker that only publishes needs none): made again when lost, and moved to the new
    /// master after a Sentinel failover, so that a task still running when its consumer's
    /// connection broke stays leased and is acked (not run again). Consumers keep the plain
    /// connection, whose loss they report.
    /// Its acks are coalesced there.
    settling: tokio::sync::OnceCell<Arc<Acks>>,
    /// The sentinels of a `sentinel://` broker, for `settling` to follow the master.
    sentinel: Option<crate::sentinel::Sentinel>,
    /// Queues whose binding this connection recorded (the most recently used ones).
    bound: Mutex<Remembered<()>>,
    /// The binding records of this connection's private subscriptions, `(key, member)`, taken
    /// back at close as kombu does when it deletes an auto-delete queue: else every worker
    /// that ever ran stays listed under `_kombu.binding.celery.pidbox`.
    subscribed: Mutex<Vec<(String, String)>>,
    /// The fetch loops, awaited at close so a message taken by the last poll goes back, the
    /// restorer, awaited so it never leaves kombu's restore mutex held, and the lease renewer.
    consumers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// What this connection's consumers hold unsettled, renewed until settled.
    leases: Arc<Leases>,
    /// Cancelled by `close`: fetch loops stop at their next turn.
    closing: CancellationToken,
    /// The order of task messages fetched and control requests heard, so that a request does
    /// not overtake a task sent before it that is still in its list.
    arrivals: Arc<Arrivals>,
    visibility_timeout: u64,
    restoring: std::sync::atomic::AtomicBool,
    /// Cancelled when the sentinels name another master: this connection is then done, as if
    /// lost, so that the worker reconnects and the client's next send connects afresh.
    moved: CancellationToken,
    /// Stops watching the sentinels when the broker goes.
    _watching: Option<tokio_util::sync::DropGuard>,
}

impl RedisBroker {
    /// Connects to `url`; `rediss://` over TLS as `ssl` (`broker_use_ssl`) says. For a
    /// `sentinel://` list, to the master the sentinels name now: after a failover this
    /// connection fails, and the next one (the worker's reconnect, the client's next send) finds
    /// the new master.
    pub async fn connect(
        url: &str,
        options: &TransportOptions,
        ssl: Option<&SslOptions>,
    ) -> Result<Self> {
        let sentinel = crate::sentinel::of(
            url,
            "broker_url",
            options.master_name.as_deref(),
            options.sentinel_kwargs.as_ref(),
            ssl,
        )?;
        let client = crate::sentinel::open(url, sentinel.as_ref(), ssl).await?;
        let connection = client.get_multiplexed_async_connection().await?;
        let moved = CancellationToken::new();
        let watching = sentinel.clone().map(|sentinel| {
            let (stop, moved, master) = (
                CancellationToken::new(),
                moved.clone(),
                client.get_connection_info().addr.clone(),
            );
            let stopped = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = sentinel.moved_from(&master) => moved.cancel(),
                    () = stopped.cancelled() => {}
                }
            });
            stop.drop_guard()
        });
        Ok(Self {
            client,
            connection,
            settling: tokio::sync::OnceCell::new(),
            sentinel,
            bound: Mutex::default(),
            subscribed: Mutex::new(Vec::new()),
            consumers: Mutex::new(Vec::new()),
            leases: Arc::default(),
            closing: CancellationToken::new(),
            arrivals: Arc::default(),
            visibility_timeout: options.visibility_timeout,
            restoring: std::sync::atomic::AtomicBool::new(false),
            moved,
            _watching: watching,
        })
    }

    /// Starts, once per connection, the periodic restore of messages whose consumer kept them
    /// unacked past the visibility timeout (it died): kombu's recovery, so Python and Rust
    /// consumers recover each other's work; and the renewal of what this connection holds, so
    /// that no consumer takes for dead a live one's message (over `settling`).
    async fn start_upkeep(&self, settling: &Following) {
        if self
            .restoring
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let connection = self.connection.clone();
        let timeout = self.visibility_timeout;
        let closing = self.closing.clone();
        let every = Duration::from_secs((timeout / 2).clamp(1, 60));
        let restorer = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                tokio::select! {
                    () = closing.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                match restore_visible(&connection, timeout).await {
                    Ok(0) => {}
                    Ok(restored) => tracing::warn!(
                        restored,
                        "restored messages left unacked past the visibility timeout"
                    ),
                    Err(error) => tracing::warn!(%error, "cannot restore unacked messages"),
                }
            }
        });
        let renewer = tokio::spawn(lease::keep_renewing(
            self.leases.clone(),
            settling.clone(),
            timeout,
            self.closing.clone(),
        ));
        self.consumers.lock().await.extend([restorer, renewer]);
    }

    /// Records the queue's binding to its direct exchange, as Celery's declare does, so
    /// publishers that route through the exchange (not `""`) find the queue.
    async fn bind(&self, queue: &str) -> Result<()> {
        if self.bound.lock().await.contains(queue) {
            return Ok(());
        }
        let member = layout::binding_member(queue, queue);
        redis::pipe()
            .sadd(layout::binding_key(queue), &member)
            .sadd(layout::permanent_binding_key(queue), &member)
            .query_async::<()>(&mut self.connection.clone())
            .await?;
        self.bound.lock().await.insert(queue.to_string(), ());
        Ok(())
    }
}

impl RedisBroker {
    /// Fails once the sentinels have named another master than this connection's.
    fn still_master(&self) -> Result<()> {
        match self.moved.is_cancelled() {
            true => Err(Error::ConnectionLost),
            false => Ok(()),
        }
    }

    /// The PUB/SUB channel of `exchange` and `routing_key` in this connection's database.
    fn fanout_channel(&self, exchange: &str, routing_key: &str) -> String {
        let db = self.client.get_connection_info().redis.db;
        layout::fanout_channel(db, exchange, routing_key)
    }

    /// The lists bound to direct `exchange` with `routing_key`, from kombu's binding table.
    async fn bound_lists(&self, exchange: &str, routing_key: &str) -> Result<Vec<String>> {
        let members: Vec<String> = self
            .connection
            .clone()
            .smembers(layout::binding_key(exchange))
            .await?;
        Ok(members
            .iter()
            .filter_map(|member| layout::bound_queue(member, routing_key))
            .map(str::to_string)
            .collect())
    }
}

impl RedisBroker {
    /// Follows what `exchange` publishes with `binding_key` (PUB/SUB) for the subscriber
    /// `queue`, each message handed on as `received_as` makes it, until the receiver goes.
    async fn listen<T: Send + 'static>(
        &self,
        exchange: &Exchange,
        binding_key: &str,
        queue: &str,
        received_as: impl Fn(Message) -> T + Send + 'static,
    ) -> Result<mpsc::Receiver<T>> {
        if exchange.kind == ExchangeKind::Direct {
            return Err(Error::Unsupported(
                "subscribing to a direct exchange on Redis",
            ));
        }
        // Not needed for delivery, but kombu records it and tools read it.
        let member = layout::binding_member(binding_key, queue);
        let key = layout::binding_key(exchange.name);
        self.connection
            .clone()
            .sadd::<_, _, ()>(&key, &member)
            .await?;
        self.subscribed.lock().await.push((key, member));
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub
            .psubscribe(self.fanout_channel(exchange.name, &binding_key.replace('#', "*")))
            .await?;
        let (sender, receiver) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                let Ok(payload) = message.get_payload::<Vec<u8>>() else {
                    continue;
                };
                match envelope::decode(&payload) {
                    Ok(received) => {
                        if sender.send(received_as(received.message)).await.is_err() {
                            break;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(channel = message.get_channel_name(), %error, "ignoring unreadable broadcast")
                    }
                }
            }
        });
        Ok(receiver)
    }
}

/// The settlement of a PUB/SUB message: nothing to tell Redis.
struct Unrecorded;

#[async_trait]
impl Acker for Unrecorded {
    async fn ack(self: Box<Self>) -> Result<()> {
        Ok(())
    }

    async fn reject(self: Box<Self>, _requeue: bool) -> Result<()> {
        Ok(())
    }
}

/// `message` in kombu's envelope, as published to `exchange` (`""`: a queue's own) with
/// `routing_key`.
fn enveloped(message: &Message, exchange: &str, routing_key: &str) -> String {
    let info = DeliveryInfo {
        exchange: exchange.to_string(),
        routing_key: routing_key.to_string(),
        redelivered: false,
    };
    envelope::encode(message, info).1
}

#[async_trait]
impl Broker for RedisBroker {
    /// The push's reply is the confirmation: awaited here, so the message's place in its list
    /// and the order of this connection's messages are never in doubt.
    async fn send(&self, queue: &str, message: &Message) -> Result<Confirmation> {
        self.still_master()?;
        self.bind(queue).await?;
        let text = enveloped(message, "", queue);
        let list = layout::list_for(queue, message.properties.priority);
        self.connection
            .clone()
            .lpush::<_, _, ()>(list, text)
            .await?;
        Ok(Confirmation::taken())
    }

    async fn consume(&self, queues: &[String], prefetch: u16) -> Result<mpsc::Receiver<Delivery>> {
        for queue in queues {
            self.bind(queue).await?;
        }
        let acks = self
            .settling
            .get_or_try_init(|| async {
                let connection = Following::new(self.client.clone(), self.sentinel.clone());
                Ok::<_, Error>(Acks::new(DropRecords {
                    connection: connection.await?,
                }))
            })
            .await?
            .clone();
        self.start_upkeep(&acks.writer().connection).await;
        let connection = self.connection.clone();
        let slots = Arc::new(Semaphore::new(usize::from(prefetch).max(1)));
        let holding = Arc::new(Holding {
            prefetch,
            outside: std::sync::atomic::AtomicU16::new(0),
        });
        let leases = self.leases.clone();
        let (sender, receiver) = mpsc::channel(usize::from(prefetch).max(1));
        let mut queues = queues.to_vec();
        let closing = self.closing.clone();
        let moved = self.moved.clone();
        // Blocking commands hold their connection, so the idle wait gets one of its own.
        let mut waiting = Some(self.client.get_multiplexed_async_connection().await?);
        let puller = self.arrivals.puller();
        let fetching = tokio::spawn(async move {
            let pop = redis::Script::new(POP_AND_RECORD);
            loop {
                // A held slot is an unsettled message: stop fetching while all are taken, and
                // take as many messages at once as there are free slots.
                let slot = match slots.clone().try_acquire_owned() {
                    Ok(slot) => Ok(slot),
                    Err(_) => {
                        puller.full(true);
                        let slot = tokio::select! {
                            slot = slots.clone().acquire_owned() => slot,
                            () = closing.cancelled() => break,
                            () = moved.cancelled() => {
                                tracing::warn!("the Redis master moved; this consumer stops");
                                break;
                            }
                        };
                        puller.full(false);
                        slot
                    }
                };
                let Ok(slot) = slot else { break };
                let mut free = vec![slot];
                while free.len() < TAKE_AT_ONCE {
                    match slots.clone().try_acquire_owned() {
                        Ok(slot) => free.push(slot),
                        Err(_) => break,
                    }
                }
                if sender.is_closed() || closing.is_cancelled() || moved.is_cancelled() {
                    break;
                }
                let wanted = puller.wanted();
                tokio::pin!(wanted);
                wanted.as_mut().enable();
                let fetch = puller.fetch();
                let mut call = pop.key(layout::UNACKED);
                call.key(layout::UNACKED_INDEX)
                    .key(layout::fetch_order(&queues))
                    .arg(now_seconds())
                    .arg(free.len());
                let popped: Vec<(String, Vec<u8>)> =
                    match call.invoke_async(&mut connection.clone()).await {
                        Ok(popped) => popped,
                        Err(error) => {
                            tracing::error!(%error, "Redis consumer failed");
                            break;
                        }
                    };
                // Rotate so a busy queue cannot starve the others.
                queues.rotate_left(1);
                if popped.is_empty() {
                    puller.fetched(fetch);
                    drop(free);
                    tokio::select! {
                        () = &mut wanted => continue,
                        waited = wait_for_work(&mut waiting, &queues[0]) => match waited {
                            Ok(()) => continue,
                            Err(error) => {
                                tracing::error!(%error, "Redis consumer failed");
                                break;
                            }
                        },
                        () = closing.cancelled() => break,
                        () = moved.cancelled() => {
                            tracing::warn!("the Redis master moved; this consumer stops");
                            break;
                        }
                    }
                }
                let deliveries: Vec<Delivery> = popped
                    .into_iter()
                    .zip(free)
                    .map(|((list, raw), slot)| {
                        delivery(&acks, &leases, &holding, list, raw, slot, puller.task())
                    })
                    .collect();
                puller.fetched(fetch);
                let mut deliveries = deliveries.into_iter();
                let mut refused = false;
                for delivery in deliveries.by_ref() {
                    if let Err(mpsc::error::SendError(unwanted)) = sender.send(delivery).await {
                        give_back(unwanted).await;
                        refused = true;
                        break;
                    }
                }
                if refused {
                    // The worker stopped: what was taken but not handed over goes back too.
                    for unwanted in deliveries {
                        give_back(unwanted).await;
                    }
                    break;
                }
            }
        });
        self.consumers.lock().await.push(fetching);
        Ok(receiver)
    }

    async fn publish_to(
        &self,
        exchange: &Exchange,
        routing_key: &str,
        message: &Message,
    ) -> Result<()> {
        self.still_master()?;
        let text = enveloped(message, exchange.name, routing_key);
        let mut connection = self.connection.clone();
        match exchange.kind {
            ExchangeKind::Fanout | ExchangeKind::Topic => {
                connection
                    .publish::<_, _, ()>(self.fanout_channel(exchange.name, routing_key), text)
                    .await?;
            }
            ExchangeKind::Direct => {
                for list in self.bound_lists(exchange.name, routing_key).await? {
                    connection.lpush::<_, _, ()>(list, &text).await?;
                }
            }
        }
        Ok(())
    }

    /// To a fanout or topic exchange (events), every `PUBLISH` in one pipeline: one round trip
    /// however many messages.
    async fn publish_all_to(
        &self,
        exchange: &Exchange,
        messages: &[(String, Message)],
    ) -> Result<()> {
        if exchange.kind == ExchangeKind::Direct {
            for (routing_key, message) in messages {
                self.publish_to(exchange, routing_key, message).await?;
            }
            return Ok(());
        }
        self.still_master()?;
        let mut pipeline = redis::pipe();
        for (routing_key, message) in messages {
            let channel = self.fanout_channel(exchange.name, routing_key);
            pipeline
                .publish(channel, enveloped(message, exchange.name, routing_key))
                .ignore();
        }
        pipeline
            .query_async::<()>(&mut self.connection.clone())
            .await?;
        Ok(())
    }

    async fn subscribe(
        &self,
        exchange: &Exchange,
        binding_key: &str,
        subscription: &Subscription,
    ) -> Result<mpsc::Receiver<Broadcast>> {
        let arrivals = self.arrivals.clone();
        self.listen(exchange, binding_key, &subscription.queue, move |message| {
            Broadcast {
                message,
                arrived: arrivals.mark(),
            }
        })
        .await
    }

    /// PUB/SUB: no queue is kept, so `prefetch` bounds nothing and settling does nothing.
    async fn subscribe_named(
        &self,
        exchange: &Exchange,
        binding_key: &str,
        subscription: &NamedSubscription,
        _prefetch: u16,
    ) -> Result<mpsc::Receiver<Delivery>> {
        let arrivals = self.arrivals.clone();
        let queue = subscription.queue.clone();
        self.listen(exchange, binding_key, &subscription.queue, move |message| {
            Delivery {
                message: Ok(message),
                queue: queue.clone(),
                redelivered: false,
                tag: "(pub/sub)".into(),
                settle: Settle::new(Unrecorded),
                arrival: arrivals.task(),
            }
        })
        .await
    }

    async fn check(&self) -> Result<()> {
        self.still_master()?;
        redis::cmd("PING")
            .query_async::<()>(&mut self.connection.clone())
            .await?;
        Ok(())
    }

    /// Redis keeps no queue apart from its lists (an empty list is gone), so every queue
    /// exists, and no consumer is registered anywhere. The unacked count reads every entry of
    /// `unacked`, which holds what all consumers of the database have in hand: prefetch-sized.
    async fn depth(&self, queue: &str) -> Result<Option<QueueDepth>> {
        let mut connection = self.connection.clone();
        let mut lengths = redis::pipe();
        for &step in &layout::PRIORITY_STEPS {
            lengths.llen(layout::list_for(queue, step));
        }
        let lengths: Vec<u64> = lengths.query_async(&mut connection).await?;
        let entries: Vec<String> = connection.hvals(layout::UNACKED).await?;
        let unacked = entries
            .iter()
            .filter(|entry| {
                serde_json::from_str::<serde_json::Value>(entry)
                    .is_ok_and(|entry| entry[2].as_str() == Some(queue))
            })
            .count();
        Ok(Some(QueueDepth {
            ready: lengths.iter().sum(),
            unacked: Some(unacked as u64),
            consumers: None,
        }))
    }

    /// Redis has no queues of its own: one exists once a consumer bound it (kombu's binding
    /// record, as Celery's declare writes it) or while it holds messages.
    async fn exists(&self, queue: &str) -> Result<bool> {
        let mut query = redis::pipe();
        query.exists(format!("_kombu.binding.{queue}"));
        for &step in &layout::PRIORITY_STEPS {
            query.exists(layout::list_for(queue, step));
        }
        let found: Vec<bool> = query.query_async(&mut self.connection.clone()).await?;
        Ok(found.contains(&true))
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        let mut keys: Vec<String> = layout::PRIORITY_STEPS
            .iter()
            .map(|&step| layout::list_for(queue, step))
            .collect();
        keys.push(format!("_kombu.binding.{queue}"));
        keys.push(format!("_kombu.binding_permanent.{queue}"));
        self.connection.clone().del::<_, ()>(keys).await?;
        self.bound.lock().await.remove(queue);
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        // A fetch loop ends at its next turn; what its last poll took is delivered or given back.
        self.closing.cancel();
        for fetching in self.consumers.lock().await.drain(..) {
            let _ = fetching.await;
        }
        let mut connection = self.connection.clone();
        for (key, member) in self.subscribed.lock().await.drain(..) {
            connection.srem::<_, _, ()>(key, member).await?;
        }
        Ok(())
    }
}

/// Waits, at most [`IDLE_WAIT`], until `list` holds a message, leaving it there for the taking
/// script: `BLMOVE list list RIGHT RIGHT` moves a list's last element onto its own tail, which
/// changes nothing, and blocks while the list is empty. Before Redis 6.2 there is no BLMOVE:
/// `waiting` becomes `None` and the consumer sleeps instead (it then polls).
async fn wait_for_work(waiting: &mut Option<MultiplexedConnection>, list: &str) -> Result<()> {
    let Some(connection) = waiting else {
        tokio::time::sleep(IDLE_WAIT).await;
        return Ok(());
    };
    let waited = redis::cmd("BLMOVE")
        .arg(list)
        .arg(list)
        .arg("RIGHT")
        .arg("RIGHT")
        .arg(IDLE_WAIT.as_secs_f64())
        .query_async::<Option<Vec<u8>>>(connection)
        .await;
    match waited {
        Ok(_) => Ok(()),
        Err(error)
            if error
                .to_string()
                .to_ascii_lowercase()
                .contains("unknown command") =>
        {
            tracing::warn!("this Redis has no BLMOVE (before 6.2): idle consumers poll");
            *waiting = None;
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

/// Releases the restore mutex only if this restorer still holds it.
const RELEASE_MUTEX: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Puts back every message delivered more than `visibility_timeout` seconds ago and still
/// unacked, at the head of its queue (consumed next), marked redelivered. One consumer at a
/// time does it, under kombu's `unacked_mutex`.
async fn restore_visible(
    connection: &MultiplexedConnection,
    visibility_timeout: u64,
) -> Result<usize> {
    let mut connection = connection.clone();
    let token = uuid::Uuid::new_v4().to_string();
    let locked: Option<String> = redis::cmd("SET")
        .arg(layout::UNACKED_MUTEX)
        .arg(&token)
        .arg("NX")
        .arg("PX")
        .arg(RESTORE_MUTEX_MS)
        .query_async(&mut connection)
        .await?;
    if locked.is_none() {
        return Ok(0);
    }
    let cutoff = now_seconds() - visibility_timeout as f64;
    let tags: Vec<String> = connection
        .zrangebyscore(layout::UNACKED_INDEX, "-inf", cutoff)
        .await?;
    let mut restored = 0;
    for tag in tags {
        let entry: Option<String> = connection.hget(layout::UNACKED, &tag).await?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zrem(layout::UNACKED_INDEX, &tag)
            .hdel(layout::UNACKED, &tag);
        match entry.as_deref().map(layout::redelivered) {
            Some(Ok((list, envelope))) => {
                pipe.rpush(list, envelope);
                restored += 1;
            }
            Some(Err(why)) => tracing::warn!(%tag, %why, "an unacked message cannot be restored"),
            None => {}
        }
        pipe.query_async::<()>(&mut connection).await?;
    }
    redis::Script::new(RELEASE_MUTEX)
        .key(layout::UNACKED_MUTEX)
        .arg(&token)
        .invoke_async::<i64>(&mut connection)
        .await?;
    Ok(restored)
}
