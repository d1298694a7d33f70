//! The dispatcher: takes task messages from the broker and runs them as Celery's worker would.
//!
//! Per message: decode (undecodable → logged with its delivery tag and rejected); look the task
//! up (unknown → FAILURE `NotRegistered`, acked); drop it as REVOKED when revoked or expired;
//! hold it unacked until its ETA and a free slot of `worker_concurrency`; ack (now, or after the
//! run with `task_acks_late`); store STARTED, the task's own states, then SUCCESS or FAILURE;
//! send the matching events. Nothing a message contains can stop the loop.
//!
//! This file holds the node itself: its consumers, one per queue, and the run loop from ready to
//! warm or cold shutdown. The rest, one job a file:
//! - [`node`]: the node's name and the crate's app handle;
//! - [`message`]: one message's life, from decoding to its settlement;
//! - [`outcome`]: recording how a run ended (success, failure, retry, revoke) and its states;
//! - [`chord_join`]: counting a task in its chord and starting the chord's body;
//! - [`next_steps`]: sending what the canvas planner says comes next, and replacements;
//! - [`control`]: Celery's remote control (pidbox) for this node.

mod chord_join;
mod control;
mod message;
mod next_steps;
mod node;
mod outcome;

pub use node::{app_handle, expand_hostname};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celery::Celery;
use serde_json::{json, Map, Value};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::backend::RedisBackend;
use crate::broker::{self, Broker, Delivery, Exchange, Subscription};
use crate::config::{CeleryConfig, RateLimitScope};
use crate::error::{Error, Result};
use crate::events::{Clock, Events};
use crate::metrics::WorkerMetrics;
use crate::rate::TokenBucket;
use crate::registry::Registry;
use crate::state::WorkerState;
use crate::urls::redact_url;

/// One queue's consumer: a task starting the handling of each message the broker delivers.
struct Consumer {
    /// Stops it; it gives back what it fetched and did not start, then ends.
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
    /// One consumer per queue; `add_consumer`/`cancel_consumer` change the set while the
    /// worker runs.
    consumers: Mutex<BTreeMap<String, Consumer>>,
    /// The messages being handled, each in a runtime task of its own started by its consumer
    /// (no hop through a shared loop).
    running: TaskTracker,
    /// Cancelled at the end of a cold shutdown: messages still being handled are dropped.
    abandoned: CancellationToken,
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

/// The most tasks one worker runs at once, however far `pool_grow` asks it to grow.
const MAX_POOL: usize = 10_000;

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
            running: TaskTracker::new(),
            abandoned: CancellationToken::new(),
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

    /// How long a message of `task` waits for its rate limit before it may start: a start
    /// reserved from this worker's bucket or, with `task_rate_limit_scope = "cluster"`, from
    /// the one all workers share in Redis, at the rate this worker has now (so a `rate_limit`
    /// control command, broadcast to every worker, changes the shared spacing).
    async fn rate_wait(&self, task: &str) -> Duration {
        let shared = self
            .backend
            .as_ref()
            .filter(|_| self.config.task_rate_limit_scope == RateLimitScope::Cluster);
        let (per_second, backend) = {
            let mut limits = self.rate_limits.lock().expect("rate lock");
            let Some(bucket) = limits.get_mut(task) else {
                return Duration::ZERO;
            };
            match shared {
                Some(backend) => (bucket.per_second(), backend),
                None => return bucket.reserve(Instant::now()),
            }
        };
        // Fails closed while Redis is unreachable; the caller's select ends the wait at
        // shutdown or on a revoke.
        let key = crate::rate::cluster_key(task);
        crate::rate::reserve_shared_or_hold(|| backend.connection(), &key, per_second).await
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
                worker.start(delivery);
            }
        });
        consumers.insert(queue.to_string(), Consumer { stop, forwarding });
        Ok(true)
    }

    /// Handles `delivery` in a runtime task of its own, dropped unfinished if a cold shutdown
    /// abandons it.
    fn start(self: &Arc<Self>, delivery: Delivery) {
        let worker = self.clone();
        self.running.spawn(async move {
            let abandoned = worker.abandoned.clone();
            abandoned.run_until_cancelled(worker.handle(delivery)).await;
        });
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
        let lost = tokio::select! {
            () = shutdown => false,
            () = worker.shutdown_requested.cancelled() => false,
            () = worker.lost.cancelled() => true,
        };
        let consumers = std::mem::take(&mut *worker.consumers.lock().await);
        for consumer in consumers.values() {
            consumer.stop.cancel();
        }
        // What was fetched but not yet started goes back to the broker: waiting for every
        // consumer means none is still holding a message when the process exits.
        for (queue, consumer) in consumers {
            if let Err(error) = consumer.forwarding.await {
                error!(%queue, %error, "consumer failed while stopping");
            }
        }
        worker.running.close();
        worker.stopping.cancel();
        info!(
            tasks = worker.running.len(),
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
        let abandoned = tokio::select! {
            () = worker.running.wait() => false,
            () = cold => true,
        };
        if abandoned {
            // Running tasks are dropped unfinished: with acks_late their messages go back to
            // the broker; early-acked ones are lost, as in Celery's cold shutdown.
            warn!(
                tasks = worker.running.len(),
                "cold shutdown: abandoning running tasks"
            );
            worker.abandoned.cancel();
            worker.running.wait().await;
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
}

/// Messages held per queue: `worker_concurrency × worker_prefetch_multiplier`.
fn prefetch_of(config: &CeleryConfig) -> u16 {
    let prefetch = config.concurrency() * usize::from(config.worker_prefetch_multiplier);
    u16::try_from(prefetch).unwrap_or(u16::MAX)
}

fn fields(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}
