//! Sending tasks by name to any Celery worker (Python or ours) and reading their results.
//!
//! [`Client::send_task`] returns once the broker has the message. [`Client::send_task_pipelined`]
//! returns once it is sent, its confirmation awaited in the background ([`crate::unconfirmed`]),
//! so a loop of sends does not wait a broker round trip per task; [`Client::flush`] waits for
//! every confirmation outstanding and reports the messages the broker did not take.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tokio::sync::Mutex;
use tracing::Instrument;

use crate::backend::RedisBackend;
use crate::broker::{self, Broker, Confirmation, QueueDepth};
use crate::canvas::{self, Signature};
use crate::config::CeleryConfig;
use crate::error::{Error, Result};
use crate::events::{Clock, Events};
use crate::protocol::repr::{repr, repr_args};
use crate::protocol::result::{state, ResultMeta};
use crate::protocol::TaskRequest;
use crate::sending::{self, OnError, PublishStep};
use crate::telemetry::spans;
use crate::unconfirmed::Unconfirmed;
use crate::unique::{self, Lock};

/// Messages sent with [`Client::send_task_pipelined`] whose confirmation may be awaited at once:
/// enough to keep RabbitMQ's confirms streaming behind the sends, few enough to bound memory.
pub const MAX_UNCONFIRMED: u32 = 1024;

/// Per-call options, named as `apply_async` names them.
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Queue to publish to; default: `task_routes`, then `task_default_queue`.
    pub queue: Option<String>,
    /// Run no earlier than this many seconds from now.
    pub countdown: Option<f64>,
    /// Run no earlier than this time (wins over `countdown`).
    pub eta: Option<DateTime<Utc>>,
    /// Discard if not started within this many seconds from now.
    pub expires: Option<f64>,
    /// Discard if not started by this time (wins over `expires`).
    pub expires_at: Option<DateTime<Utc>>,
    /// Use this id instead of a new UUID.
    pub task_id: Option<String>,
    /// Message priority (0-9).
    pub priority: Option<u8>,
    /// Ask the worker to store no result.
    pub ignore_result: bool,
    /// Seconds after which the worker stops the task (`TimeLimitExceeded`).
    pub time_limit: Option<f64>,
    /// Seconds after which the task is told its soft limit passed.
    pub soft_time_limit: Option<f64>,
    /// Refuse the send ([`Error::NotUnique`]) while the same task with the same arguments (or
    /// the same `unique_key`) is queued or running; the lock lives at most this long.
    pub unique_for: Option<Duration>,
    /// The lock to take instead of the task name and its arguments; needs `unique_for`.
    pub unique_key: Option<String>,
}

/// Per-call options of [`Client::apply_with`]: a canvas that starts with one task (a task, or a
/// chain whose first step is a task) may be unique as [`SendOptions`] says, the lock held by that
/// first task.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// As [`SendOptions::unique_for`], for the canvas's first task.
    pub unique_for: Option<Duration>,
    /// As [`SendOptions::unique_key`].
    pub unique_key: Option<String>,
}

/// The broker connection and the events sent over it, replaced together after a failure.
struct Connection {
    broker: Arc<dyn Broker>,
    /// Sends `task-sent` when `task_send_sent_event` is on.
    events: Option<Arc<Events>>,
}

/// The connection in use, if any.
type Current = Mutex<Option<Arc<Connection>>>;

/// Sends tasks. The broker connection is (re)made on demand: after a failed publish the next
/// send connects afresh, so a broker restart needs no restart of the sender. Clones share the
/// connection and the confirmations awaited.
#[derive(Clone)]
pub struct Client {
    config: Arc<CeleryConfig>,
    backend: Option<RedisBackend>,
    origin: String,
    connection: Arc<Current>,
    unconfirmed: Arc<Unconfirmed>,
}

/// A task sent with [`Client::send_task_pipelined`].
pub struct Sent {
    /// The task's result.
    pub result: AsyncResult,
    /// Resolves once the broker has the message, or with why it did not take it. Dropping it
    /// is safe: the confirmation is awaited anyway and a refusal reported by [`Client::flush`].
    pub confirmed: Confirmation,
}

impl Client {
    /// Connects to the broker and result backend of `config`; fails if the broker is down.
    pub async fn connect(config: CeleryConfig) -> Result<Self> {
        let client = Self::new(config).await?;
        client.connection().await?;
        Ok(client)
    }

    /// Connects to the result backend; the broker is connected at the first send.
    pub async fn new(config: CeleryConfig) -> Result<Self> {
        let backend = RedisBackend::of(&config).await?;
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let origin = format!("gen{}@{host}", std::process::id());
        Ok(Self {
            config: Arc::new(config),
            backend,
            origin,
            connection: Arc::default(),
            unconfirmed: Arc::new(Unconfirmed::new(MAX_UNCONFIRMED)),
        })
    }

    async fn connection(&self) -> Result<Arc<Connection>> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let config = &self.config;
        let broker = broker::of(config).await?;
        let events = config.task_send_sent_event.then(|| {
            Events::start(
                broker.clone(),
                &self.origin,
                Arc::new(Clock::default()),
                false,
            )
        });
        let connection = Arc::new(Connection { broker, events });
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Forgets `failed` so the next send reconnects (unless another send already did).
    async fn disconnect(&self, failed: &Arc<Connection>) {
        disconnect(&self.connection, failed).await;
    }

    /// Publishes task `name` with `args` and `kwargs`; returns once the broker has it.
    pub async fn send_task(
        &self,
        name: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        options: SendOptions,
    ) -> Result<AsyncResult> {
        let (request, queue, lock) = self.request(name, args, kwargs, options)?;
        self.take(lock.as_ref(), &request).await?;
        let published = self.publish(&request, &queue).await;
        self.give_back_unless_sent(lock.as_ref(), &request.id, published)
            .await?;
        Ok(self.result(&request.id))
    }

    /// Publishes task `name` with `args` and `kwargs`; returns once the message is sent, after
    /// every message sent before it, without waiting for the broker's confirmation: that comes
    /// on [`Sent::confirmed`], and [`Client::flush`] waits for all of them. While
    /// [`MAX_UNCONFIRMED`] are awaited, the next send waits for one to come in.
    pub async fn send_task_pipelined(
        &self,
        name: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        options: SendOptions,
    ) -> Result<Sent> {
        let (request, queue, lock) = self.request(name, args, kwargs, options)?;
        let slot = self.unconfirmed.slot().await;
        self.take(lock.as_ref(), &request).await?;
        // A message sent and then refused by the broker leaves its lock to expire: the refusal
        // comes later, to whoever awaits the confirmation.
        let sent = self.send(&request, &queue).await;
        let confirmation = self
            .give_back_unless_sent(lock.as_ref(), &request.id, sent)
            .await?;
        let result = self.result(&request.id);
        Ok(Sent {
            confirmed: self.unconfirmed.watch(slot, request.id, confirmation),
            result,
        })
    }

    /// Waits for the confirmation of every task sent with [`Client::send_task_pipelined`]
    /// before it (by this client or a clone), and reports those the broker did not take since
    /// the last flush ([`Error::Unconfirmed`]), each also told on its own handle.
    pub async fn flush(&self) -> Result<()> {
        self.unconfirmed.flush().await
    }

    /// The unique lock a send of task `name` with `args` and `kwargs` takes: for `unique_for`
    /// when given, else for the task's `task_annotations` `unique_for`, named `unique_key` when
    /// given; `None` when the send is not unique.
    pub fn unique_lock(
        &self,
        name: &str,
        args: &[Value],
        kwargs: &Map<String, Value>,
        unique_for: Option<Duration>,
        unique_key: Option<String>,
    ) -> Result<Option<Lock>> {
        let default = self.config.unique_for(name);
        Lock::asked(name, args, kwargs, unique_for, unique_key, default)
            .map_err(|e| Error::InvalidOption(e.to_string()))
    }

    /// Takes `lock` for task `task_id` (of task `task`), or says which task holds it
    /// ([`Error::NotUnique`]). A lock this task already holds is taken: sending the same task id
    /// again (an outbox publishing its job a second time) is the same send.
    pub async fn take_unique(&self, task: &str, lock: &Lock, task_id: &str) -> Result<()> {
        let backend = self.backend.as_ref().ok_or(Error::NoBackend)?;
        let key = unique::lock_key(&lock.name);
        match backend
            .take_unless_held(&key, task_id, lock.seconds)
            .await?
        {
            Some(holder) if holder != task_id => Err(Error::NotUnique {
                task: task.to_string(),
                lock: lock.name.clone(),
                holder,
            }),
            _ => Ok(()),
        }
    }

    /// Gives back the unique lock `name` if task `task_id` holds it: the task will not be sent.
    pub async fn give_back_unique(&self, name: &str, task_id: &str) {
        if let Some(backend) = &self.backend {
            backend.give_back_unique_lock(name, task_id).await;
        }
    }

    /// Takes `lock`, if any, for `request`.
    async fn take(&self, lock: Option<&Lock>, request: &TaskRequest) -> Result<()> {
        match lock {
            Some(lock) => self.take_unique(&request.task, lock, &request.id).await,
            None => Ok(()),
        }
    }

    /// Passes on `sent`; when it failed, gives back the `lock` taken for task `task_id` first,
    /// since no worker will.
    async fn give_back_unless_sent<T>(
        &self,
        lock: Option<&Lock>,
        task_id: &str,
        sent: Result<T>,
    ) -> Result<T> {
        if let (Err(_), Some(lock)) = (&sent, lock) {
            self.give_back_unique(&lock.name, task_id).await;
        }
        sent
    }

    /// The message of task `name`, the queue it goes to and the unique lock it takes, as
    /// `options` (or the task's `task_annotations`) say.
    fn request(
        &self,
        name: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        options: SendOptions,
    ) -> Result<(TaskRequest, String, Option<Lock>)> {
        let lock =
            self.unique_lock(name, &args, &kwargs, options.unique_for, options.unique_key)?;
        let mut request = TaskRequest::new(name, args, kwargs);
        if let Some(lock) = &lock {
            carry(&mut request, lock);
        }
        if let Some(id) = options.task_id {
            request.root_id = Some(id.clone());
            request.id = id;
        }
        let now = Utc::now();
        let after = |seconds: f64| {
            chrono::Duration::try_milliseconds((seconds * 1e3) as i64)
                .and_then(|delay| now.checked_add_signed(delay))
                .ok_or_else(|| {
                    Error::InvalidOption(format!("{seconds} seconds from now is not a date"))
                })
        };
        request.eta = match (options.eta, options.countdown) {
            (Some(eta), _) => Some(eta),
            (None, Some(countdown)) => Some(after(countdown)?),
            (None, None) => None,
        };
        request.expires = match (options.expires_at, options.expires) {
            (Some(at), _) => Some(at),
            (None, seconds) => seconds.map(after).transpose()?,
        };
        request.origin = Some(self.origin.clone());
        request.ignore_result = options.ignore_result;
        request.timelimit = (options.time_limit, options.soft_time_limit);
        request.properties.priority = options.priority.unwrap_or(0);
        let queue = options
            .queue
            .unwrap_or_else(|| self.config.queue_for(name).to_string());
        Ok((request, queue, lock))
    }

    /// Sends a canvas built with [`canvas`]: a task, a chain, a group or a chord, in any
    /// nesting. Returns the results it ends with: a task's own, a chain's last step's, a group's
    /// members', a chord's body's. A canvas that starts with one task is unique when that task's
    /// `task_annotations` say so ([`Client::apply_with`]).
    pub async fn apply(&self, signature: &Signature) -> Result<Vec<AsyncResult>> {
        self.apply_with(signature, ApplyOptions::default()).await
    }

    /// [`Client::apply`] with `options`. The lock of a unique canvas is held by its first task
    /// and given back when that task ends, as a task sent alone: a chain is unique while its
    /// first step is queued or running. A canvas that starts with several tasks (a group, a
    /// chord's header) is never unique: asking is [`Error::InvalidOption`], and the tasks'
    /// `task_annotations` are not applied to it.
    pub async fn apply_with(
        &self,
        signature: &Signature,
        options: ApplyOptions,
    ) -> Result<Vec<AsyncResult>> {
        let invalid = |e: canvas::CanvasError| Error::InvalidOption(e.to_string());
        let signature = signature.frozen().map_err(invalid)?;
        let mut steps = canvas::start(&signature).map_err(invalid)?;
        let lock = match steps.as_mut_slice() {
            [first] => {
                let request = &mut first.request;
                let lock = self.unique_lock(
                    &request.task,
                    &request.args,
                    &request.kwargs,
                    options.unique_for,
                    options.unique_key,
                )?;
                if let Some(lock) = &lock {
                    carry(request, lock);
                    self.take_unique(&request.task, lock, &request.id).await?;
                }
                lock.map(|lock| (lock, request.id.clone()))
            }
            _ if options.unique_for.is_some() || options.unique_key.is_some() => {
                return Err(Error::InvalidOption(
                    "only a canvas that starts with one task can be unique".into(),
                ))
            }
            _ => None,
        };
        let sent = sending::send_steps(
            steps,
            self.backend.as_ref(),
            &self.config,
            &self.origin,
            OnError::Stop,
            self,
        )
        .await;
        match &lock {
            Some((lock, id)) => self.give_back_unless_sent(Some(lock), id, sent).await?,
            None => sent?,
        }
        Ok(signature
            .final_ids()
            .iter()
            .map(|id| self.result(id))
            .collect())
    }

    /// Publishes `request` to `queue` and waits for the broker to take it.
    async fn publish(&self, request: &TaskRequest, queue: &str) -> Result<()> {
        self.send(request, queue).await?.await
    }

    /// Sends `request` to `queue`. Its confirmation, once in, tells Flower (when asked to); a
    /// failed send, or a confirmation lost with its channel, drops the connection, so the next
    /// send connects afresh.
    async fn send(&self, request: &TaskRequest, queue: &str) -> Result<Confirmation> {
        if !self.may_publish_to(queue).await? {
            return Err(Error::MissingQueue(queue.to_string()));
        }
        let connection = self.connection().await?;
        let (message, span) = spans::publishing(request);
        let confirmation = match connection
            .broker
            .send(queue, &message)
            .instrument(span)
            .await
        {
            Ok(confirmation) => confirmation,
            Err(error) => {
                self.disconnect(&connection).await;
                return Err(error);
            }
        };
        let sent = connection
            .events
            .is_some()
            .then(|| sent_fields(request, queue));
        let current = self.connection.clone();
        Ok(Confirmation::of(async move {
            let confirmed = confirmation.await;
            match (&confirmed, &connection.events, sent) {
                // A nack is the broker's answer: the connection works.
                (Err(Error::NotConfirmed(_)), _, _) => {}
                (Err(_), _, _) => disconnect(&current, &connection).await,
                (Ok(()), Some(events), Some(fields)) => events.send("task-sent", fields),
                (Ok(()), _, _) => {}
            }
            confirmed
        }))
    }

    /// The queue a task goes to when the caller names none.
    pub fn queue_for(&self, name: &str) -> &str {
        self.config.queue_for(name)
    }

    /// Every queue the settings name (the default queue and each route's).
    pub fn configured_queues(&self) -> Vec<String> {
        self.config
            .queues()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// How full `queue` is (connecting if need be); `None` when the broker has no such queue.
    pub async fn depth(&self, queue: &str) -> Result<Option<QueueDepth>> {
        let connection = self.connection().await?;
        let depth = connection.broker.depth(queue).await;
        if depth.is_err() {
            self.disconnect(&connection).await;
        }
        depth
    }

    /// Whether a message may go to `queue`: always when `task_create_missing_queues` is on
    /// (the publish creates it), else only to a queue the settings name or one that exists.
    pub async fn may_publish_to(&self, queue: &str) -> Result<bool> {
        if self.config.task_create_missing_queues || self.config.queues().contains(queue) {
            return Ok(true);
        }
        let connection = self.connection().await?;
        let exists = connection.broker.exists(queue).await;
        if exists.is_err() {
            self.disconnect(&connection).await;
        }
        exists
    }

    /// Whether the broker answers (connecting if need be).
    pub async fn check(&self) -> Result<()> {
        let connection = self.connection().await?;
        let checked = connection.broker.check().await;
        if checked.is_err() {
            self.disconnect(&connection).await;
        }
        checked
    }

    /// Waits for the confirmations outstanding ([`Client::flush`]), sends what events are
    /// pending and closes the broker connection cleanly. The flush's report wins over an
    /// error closing.
    pub async fn close(&self) -> Result<()> {
        let flushed = self.flush().await;
        let Some(connection) = self.connection.lock().await.take() else {
            return flushed;
        };
        if let Some(events) = &connection.events {
            events.close().await;
        }
        flushed.and(connection.broker.close().await)
    }

    /// Saves group `group_id` of the tasks `member_ids` in the result backend, as Python's
    /// `GroupResult.save()` does, so that `GroupResult.restore(group_id)` finds it.
    pub async fn save_group(&self, group_id: &str, member_ids: &[String]) -> Result<()> {
        self.backend
            .as_ref()
            .ok_or(Error::NoBackend)?
            .save_group(group_id, member_ids)
            .await
    }

    /// The result handle of a task sent earlier, by id.
    pub fn result(&self, task_id: &str) -> AsyncResult {
        AsyncResult {
            id: task_id.to_string(),
            backend: self.backend.clone(),
        }
    }
}

impl PublishStep for Client {
    async fn publish_step(&self, request: &TaskRequest, queue: &str) -> Result<()> {
        self.publish(request, queue).await
    }
}

/// Names `lock` in `request`'s header, so the worker that ends the task gives it back.
fn carry(request: &mut TaskRequest, lock: &Lock) {
    request
        .extra_headers
        .insert(unique::UNIQUE_KEY_HEADER.into(), lock.name.clone().into());
}

/// Forgets `failed`, the connection of `current`, so the next send reconnects (unless another
/// send already did).
async fn disconnect(current: &Current, failed: &Arc<Connection>) {
    let mut slot = current.lock().await;
    if slot
        .as_ref()
        .is_some_and(|connection| Arc::ptr_eq(connection, failed))
    {
        *slot = None;
    }
}

/// The fields of `task-sent`, as Flower reads them.
fn sent_fields(request: &TaskRequest, queue: &str) -> Map<String, Value> {
    let iso = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339());
    let fields = serde_json::json!({
        "uuid": request.id,
        "root_id": request.root_id,
        "parent_id": request.parent_id,
        "name": request.task,
        "args": repr_args(&request.args),
        "kwargs": repr(&Value::Object(request.kwargs.clone())),
        "retries": request.retries,
        "eta": iso(request.eta),
        "expires": iso(request.expires),
        "queue": queue,
        "exchange": "",
        "routing_key": queue,
    });
    fields.as_object().cloned().unwrap_or_default()
}

/// A task's result in the backend, as Python's `AsyncResult`.
#[derive(Clone)]
pub struct AsyncResult {
    /// The task id.
    pub id: String,
    backend: Option<RedisBackend>,
}

impl AsyncResult {
    fn backend(&self) -> Result<&RedisBackend> {
        self.backend.as_ref().ok_or(Error::NoBackend)
    }

    /// The stored meta; `None` while PENDING.
    pub async fn meta(&self) -> Result<Option<ResultMeta>> {
        self.backend()?.get(&self.id).await
    }

    /// The current state name (`PENDING` when nothing is stored).
    pub async fn state(&self) -> Result<String> {
        Ok(self
            .meta()
            .await?
            .map_or_else(|| state::PENDING.to_string(), |meta| meta.status))
    }

    /// Waits up to `timeout` for the task to finish: its value, or its exception as an error.
    pub async fn get(&self, timeout: Duration) -> Result<Value> {
        let meta = self.backend()?.wait(&self.id, timeout).await?;
        match meta.exception() {
            Some(exc) => Err(Error::TaskFailed {
                message: exc.message(),
                exc_type: exc.exc_type,
            }),
            None => Ok(meta.result),
        }
    }
}
