//! The dispatcher: takes task messages from the broker and runs them as Celery's worker would.
//!
//! Per message: decode (undecodable → logged with its delivery tag and rejected); look the task
//! up (unknown → FAILURE `NotRegistered`, acked); drop it as REVOKED when revoked or expired;
//! hold it unacked until its ETA and a free slot of `worker_concurrency`; ack (now, or after the
//! run with `task_acks_late`); store STARTED, the task's own states, then SUCCESS or FAILURE;
//! send the matching events. Nothing a message contains can stop the loop.
//!
//! [`control`] answers Celery's remote control (pidbox) for this node.

mod control;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celery::Celery;
use chrono::Utc;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, Mutex, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::add_to_chord;
use crate::backend::RedisBackend;
use crate::broker::{self, Broker, Delivery, Exchange, Settle, Subscription};
use crate::canvas::{self, Next, Signature};
use crate::chord;
use crate::config::CeleryConfig;
use crate::error::{Error, Result};
use crate::events::{Clock, Events};
use crate::metrics::{Ended, Rejected, WorkerMetrics};
use crate::progress::{TaskContext, Updates};
use crate::protocol::repr::{repr, repr_args};
use crate::protocol::result::{state, ExceptionInfo, Extended, ResultMeta};
use crate::protocol::TaskRequest;
use crate::rate::TokenBucket;
use crate::registry::{NextRun, Outcome, Registry};
use crate::replace;
use crate::state::WorkerState;
use crate::urls::{is_sentinel_url, is_tls_url, redact_url, BrokerKind};

/// Expands Celery's node-name placeholders: `%h` host name, `%n` its first label, `%d` the rest.
pub fn expand_hostname(template: &str) -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let (name, domain) = host.split_once('.').unwrap_or((&host, ""));
    template
        .replace("%h", &host)
        .replace("%n", name)
        .replace("%d", domain)
}

/// Builds the rusty-celery app handle that its `Request::new` requires. It is never used to send
/// or receive: we point it at a Redis URL when there is one, since the crate's Redis transport
/// connects but declares nothing, whereas its AMQP transport declares the default queue. The
/// crate speaks neither `amqps://` nor `rediss://` nor failover lists (whose first node may be
/// the one down) nor Sentinel lists, so without a plain URL it is given a local placeholder
/// instead (see [`placeholder_redis`]).
pub async fn app_handle(config: &CeleryConfig) -> Result<Arc<Celery>> {
    let plain: Vec<&String> = [Some(&config.broker_url), config.result_backend.as_ref()]
        .into_iter()
        .flatten()
        .filter(|url| !is_tls_url(url) && !url.contains(';') && !is_sentinel_url(url))
        .collect();
    let url = match plain
        .iter()
        .find(|url| BrokerKind::of(url).ok() == Some(BrokerKind::Redis))
        .or(plain.first())
    {
        Some(url) => url.to_string(),
        None => placeholder_redis().await?,
    };
    let app = celery::CeleryBuilder::new("rcelery", &url)
        .default_queue(&config.task_default_queue)
        .build()
        .await
        .map_err(|e| Error::Config(format!("cannot build the task app handle: {e}")))?;
    Ok(Arc::new(app))
}

/// A `redis://` URL of a local listener that accepts connections and holds them, never
/// answering: enough for the crate's Redis transport, which sends nothing when it connects to
/// database 0 without a password, and is never asked for anything after.
/// One per process: a worker made again after a lost connection reuses it.
async fn placeholder_redis() -> Result<String> {
    static PLACEHOLDER: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    PLACEHOLDER
        .get_or_try_init(|| async {
            let failed =
                |e: std::io::Error| Error::Config(format!("cannot build the task app handle: {e}"));
            let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
                .await
                .map_err(failed)?;
            let port = listener.local_addr().map_err(failed)?.port();
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    // Held until the handle hangs up, then closed.
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
                    });
                }
            });
            Ok(format!("redis://127.0.0.1:{port}/0"))
        })
        .await
        .cloned()
}

/// One queue's consumer: a task passing what the broker delivers on to the worker.
struct Consumer {
    /// Stops it; it gives back what it fetched and did not pass on, then ends.
    stop: CancellationToken,
    forwarding: tokio::task::JoinHandle<()>,
}

/// One worker node.
pub struct Worker {
    app: Arc<Celery>,
    registry: Registry,
    broker: Arc<dyn Broker>,
    backend: Option<RedisBackend>,
    config: CeleryConfig,
    hostname: String,
    slots: Arc<Semaphore>,
    /// Tasks run at once: `worker_concurrency`, changed by `pool_grow`/`pool_shrink`.
    pool_size: AtomicUsize,
    state: WorkerState,
    /// What it counts for Prometheus; kept across reconnects by whoever makes the workers.
    metrics: Arc<WorkerMetrics>,
    /// One consumer per queue, each feeding `deliveries`; `add_consumer`/`cancel_consumer`
    /// change the set while the worker runs.
    consumers: Mutex<BTreeMap<String, Consumer>>,
    deliveries: mpsc::Sender<Delivery>,
    received: Mutex<Option<mpsc::Receiver<Delivery>>>,
    /// Cancelled when a consumer's broker connection is lost.
    lost: CancellationToken,
    initial_queues: Vec<String>,
    clock: Arc<Clock>,
    events: Arc<Events>,
    /// Cancelled at shutdown: messages not yet started are given back to the broker.
    stopping: CancellationToken,
    /// Cancelled by the `shutdown` control command.
    shutdown_requested: CancellationToken,
    /// Cancelled to stop at once, without waiting for running tasks (a second signal).
    cold_shutdown: CancellationToken,
    /// Per-task rate limits, from `task_annotations` and the `rate_limit` control command.
    rate_limits: std::sync::Mutex<std::collections::HashMap<String, TokenBucket>>,
}

/// How a run ended, beyond the task's own outcome.
enum Ending {
    Ran(Outcome),
    Terminated,
    TimedOut(f64),
}

/// A time limit in seconds, as a message, a canvas option or a setting gives it: none unless
/// it is a positive number of seconds a clock can count (`1e20` or infinity is no limit, not a
/// panic).
fn time_limit(seconds: Option<f64>) -> Option<Duration> {
    seconds
        .filter(|s| *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
}

/// The most tasks one worker runs at once, however far `pool_grow` asks it to grow.
const MAX_POOL: usize = 10_000;

/// Retries a task gets when it declares no `max_retries`, as Celery's `Task.max_retries`.
const DEFAULT_MAX_RETRIES: u32 = 3;

/// Tries of one result write, 0.1 s apart and doubling: about 6 s in all.
const STORE_ATTEMPTS: u32 = 7;

impl Worker {
    /// Connects to the broker and backend of `config`; consumes `queues` as node `hostname`.
    pub async fn new(
        config: CeleryConfig,
        registry: Registry,
        hostname: String,
        queues: Vec<String>,
    ) -> Result<Self> {
        let broker = broker::of(&config).await?;
        let backend = RedisBackend::of(&config).await?;
        let app = app_handle(&config).await?;
        let pool_size = AtomicUsize::new(config.concurrency());
        let metrics = Arc::new(WorkerMetrics::new());
        let slots = Arc::new(Semaphore::new(config.concurrency()));
        let clock = Arc::new(Clock::default());
        let events = Events::start(
            broker.clone(),
            &hostname,
            clock.clone(),
            config.worker_send_task_events,
        );
        let (deliveries, received) = mpsc::channel(usize::from(prefetch_of(&config)));
        let mut rate_limits = std::collections::HashMap::new();
        for (task, annotation) in &config.task_annotations {
            if let Some(per_second) = annotation
                .rate_limit
                .as_deref()
                .map(crate::rate::parse)
                .transpose()?
                .flatten()
            {
                rate_limits.insert(task.clone(), TokenBucket::new(per_second));
            }
        }
        Ok(Self {
            app,
            registry: registry.with_builtins(),
            broker,
            backend,
            state: WorkerState::new(&hostname, metrics.clone()),
            metrics,
            config,
            hostname,
            slots,
            pool_size,
            consumers: Mutex::new(BTreeMap::new()),
            deliveries,
            received: Mutex::new(Some(received)),
            lost: CancellationToken::new(),
            initial_queues: queues,
            clock,
            events,
            stopping: CancellationToken::new(),
            shutdown_requested: CancellationToken::new(),
            cold_shutdown: CancellationToken::new(),
            rate_limits: std::sync::Mutex::new(rate_limits),
        })
    }

    /// Counts into `metrics` instead of metrics of its own, so that a process keeps one set
    /// of counters across the workers it makes (one per broker connection). Call before `run`.
    pub fn with_metrics(mut self, metrics: Arc<WorkerMetrics>) -> Self {
        self.state = WorkerState::new(&self.hostname, metrics.clone());
        self.metrics = metrics;
        self
    }

    /// Sets (or with `None` removes) the rate limit of `task`.
    fn set_rate_limit(&self, task: &str, per_second: Option<f64>) {
        let mut limits = self.rate_limits.lock().expect("rate lock");
        match per_second {
            Some(per_second) => limits.insert(task.to_string(), TokenBucket::new(per_second)),
            None => limits.remove(task),
        };
    }

    /// A handle that, once cancelled, turns the warm shutdown in progress into a cold one.
    pub fn cold_shutdown(&self) -> CancellationToken {
        self.cold_shutdown.clone()
    }

    fn prefetch(&self) -> u16 {
        prefetch_of(&self.config)
    }

    /// The most messages one consumer's window grows to with messages held for their ETA:
    /// `worker_eta_task_limit`, as Celery bounds its QoS, else AMQP's largest prefetch count.
    fn eta_window(&self) -> u16 {
        self.config.worker_eta_task_limit.unwrap_or(u16::MAX)
    }

    /// Starts consuming `queue` (prefetch applies per queue); `false` if already consuming it.
    async fn add_consumer(self: &Arc<Self>, queue: &str) -> Result<bool> {
        let mut consumers = self.consumers.lock().await;
        if consumers.contains_key(queue) {
            return Ok(false);
        }
        let mut incoming = self
            .broker
            .consume(&[queue.to_string()], self.prefetch())
            .await?;
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let worker = self.clone();
        let forwarding = tokio::spawn(async move {
            loop {
                let delivery = tokio::select! {
                    () = cancel.cancelled() => {
                        // Fetched ahead but not passed on: dropped here, a Redis message would
                        // wait out its visibility timeout in `unacked` before anyone could run it.
                        incoming.close();
                        while let Some(unwanted) = incoming.recv().await {
                            broker::give_back(unwanted).await;
                        }
                        break;
                    }
                    delivery = incoming.recv() => delivery,
                };
                let Some(delivery) = delivery else {
                    worker.lost.cancel();
                    break;
                };
                if let Err(mpsc::error::SendError(unwanted)) =
                    worker.deliveries.send(delivery).await
                {
                    broker::give_back(unwanted).await;
                }
            }
        });
        consumers.insert(queue.to_string(), Consumer { stop, forwarding });
        Ok(true)
    }

    /// Stops consuming `queue`; `false` if it was not consumed.
    async fn cancel_consumer(&self, queue: &str) -> bool {
        match self.consumers.lock().await.remove(queue) {
            Some(consumer) => {
                consumer.stop.cancel();
                true
            }
            None => false,
        }
    }

    /// Grows or shrinks the number of tasks run at once by `n`. A shrink takes effect as
    /// running tasks end, never by stopping one; the pool keeps at least one slot.
    fn resize_pool(&self, grow: bool, n: usize) {
        if grow {
            // A control command's `n` is anyone's number: past the bound it would overflow the
            // semaphore's permits (a panic) or hold a task per slot of a huge pool.
            let n = n.min(MAX_POOL.saturating_sub(self.pool_size.load(Ordering::SeqCst)));
            self.slots.add_permits(n);
            self.pool_size.fetch_add(n, Ordering::SeqCst);
            return;
        }
        let n = n.min(self.pool_size.load(Ordering::SeqCst).saturating_sub(1));
        self.pool_size.fetch_sub(n, Ordering::SeqCst);
        let slots = self.slots.clone();
        tokio::spawn(async move {
            if let Ok(taken) = slots.acquire_many_owned(n as u32).await {
                taken.forget();
            }
        });
    }

    /// The queues consumed now.
    async fn queues(&self) -> Vec<String> {
        self.consumers.lock().await.keys().cloned().collect()
    }

    /// Consumes until `shutdown` resolves (or the `shutdown` control command comes, or the
    /// broker connection is lost), then finishes the tasks already running and gives the ones
    /// not started back to the broker.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let worker = Arc::new(self);
        let mut deliveries = worker
            .received
            .lock()
            .await
            .take()
            .expect("a worker runs once");
        for queue in &worker.initial_queues {
            worker.add_consumer(queue).await?;
        }
        let pidbox = Subscription {
            queue: format!("{}.celery.pidbox", worker.hostname),
            expires_ms: 10_000,
            message_ttl_ms: 300_000,
        };
        let requests = worker
            .broker
            .subscribe(&Exchange::CONTROL, "", &pidbox)
            .await?;
        let control = tokio::spawn(worker.clone().serve_control(requests));
        worker
            .events
            .send("worker-online", worker.heartbeat_fields());
        let heartbeat = tokio::spawn(worker.clone().beat());
        info!(
            hostname = %worker.hostname,
            broker = %redact_url(&worker.config.broker_url),
            queues = ?worker.initial_queues,
            concurrency = worker.config.concurrency(),
            task_events = worker.events.task_events(),
            tasks = ?worker.registry.names(false).collect::<Vec<_>>(),
            "{} ready.",
            worker.hostname
        );
        let mut running = JoinSet::new();
        tokio::pin!(shutdown);
        let lost = loop {
            tokio::select! {
                () = &mut shutdown => break false,
                () = worker.shutdown_requested.cancelled() => break false,
                () = worker.lost.cancelled() => break true,
                Some(delivery) = deliveries.recv() => { running.spawn(worker.clone().handle(delivery)); }
                Some(done) = running.join_next() => {
                    if let Err(error) = done {
                        error!(%error, "message handler failed");
                    }
                }
            }
        };
        let consumers = std::mem::take(&mut *worker.consumers.lock().await);
        for consumer in consumers.values() {
            consumer.stop.cancel();
        }
        // What was fetched but not yet handled goes back to the broker: closing `deliveries`
        // first lets a consumer blocked on a full channel give its message back, and waiting
        // for every consumer means none is still holding one when the process exits.
        deliveries.close();
        for (queue, consumer) in consumers {
            if let Err(error) = consumer.forwarding.await {
                error!(%queue, %error, "consumer failed while stopping");
            }
        }
        while let Some(unwanted) = deliveries.recv().await {
            broker::give_back(unwanted).await;
        }
        worker.stopping.cancel();
        info!(
            tasks = running.len(),
            "stopped consuming; giving back tasks not started, finishing the others"
        );
        let soft_limit =
            Duration::from_secs_f64(worker.config.worker_soft_shutdown_timeout.max(0.0));
        let cold = async {
            worker.cold_shutdown.cancelled().await;
            if !soft_limit.is_zero() {
                warn!(
                    tasks = worker.state.active_count(),
                    seconds = soft_limit.as_secs_f64(),
                    "cold shutdown: running tasks get worker_soft_shutdown_timeout to finish"
                );
                tokio::time::sleep(soft_limit).await;
            }
        };
        let drained = async { while running.join_next().await.is_some() {} };
        let abandoned = tokio::select! {
            () = drained => false,
            () = cold => true,
        };
        if abandoned {
            // Running tasks are dropped unfinished: with acks_late their messages go back to
            // the broker; early-acked ones are lost, as in Celery's cold shutdown.
            warn!(
                tasks = running.len(),
                "cold shutdown: abandoning running tasks"
            );
            running.abort_all();
        }
        heartbeat.abort();
        control.abort();
        worker
            .events
            .send("worker-offline", worker.heartbeat_fields());
        worker.events.close().await;
        if let Err(error) = worker.broker.close().await {
            warn!(%error, "closing the broker connection");
        }
        if lost {
            return Err(Error::ConnectionLost);
        }
        Ok(())
    }

    /// `worker-heartbeat` every `worker_heartbeat_interval` seconds.
    async fn beat(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(
            self.config.worker_heartbeat_interval,
        ));
        ticks.tick().await;
        loop {
            ticks.tick().await;
            self.events
                .send("worker-heartbeat", self.heartbeat_fields());
        }
    }

    /// The fields of `worker-online`, `-heartbeat` and `-offline`.
    fn heartbeat_fields(&self) -> Map<String, Value> {
        let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let loadavg: Vec<f64> = loadavg
            .split_whitespace()
            .take(3)
            .filter_map(|n| n.parse().ok())
            .collect();
        let fields = json!({
            "freq": self.config.worker_heartbeat_interval,
            "active": self.state.active_count(),
            "processed": self.state.processed(),
            "loadavg": loadavg,
            "sw_ident": "rcelery",
            "sw_ver": env!("CARGO_PKG_VERSION"),
            "sw_sys": std::env::consts::OS,
        });
        fields.as_object().cloned().unwrap_or_default()
    }

    async fn handle(self: Arc<Self>, delivery: Delivery) {
        let Delivery {
            message,
            queue,
            redelivered,
            tag,
            settle,
            arrival,
        } = delivery;
        let mut request = match message.and_then(|message| TaskRequest::decode(&message)) {
            Ok(request) => request,
            Err(error) => {
                error!(delivery_tag = %tag, %queue, task_id = ?error.task_id, reason = %error.reason, "rejecting undecodable message");
                self.metrics.rejected(Rejected::Undecodable);
                if let Some(id) = &error.task_id {
                    let exc =
                        ExceptionInfo::new("kombu.exceptions", "DecodeError", error.reason.clone());
                    self.store(failure_meta(id, &exc)).await;
                }
                settle_with(settle.reject(false), &tag).await;
                return;
            }
        };
        let Some(handler) = self.registry.get(&request.task) else {
            error!(task = %request.task, id = %request.id, "received unregistered task");
            self.metrics.rejected(Rejected::Unregistered);
            let exc = ExceptionInfo::celery("NotRegistered", request.task.clone());
            self.events.task(
                "task-failed",
                &request.id,
                fields(json!({"exception": exc.repr(), "traceback": null})),
            );
            self.finish(&request, &queue, state::FAILURE, exc.to_value(), None)
                .await;
            settle_with(settle.ack(), &tag).await;
            return;
        };
        request.redelivered = redelivered;
        self.metrics.received(&request.task);
        if self.discard_if_dead(&request, &queue).await {
            settle_with(settle.ack(), &tag).await;
            return;
        }
        let terminate = self.state.hold(&request, &queue);
        // Held: control requests that came in after it may be answered now.
        drop(arrival);
        self.events
            .task("task-received", &request.id, received_fields(&request));
        // Held unacked until due and until a slot is free: a crash before then gives the message
        // back to the broker, and so does a shutdown. Until due it is held outside the prefetch
        // window, so that messages with far ETAs cannot stop the queue.
        let mut settle = settle;
        let eta_wait = request
            .eta
            .and_then(|eta| (eta - Utc::now()).to_std().ok())
            .filter(|wait| !wait.is_zero());
        if eta_wait.is_some() {
            settle.hold(self.eta_window()).await;
        }
        let due_and_free = async {
            if let Some(wait) = eta_wait {
                tokio::time::sleep(wait).await;
                settle.unhold().await;
            }
            let rate_wait = self
                .rate_limits
                .lock()
                .expect("rate lock")
                .get_mut(&request.task)
                .map(|b| b.reserve(Instant::now()));
            if let Some(wait) = rate_wait.filter(|wait| !wait.is_zero()) {
                tokio::time::sleep(wait).await;
            }
            self.slots.acquire().await
        };
        let slot = tokio::select! {
            slot = due_and_free => slot.ok(),
            () = self.stopping.cancelled() => None,
            () = terminate.cancelled() => None,
        };
        let Some(_slot) = slot else {
            if self.discard_if_dead(&request, &queue).await {
                self.state.release(&request.id);
                settle_with(settle.ack(), &tag).await;
                return;
            }
            info!(task = %request.task, id = %request.id, "giving back a task not started");
            self.state.release(&request.id);
            settle_with(settle.reject(true), &tag).await;
            return;
        };
        if self.discard_if_dead(&request, &queue).await {
            self.state.release(&request.id);
            settle_with(settle.ack(), &tag).await;
            return;
        }
        let options = handler.options();
        let settle = self.ack_early(settle, &tag, &options).await;
        self.state.activate(&request.id, settle.is_none());
        self.events.task("task-started", &request.id, Map::new());
        let stores = self.stores(&request);
        if stores && self.config.task_track_started {
            let started = json!({"pid": std::process::id(), "hostname": self.hostname});
            self.store(self.meta(&request, &queue, state::STARTED, started))
                .await;
        }
        let (context, updates) = TaskContext::new(&request);
        let asked = context.clone();
        let reporter = tokio::spawn(self.clone().report_states(
            request.clone(),
            queue.clone(),
            updates,
            stores,
        ));
        let (hard, soft) = self.time_limits(&request, &options);
        let soft_timer = soft.map(|soft| {
            let context = context.clone();
            tokio::spawn(async move {
                tokio::time::sleep(soft).await;
                context.exceed_soft_limit();
            })
        });
        let hard_deadline = async {
            match hard {
                Some(hard) => tokio::time::sleep(hard).await,
                None => std::future::pending().await,
            }
        };
        let began = Instant::now();
        // Losing a race drops the task's future, which aborts async task code; blocking code
        // cannot be stopped from outside, so its thread is abandoned and its slot freed.
        let ending = tokio::select! {
            outcome = handler.run(self.app.clone(), &request, &self.hostname, context) => Ending::Ran(outcome),
            () = terminate.cancelled() => Ending::Terminated,
            () = hard_deadline => Ending::TimedOut(hard.unwrap_or_default().as_secs_f64()),
        };
        if let Some(timer) = soft_timer {
            timer.abort();
        }
        // Taken now and the context let go: it holds the sender the reporter waits on.
        let added = asked.take_added_to_chord();
        drop(asked);
        let runtime = began.elapsed().as_secs_f64();
        self.metrics.ran(&request.task, runtime);
        // A finished task's reporter ends once its last write is sent, so the final state is
        // what stays. A stopped task's code may live on (blocking code cannot be interrupted)
        // holding its reporter open: that reporter is cut off instead; a write it already sent
        // is still ahead of the final one on the connection.
        match ending {
            Ending::Ran(_) => {
                let _ = reporter.await;
            }
            Ending::Terminated | Ending::TimedOut(_) => reporter.abort(),
        }
        self.state.release(&request.id);
        let ending = match ending {
            Ending::Ran(outcome) => Ending::Ran(self.add_to_chord(&request, added, outcome).await),
            stopped => stopped,
        };
        // Set when the task rejected its message: settled so instead of acked.
        let mut rejected = None;
        // Whether the final state is on record (or none is wanted).
        let ended = match ending {
            Ending::Ran(Outcome::Success(value)) => {
                info!(task = %request.task, id = %request.id, runtime, result = %value, "task succeeded");
                self.events.task(
                    "task-succeeded",
                    &request.id,
                    fields(json!({"result": repr(&value), "runtime": runtime})),
                );
                self.succeed(&request, &queue, value).await
            }
            Ending::Ran(Outcome::Failure(exc)) => {
                error!(task = %request.task, id = %request.id, runtime, exception = %exc.repr(), "task failed");
                self.fail(&request, &queue, exc).await
            }
            Ending::Ran(Outcome::Rejected { exc, requeue }) => {
                warn!(task = %request.task, id = %request.id, requeue, exception = %exc.repr(), "task rejected its message");
                rejected = Some(requeue);
                // A requeued message runs again and stores its state then; one dropped never
                // runs again, so its end is stored now, as Celery's worker does.
                let stored = requeue || self.fail(&request, &queue, exc).await;
                self.events.task(
                    "task-rejected",
                    &request.id,
                    fields(json!({"requeue": requeue})),
                );
                stored
            }
            Ending::Ran(Outcome::Panicked(message))
                if settle.is_some() && self.config.task_reject_on_worker_lost =>
            {
                // No state is stored: the task runs again, as Celery requeues a task whose pool
                // process died. A task that always panics comes back for ever, as in Celery.
                error!(task = %request.task, id = %request.id, %message, "task run lost; giving it back to the broker (task_reject_on_worker_lost)");
                false
            }
            Ending::Ran(Outcome::Panicked(message)) => {
                error!(task = %request.task, id = %request.id, %message, "task run lost");
                let exc = ExceptionInfo::new("billiard.exceptions", "WorkerLostError", message);
                self.fail(&request, &queue, exc).await
            }
            Ending::Ran(Outcome::Replaced(replacement)) => {
                self.replace(&request, &queue, replacement).await
            }
            Ending::Ran(Outcome::Retry { eta, exc, next }) => {
                let max_retries = next
                    .max_retries
                    .or(options.max_retries)
                    .unwrap_or(DEFAULT_MAX_RETRIES);
                if request.retries >= max_retries {
                    error!(task = %request.task, id = %request.id, retries = request.retries, exception = %exc.repr(), "task failed after its last retry");
                    self.fail(&request, &queue, exc).await
                } else {
                    let eta = eta.unwrap_or_else(|| backoff(request.retries, &options));
                    self.retry(&request, &queue, eta, exc, next).await
                }
            }
            Ending::TimedOut(limit) => {
                error!(task = %request.task, id = %request.id, limit, "task stopped at its hard time limit");
                self.fail(
                    &request,
                    &queue,
                    ExceptionInfo::new("celery.exceptions", "TimeLimitExceeded", limit.to_string()),
                )
                .await
            }
            Ending::Terminated => {
                warn!(task = %request.task, id = %request.id, runtime, "task terminated by revoke");
                self.events.task(
                    "task-revoked",
                    &request.id,
                    fields(json!({"terminated": true, "signum": 15, "expired": false})),
                );
                let exc = ExceptionInfo::celery("TaskRevokedError", "terminated");
                self.revoke(&request, &queue, exc).await
            }
        };
        match (settle, rejected) {
            (Some(settle), Some(requeue)) => settle_with(settle.reject(requeue), &tag).await,
            (Some(settle), None) if ended => settle_with(settle.ack(), &tag).await,
            // With acks_late, a run whose end is not on record goes back to the broker and runs
            // again: a duplicate run is better than a caller waiting for ever.
            (Some(settle), None) => {
                warn!(task = %request.task, id = %request.id, "giving the message back: its run did not end on record");
                settle_with(settle.reject(true), &tag).await;
            }
            (None, _) => {}
        }
    }

    /// Sends what follows a success (link callbacks, the next chain step), then stores SUCCESS
    /// with them as its children, as Celery does: a redelivered message whose result has
    /// children is known to have sent them. Then counts the task in its chord, if any. `false`
    /// when any of the three failed (all are tried).
    async fn succeed(&self, request: &TaskRequest, queue: &str, value: Value) -> bool {
        // Checked before the canvas: a result too large to store is not passed on either.
        if let Some(exc) = oversized(&value, self.config.result_max_bytes) {
            error!(task = %request.task, id = %request.id, "task result over result_max_bytes; stored as FAILURE");
            return Box::pin(self.fail(request, queue, exc)).await;
        }
        let sent = match canvas::after_success(request, &value) {
            Ok(sent) => sent,
            Err(error) => {
                // As in Celery, a canvas that cannot be followed fails the task that carries it.
                error!(task = %request.task, id = %request.id, %error, "cannot follow the task's links or chain");
                let exc = ExceptionInfo::builtin(
                    "ValueError",
                    format!("cannot follow the canvas: {error}"),
                );
                return Box::pin(self.fail(request, queue, exc)).await;
            }
        };
        self.metrics.ended(&request.task, Ended::Succeeded);
        let dispatched = self.send_next(sent.next).await;
        let stored = !self.stores(request) || {
            let mut meta = self.meta(request, queue, state::SUCCESS, value.clone());
            meta.children = sent.children;
            self.store(meta).await
        };
        let joined = self
            .join_chord(request, queue, state::SUCCESS, &value)
            .await;
        dispatched && stored && joined
    }

    /// Counts a chord header member in its chord (Celery's Redis join, shared with Python
    /// workers). The member that completes the chord sends the body with every member's result,
    /// or, when one failed, fails the body with `ChordError`. `false` when the count or the body
    /// could not be recorded: the claim is given back, so the member's next delivery completes
    /// the chord.
    async fn join_chord(
        &self,
        request: &TaskRequest,
        queue: &str,
        status: &str,
        result: &Value,
    ) -> bool {
        let (Some(backend), Some(chord_id)) = (&self.backend, &request.group) else {
            return true;
        };
        let body = match canvas::chord_of(request) {
            Ok(Some(body)) => body,
            Ok(None) => return true,
            Err(error) => {
                error!(task = %request.task, id = %request.id, %error, "cannot read the chord body");
                return true;
            }
        };
        let member = chord::Member {
            task_id: request.id.clone(),
            state: status.to_string(),
            result: result.clone(),
        };
        let (members, claim) = match chord::count(backend, chord_id, request.group_index, &member)
            .await
        {
            Ok(chord::Join::Waiting) => return true,
            Ok(chord::Join::Complete { members, claim }) => (members, claim),
            Err(error) => {
                error!(chord = %chord_id, id = %request.id, %error, "cannot count the chord member");
                return false;
            }
        };
        let failed = chord::failure(&members);
        let results = members.into_iter().map(|m| m.result).collect();
        let recorded = match failed {
            None => canvas::chord_body(&body, request, results).map(|next| (next, None)),
            Some(exc) => canvas::failed_chord_body(&body, request)
                .map(|(next, never)| (next, Some((exc, never)))),
        };
        let recorded = match recorded {
            Ok((next, None)) => {
                info!(chord = %chord_id, body = %body.task, "chord complete; sending its body");
                self.send_next(next).await
            }
            Ok((next, Some((exc, never)))) => {
                error!(chord = %chord_id, exception = %exc.repr(), "chord failed");
                let mut all = true;
                for Next {
                    request: body,
                    queue: body_queue,
                    ..
                } in next
                {
                    let queue = body_queue.unwrap_or_else(|| queue.to_string());
                    all &= Box::pin(self.fail(&body, &queue, exc.clone())).await;
                }
                all & Box::pin(self.fail_never_run(never, queue, &exc)).await
            }
            Err(error) => {
                error!(chord = %chord_id, %error, "cannot start the chord body");
                let exc = ExceptionInfo::celery("ChordError", format!("Join error: {error}"));
                let mut all = true;
                for id in body.final_ids() {
                    all &= self.store(failure_meta(&id, &exc)).await;
                }
                all
            }
        };
        let settled = match recorded {
            true => chord::finish(backend, chord_id, &claim).await,
            false => chord::release(backend, chord_id, &claim).await,
        };
        if let Err(error) = settled {
            warn!(chord = %chord_id, %error, "cannot settle the chord's claim; it expires by itself");
        }
        recorded
    }

    /// Stores FAILURE with `exc` and tells Flower; then fails the chain steps that will now never
    /// run (counting them in their chord, if any), and sends the errbacks. `false` when any of it
    /// could not be done.
    async fn fail(&self, request: &TaskRequest, queue: &str, exc: ExceptionInfo) -> bool {
        // A chord body that cannot start fails here too, and it may be any task, of any
        // language: only this worker's own tasks are labels.
        if self.registry.get(&request.task).is_some() {
            self.metrics.ended(&request.task, Ended::Failed);
        }
        let tb = traceback(&exc);
        self.events.task(
            "task-failed",
            &request.id,
            fields(json!({"exception": exc.repr(), "traceback": tb})),
        );
        let mut done = self
            .finish(
                request,
                queue,
                state::FAILURE,
                exc.to_value(),
                Some(tb.clone()),
            )
            .await;
        done &= self
            .join_chord(request, queue, state::FAILURE, &exc.to_value())
            .await;
        let takes_the_failed_request = |errback: &canvas::Signature| {
            self.registry.get(&errback.task).is_some_and(|handler| {
                canvas::takes_the_failed_request(errback, handler.parameters())
            })
        };
        let failed = canvas::after_failure(request, takes_the_failed_request).unwrap_or_else(|error| {
            error!(task = %request.task, id = %request.id, %error, "cannot follow the task's errbacks or chain");
            canvas::Failed { sent: Vec::new(), called: Vec::new(), never: Vec::new() }
        });
        done &= self.fail_never_run(failed.never, queue, &exc).await;
        for errback in &failed.called {
            let call =
                canvas::called_errback(errback, request, exc.to_value(), Value::from(tb.clone()));
            Box::pin(self.call_errback(call)).await;
        }
        done & self.send_next(failed.sent).await
    }

    /// Runs an errback of this worker's own here and now, as Celery's worker calls a "new style"
    /// errback: no result is stored and nothing follows it; a failure is only logged.
    async fn call_errback(&self, call: TaskRequest) {
        let Some(handler) = self.registry.get(&call.task) else {
            return;
        };
        let (context, _updates) = TaskContext::new(&call);
        match handler
            .run(self.app.clone(), &call, &self.hostname, context)
            .await
        {
            Outcome::Success(_) => {
                info!(errback = %call.task, failed = ?call.parent_id, "errback called")
            }
            outcome => {
                warn!(errback = %call.task, failed = ?call.parent_id, ?outcome, "errback raised an exception")
            }
        }
    }

    /// Stores FAILURE with `exc` for chain steps that will never run, counting each in its
    /// chord, if any. `false` when any of it could not be done.
    async fn fail_never_run(
        &self,
        never: Vec<TaskRequest>,
        queue: &str,
        exc: &ExceptionInfo,
    ) -> bool {
        let mut done = true;
        for step in never {
            let mut meta = failure_meta(&step.id, exc);
            meta.parent_id = step.parent_id.clone();
            meta.group_id = step.group.clone();
            done &= self.store(meta).await;
            done &= self
                .join_chord(&step, queue, state::FAILURE, &exc.to_value())
                .await;
        }
        done
    }

    /// Publishes the tasks a finished task sends, each to the queue its options name or its
    /// route, opening each chord before its first header member; `false` when one could not be
    /// sent. When a chord cannot be opened, none of its members is sent.
    async fn send_next(&self, next: Vec<Next>) -> bool {
        let mut all_sent = true;
        let mut unopened: Vec<String> = Vec::new();
        for Next {
            mut request,
            queue,
            opens_chords,
        } in next
        {
            let mut opened = true;
            for (chord_id, size) in opens_chords {
                if let Err(error) = chord::open(self.backend.as_ref(), &chord_id, size).await {
                    error!(chord = %chord_id, %error, "cannot start the chord");
                    all_sent = false;
                    opened = false;
                    unopened.push(chord_id);
                }
            }
            if !opened || request.group.as_ref().is_some_and(|g| unopened.contains(g)) {
                continue;
            }
            request.origin = Some(self.hostname.clone());
            let queue = queue.unwrap_or_else(|| self.config.queue_for(&request.task).to_string());
            if let Err(error) = self.broker.publish(&queue, &request.encode()).await {
                error!(task = %request.task, id = %request.id, %queue, %error, "cannot send the next task");
                all_sent = false;
            }
        }
        all_sent
    }

    /// Counts in the task's chord what the task added to it, and sends it, before the task
    /// itself counts (see [`crate::add_to_chord`]); then the task ends with `outcome`. A task
    /// in no chord, or whose additions cannot be followed or counted, fails instead.
    async fn add_to_chord(
        &self,
        request: &TaskRequest,
        added: Vec<Signature>,
        outcome: Outcome,
    ) -> Outcome {
        if added.is_empty() {
            return outcome;
        }
        if let Some(reason) = add_to_chord::refusal(request) {
            return Outcome::Failure(ExceptionInfo::builtin("ValueError", reason));
        }
        let (Some(backend), Some(chord_id)) = (&self.backend, &request.group) else {
            let reason = "adding to a chord needs a result backend";
            return Outcome::Failure(ExceptionInfo::builtin("ValueError", reason));
        };
        let count = added.len();
        let next = match add_to_chord::plan(request, added) {
            Ok(next) => next,
            Err(error) => {
                let message = format!("cannot follow the canvas: {error}");
                return Outcome::Failure(ExceptionInfo::builtin("ValueError", message));
            }
        };
        if let Err(error) = chord::extend(backend, chord_id, count).await {
            error!(chord = %chord_id, id = %request.id, %error, "cannot add to the chord");
            let message = format!("cannot add to the chord: {error}");
            return Outcome::Failure(ExceptionInfo::builtin("RuntimeError", message));
        }
        if !self.send_next(next).await {
            // Counted but not all sent: the chord waits for what is missing until it expires.
            error!(chord = %chord_id, id = %request.id, "cannot send all that was added to the chord");
        }
        outcome
    }

    /// Sends `replacement` in place of the task (see [`crate::replace`]), storing nothing for
    /// the task itself: its id's result is the replacement's. A replacement Celery refuses
    /// fails the task with `ImproperlyConfigured`, as the task would have raised it; one that
    /// cannot be followed fails it as any canvas does. `false` when the replacement (or the
    /// failure) is not on its way.
    async fn replace(&self, request: &TaskRequest, queue: &str, replacement: Signature) -> bool {
        if let Some(reason) = replace::refusal(&replacement) {
            error!(task = %request.task, id = %request.id, reason, "task cannot be replaced");
            let exc = ExceptionInfo::celery("ImproperlyConfigured", reason);
            return self.fail(request, queue, exc).await;
        }
        match replace::plan(request, replacement) {
            Ok(next) => {
                info!(task = %request.task, id = %request.id, by = %next.first().map_or("", |n| n.request.task.as_str()), "task replaced");
                self.send_next(next).await
            }
            Err(error) => {
                error!(task = %request.task, id = %request.id, %error, "cannot follow the task's replacement");
                let exc = ExceptionInfo::builtin(
                    "ValueError",
                    format!("cannot follow the canvas: {error}"),
                );
                self.fail(request, queue, exc).await
            }
        }
    }

    /// Stores RETRY, then sends the task again as Celery does: same id, one more retry, due at
    /// `eta`, with itself as parent. Only then is the original acked (by the caller), so a crash
    /// in between runs it twice rather than never. `false` when the retry is not on its way.
    async fn retry(
        &self,
        request: &TaskRequest,
        queue: &str,
        eta: chrono::DateTime<Utc>,
        exc: ExceptionInfo,
        next: NextRun,
    ) -> bool {
        let tb = traceback(&exc);
        info!(task = %request.task, id = %request.id, retries = request.retries + 1, %eta, exception = %exc.repr(), "task will retry");
        self.events.task(
            "task-retried",
            &request.id,
            fields(json!({"exception": exc.repr(), "traceback": tb})),
        );
        if self.stores(request) {
            let mut meta = self.meta(request, queue, state::RETRY, exc.to_value());
            meta.traceback = Some(tb);
            self.store(meta).await;
        }
        let mut again = request.clone();
        again.retries += 1;
        again.eta = Some(eta);
        again.parent_id = Some(request.id.clone());
        if let Some(args) = next.args {
            again.args = args;
        }
        if let Some(kwargs) = next.kwargs {
            again.kwargs = kwargs;
        }
        if let Some(expires) = next.expires {
            again.expires = Some(Utc::now() + crate::raise::seconds_from_now(expires));
        }
        match self.broker.publish(queue, &again.encode()).await {
            Ok(()) => {
                self.metrics.ended(&request.task, Ended::Retried);
                true
            }
            Err(error) => {
                error!(id = %request.id, %error, "cannot send the retry");
                self.fail(
                    request,
                    queue,
                    ExceptionInfo::builtin(
                        "RuntimeError",
                        format!("retry could not be sent: {error}"),
                    ),
                )
                .await
            }
        }
    }

    /// `(hard, soft)` seconds: the message's `timelimit`, else the task's options, else config.
    fn time_limits(
        &self,
        request: &TaskRequest,
        options: &celery::task::TaskOptions,
    ) -> (Option<Duration>, Option<Duration>) {
        let hard = request
            .timelimit
            .0
            .or(options.hard_time_limit.map(f64::from))
            .or(self.config.task_time_limit);
        let soft = request
            .timelimit
            .1
            .or(options.time_limit.map(f64::from))
            .or(self.config.task_soft_time_limit);
        (time_limit(hard), time_limit(soft))
    }

    /// Acks now unless the task acks late (its own `acks_late`, else `task_acks_late`); returns
    /// the settlement still owed.
    async fn ack_early(
        &self,
        settle: Settle,
        tag: &str,
        options: &celery::task::TaskOptions,
    ) -> Option<Settle> {
        if options.acks_late.unwrap_or(self.config.task_acks_late) {
            return Some(settle);
        }
        settle_with(settle.ack(), tag).await;
        None
    }

    /// Stores REVOKED (and tells Flower) for a request revoked (by id or by one of its stamps) or
    /// expired before it ran.
    async fn discard_if_dead(&self, request: &TaskRequest, queue: &str) -> bool {
        let expired = request.expires.is_some_and(|expires| expires <= Utc::now());
        let by_id = self.state.is_revoked(&request.id);
        let by_stamp = match expired || by_id {
            true => None,
            false => self.state.revoked_stamp(request),
        };
        if !expired && !by_id && by_stamp.is_none() {
            return false;
        }
        let reason = if expired { "expired" } else { "revoked" };
        warn!(task = %request.task, id = %request.id, reason, ?by_stamp, "discarding task");
        self.events.task(
            "task-revoked",
            &request.id,
            fields(json!({"terminated": false, "signum": null, "expired": expired})),
        );
        let exc = ExceptionInfo::celery("TaskRevokedError", reason);
        self.revoke(request, queue, exc).await;
        true
    }

    /// Stores REVOKED with `exc` and counts the task in its chord, if any (a revoked member
    /// fails the chord, as in Celery); `false` when either could not be recorded.
    async fn revoke(&self, request: &TaskRequest, queue: &str, exc: ExceptionInfo) -> bool {
        self.metrics.ended(&request.task, Ended::Revoked);
        let stored = self
            .finish(request, queue, state::REVOKED, exc.to_value(), None)
            .await;
        let joined = self
            .join_chord(request, queue, state::REVOKED, &exc.to_value())
            .await;
        stored && joined
    }

    /// Stores REVOKED for revoked `ids` that no worker has begun, as Celery's worker does on a
    /// revoke, so a caller waiting on a task revoked before any worker took it learns at once.
    /// A task running here, started elsewhere (STARTED or a custom state) or ended is left to
    /// whoever runs or ran it.
    pub(super) async fn store_revoked(&self, ids: &[String]) {
        let Some(backend) = &self.backend else {
            return;
        };
        for id in ids.iter().filter(|id| !self.state.is_active(id)) {
            let current = match backend.get(id).await {
                Ok(meta) => meta.map(|meta| meta.status),
                Err(error) => {
                    warn!(%id, %error, "cannot read the state of a revoked task; not storing REVOKED");
                    continue;
                }
            };
            if not_begun(current.as_deref()) {
                let exc = ExceptionInfo::celery("TaskRevokedError", "revoked");
                self.store(ResultMeta::new(
                    id,
                    state::REVOKED,
                    exc.to_value(),
                    Utc::now(),
                ))
                .await;
            }
        }
    }

    /// Writes each state the task reports, the newest one each time, until the task ends.
    async fn report_states(
        self: Arc<Self>,
        request: TaskRequest,
        queue: String,
        mut updates: Updates,
        stores: bool,
    ) {
        while updates.changed().await.is_ok() {
            let Some(update) = updates.borrow_and_update().clone() else {
                continue;
            };
            let event = format!("task-{}", update.state.to_ascii_lowercase());
            self.events.task(
                &event,
                &request.id,
                fields(json!({"state": update.state, "meta": update.meta})),
            );
            if stores {
                self.store(self.meta(&request, &queue, &update.state, update.meta))
                    .await;
            }
        }
    }

    fn stores(&self, request: &TaskRequest) -> bool {
        self.backend.is_some() && !request.ignore_result && !self.config.task_ignore_result
    }

    /// Stores a final state unless the request asked for no result; `false` when it could not
    /// be stored.
    async fn finish(
        &self,
        request: &TaskRequest,
        queue: &str,
        status: &str,
        result: Value,
        traceback: Option<String>,
    ) -> bool {
        if !self.stores(request) {
            return true;
        }
        let mut meta = self.meta(request, queue, status, result);
        meta.traceback = traceback;
        self.store(meta).await
    }

    fn meta(&self, request: &TaskRequest, queue: &str, status: &str, result: Value) -> ResultMeta {
        let mut meta = ResultMeta::new(&request.id, status, result, Utc::now());
        meta.group_id = request.group.clone();
        meta.parent_id = request.parent_id.clone();
        if self.config.result_extended {
            meta.extended = Some(Extended {
                name: request.task.clone(),
                args: request.args.clone(),
                kwargs: request.kwargs.clone(),
                worker: self.hostname.clone(),
                retries: request.retries,
                queue: queue.to_string(),
            });
        }
        meta
    }

    /// Writes `meta`, trying again through a short backend outage (the connection reconnects
    /// by itself); `false` when every try failed.
    async fn store(&self, meta: ResultMeta) -> bool {
        let Some(backend) = &self.backend else {
            return true;
        };
        let mut pause = Duration::from_millis(100);
        for attempt in 1..=STORE_ATTEMPTS {
            match backend.store(&meta).await {
                Ok(_) => return true,
                Err(error) if attempt < STORE_ATTEMPTS => {
                    warn!(id = %meta.task_id, status = %meta.status, attempt, %error, "cannot store result yet; trying again");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(error) => {
                    error!(id = %meta.task_id, status = %meta.status, %error, "cannot store result");
                }
            }
        }
        false
    }
}

/// When a retry without its own ETA runs: 2^retries seconds within the task's
/// `[min_retry_delay, max_retry_delay]`, plus up to a second of jitter so retries spread out.
fn backoff(retries: u32, options: &celery::task::TaskOptions) -> chrono::DateTime<Utc> {
    let max = options.max_retry_delay.unwrap_or(3600);
    let min = options.min_retry_delay.unwrap_or(0).min(max);
    let seconds = 2u32.checked_pow(retries).unwrap_or(max).clamp(min, max);
    let jitter_ms = (uuid::Uuid::new_v4().as_u128() % 1000) as i64;
    Utc::now()
        + chrono::Duration::seconds(i64::from(seconds))
        + chrono::Duration::milliseconds(jitter_ms)
}

/// Messages held per queue: `worker_concurrency × worker_prefetch_multiplier`.
fn prefetch_of(config: &CeleryConfig) -> u16 {
    let prefetch = config.concurrency() * usize::from(config.worker_prefetch_multiplier);
    u16::try_from(prefetch).unwrap_or(u16::MAX)
}

/// The fields of `task-received`, as Flower reads them.
fn received_fields(request: &TaskRequest) -> Map<String, Value> {
    let iso = |t: Option<chrono::DateTime<Utc>>| t.map(|t| t.to_rfc3339());
    fields(json!({
        "name": request.task,
        "args": repr_args(&request.args),
        "kwargs": repr(&Value::Object(request.kwargs.clone())),
        "root_id": request.root_id,
        "parent_id": request.parent_id,
        "retries": request.retries,
        "eta": iso(request.eta),
        "expires": iso(request.expires),
    }))
}

fn fields(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// The error a result of more than `max` bytes of JSON is stored as (none when `max` is 0, no
/// cap). Counted as it is written, without making the text.
fn oversized(value: &Value, max: u64) -> Option<ExceptionInfo> {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).ok()?;
    (max > 0 && count.0 > max).then(|| {
        ExceptionInfo::builtin(
            "ValueError",
            format!(
                "result of {} bytes is over result_max_bytes ({max}); not stored",
                count.0
            ),
        )
    })
}

/// The traceback text stored with an exception state.
fn traceback(exc: &ExceptionInfo) -> String {
    format!("{}.{}: {}", exc.exc_module, exc.exc_type, exc.message())
}

/// The FAILURE meta of task `id` that ended with `exc`, for a task this worker did not run
/// itself (an undecodable message, a chain step that never ran, a chord body that cannot start).
fn failure_meta(id: &str, exc: &ExceptionInfo) -> ResultMeta {
    let mut meta = ResultMeta::new(id, state::FAILURE, exc.to_value(), Utc::now());
    meta.traceback = Some(traceback(exc));
    meta
}

async fn settle_with(settlement: impl std::future::Future<Output = Result<()>>, tag: &str) {
    if let Err(error) = settlement.await {
        error!(delivery_tag = %tag, %error, "cannot settle message with the broker");
    }
}

/// Whether a task in `status` (`None`: nothing stored) has not been begun by any worker: no
/// state yet, or only received, retrying or rejected.
fn not_begun(status: Option<&str>) -> bool {
    matches!(
        status,
        None | Some(state::PENDING | state::RETRY | "RECEIVED" | "REJECTED")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoke_stores_revoked_only_for_tasks_no_worker_has_begun() {
        for status in [
            None,
            Some("PENDING"),
            Some("RETRY"),
            Some("RECEIVED"),
            Some("REJECTED"),
        ] {
            assert!(not_begun(status), "{status:?}");
        }
        for status in ["STARTED", "PROGRESS", "SUCCESS", "FAILURE", "REVOKED"] {
            assert!(!not_begun(Some(status)), "{status}");
        }
    }
}
