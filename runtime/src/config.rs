//! The one typed configuration, loaded from `celeryconfig.toml` with `CELERY_*` overrides.
//!
//! Settings carry Celery's own names so a Python team reads them without a glossary. Every
//! key of the struct can be overridden by the environment variable of the same name upper-cased
//! and prefixed with `CELERY_` (`broker_url` ← `CELERY_BROKER_URL`). Unknown keys in the file and
//! values of the wrong type are errors at start, never silently ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::schedule::BeatEntry;
use crate::urls::{
    failover_urls, is_sentinel_url, is_tls_url, redact_url, BrokerKind, SentinelList,
};

/// Where a task goes when the sender names no queue: `"queue"` or `{ queue = "..." }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Route {
    /// The plain queue name form.
    Queue(String),
    /// The table form Celery also accepts.
    Table {
        /// Name of the queue the task is published to.
        queue: String,
    },
}

impl Route {
    /// The queue this route sends to.
    pub fn queue(&self) -> &str {
        match self {
            Route::Queue(queue) | Route::Table { queue } => queue,
        }
    }
}

/// A RabbitMQ queue type, as Celery's `task_default_queue_type` names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// RabbitMQ's classic queue, Celery's default.
    #[default]
    Classic,
    /// A replicated quorum queue: per-consumer QoS only, and ETAs by native delayed delivery.
    Quorum,
}

/// `broker_transport_options`: the Redis transport's recovery settings and, for a
/// `sentinel://` broker, the master's name, as kombu names them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportOptions {
    /// Seconds a delivered, unacked message may stay with a consumer before another consumer
    /// restores it to its queue (a consumer that died holding it).
    pub visibility_timeout: u64,
    /// The name the sentinels of a `sentinel://` broker know the Redis master by.
    pub master_name: Option<String>,
    /// How to log in to those sentinels.
    pub sentinel_kwargs: Option<SentinelKwargs>,
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            visibility_timeout: 3600,
            master_name: None,
            sentinel_kwargs: None,
        }
    }
}

/// `broker_failover_strategy`: the order the URLs of a failover `broker_url` are tried in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum FailoverStrategy {
    /// In the list's order, going on after the URL of the last connection.
    #[default]
    #[serde(rename = "round-robin")]
    RoundRobin,
    /// In a new random order at each connect.
    #[serde(rename = "shuffle")]
    Shuffle,
}

/// `result_backend_transport_options`: for a `sentinel://` result backend, the master's name,
/// as Celery's Sentinel backend reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendTransportOptions {
    /// The name the sentinels of a `sentinel://` result backend know the Redis master by.
    pub master_name: Option<String>,
    /// How to log in to those sentinels.
    pub sentinel_kwargs: Option<SentinelKwargs>,
}

/// `sentinel_kwargs`: the keys of redis-py's that apply here, the sentinels' own credentials
/// (the master's are those of the first URL of the list).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SentinelKwargs {
    /// ACL user of the sentinels.
    pub username: Option<String>,
    /// Password of the sentinels (`requirepass` of their configuration).
    pub password: Option<String>,
}

/// `cert_reqs` of a TLS setting: Python's `ssl` constants by name (and the lower-case forms
/// Celery's `rediss://` URLs use).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum CertReqs {
    /// The server's certificate must chain to a trusted root and name the host.
    #[default]
    #[serde(rename = "CERT_REQUIRED", alias = "required")]
    Required,
    /// Treated as required: a server always presents a certificate, and Python's client-side
    /// `CERT_OPTIONAL` then verifies it just the same.
    #[serde(rename = "CERT_OPTIONAL", alias = "optional")]
    Optional,
    /// No verification at all (warned at every connect): for test set-ups only.
    #[serde(rename = "CERT_NONE", alias = "none")]
    None,
}

/// `broker_use_ssl` / `redis_backend_use_ssl`: the keys of Celery's dict that apply here, by
/// their AMQP names or their Redis names (`ssl_ca_certs`, ...), as Celery spells them for each.
/// TLS itself is asked for by the URL (`amqps://`, `rediss://`); these settings say how.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SslOptions {
    /// PEM file of CA certificates trusted besides the system's roots.
    #[serde(alias = "ssl_ca_certs")]
    pub ca_certs: Option<PathBuf>,
    /// Whether the server's certificate is verified.
    #[serde(alias = "ssl_cert_reqs")]
    pub cert_reqs: CertReqs,
    /// PEM client certificate (chain), for servers that require one; needs `keyfile`.
    #[serde(alias = "ssl_certfile")]
    pub certfile: Option<PathBuf>,
    /// PEM private key of `certfile`.
    #[serde(alias = "ssl_keyfile")]
    pub keyfile: Option<PathBuf>,
}

impl SslOptions {
    /// Whether the server's certificate is checked.
    pub fn verifies(&self) -> bool {
        self.cert_reqs != CertReqs::None
    }

    fn validate(&self, setting: &str) -> Result<()> {
        if self.certfile.is_some() != self.keyfile.is_some() {
            return Err(Error::Config(format!(
                "{setting}: certfile and keyfile go together"
            )));
        }
        Ok(())
    }
}

/// `task_rate_limit_scope`: who a task's `rate_limit` counts starts across.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitScope {
    /// Each worker keeps the limit on its own, as Celery does: N workers start up to N times it.
    #[default]
    Worker,
    /// All workers together keep it, through a limiter in the result backend's Redis.
    Cluster,
}

/// Per-task settings of `task_annotations`, as Celery's annotations set task attributes.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskAnnotation {
    /// `"10/s"`, `"100/m"`, `"1000/h"`: task starts allowed per unit of time on one worker.
    pub rate_limit: Option<String>,
    /// Seconds: every send of the task from our client and web app is unique
    /// ([`crate::unique`]) for this long unless the call asks for another duration. Read by the
    /// senders, not the worker: the lock is taken where the task is sent.
    pub unique_for: Option<f64>,
}

/// Every setting the worker, the client and the web app read.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CeleryConfig {
    /// `amqp://`, `amqps://`, `pyamqp://`, `redis://` or `rediss://`; Celery's failover list
    /// of them, `;`-separated in one string or as a list (`["amqp://a//", "amqp://b//"]`); or a
    /// Sentinel list (`sentinel://host:port;sentinel://...`, with
    /// `broker_transport_options.master_name`).
    #[serde(deserialize_with = "url_list")]
    pub broker_url: String,
    /// How the URLs of a failover `broker_url` are tried: `round-robin` or `shuffle`.
    pub broker_failover_strategy: FailoverStrategy,
    /// `redis://...`, `rediss://...` or a Sentinel list (with
    /// `result_backend_transport_options.master_name`); `None` stores no results.
    pub result_backend: Option<String>,
    /// Settings of the result backend's connection (Sentinel: `master_name`).
    pub result_backend_transport_options: BackendTransportOptions,
    /// RabbitMQ's management API, as Flower's `broker_api` names it
    /// (`http://user:password@host:15672/api/`): where `GET /queues` reads what AMQP does not
    /// tell (unacknowledged messages, publish and ack rates). Unset, it uses passive declares.
    pub broker_api: Option<String>,
    /// Transport tuning (Redis: `visibility_timeout`; Sentinel: `master_name`).
    pub broker_transport_options: TransportOptions,
    /// TLS settings of an `amqps://` or `rediss://` broker, or of a Sentinel broker's master.
    pub broker_use_ssl: Option<SslOptions>,
    /// TLS settings of a `rediss://` result backend, or of a Sentinel backend's master.
    pub redis_backend_use_ssl: Option<SslOptions>,
    /// Queue used when a task has no route and the sender names none.
    pub task_default_queue: String,
    /// Type of `task_default_queue` where we declare it (RabbitMQ). A queue that already
    /// exists is used as it was declared, whatever its type.
    pub task_default_queue_type: QueueType,
    /// Publishers may create a queue that does not exist (Celery's default). Off, the client
    /// and the web app publish only to the queues the settings name and those that exist.
    pub task_create_missing_queues: bool,
    /// Type of every other queue we declare because it does not exist yet (RabbitMQ).
    pub task_create_missing_queue_type: QueueType,
    /// Type of the exchange of `task_default_queue`'s name where we declare it: `direct`,
    /// `topic` (which native delayed delivery needs), `fanout` or `headers`.
    pub task_default_exchange_type: String,
    /// Type of the exchange of every other queue we declare; unset, `direct`.
    pub task_create_missing_queue_exchange_type: Option<String>,
    /// Type of the 28 `celery_delayed_*` queues of native delayed delivery.
    pub broker_native_delayed_delivery_queue_type: QueueType,
    /// Whether the worker looks for quorum queues among those it consumes, to set up native
    /// delayed delivery for them as Celery's worker does (QoS is per consumer on a quorum
    /// queue either way: RabbitMQ refuses global QoS there).
    pub worker_detect_quorum_queues: bool,
    /// Task name to per-task settings (`rate_limit`, `unique_for`).
    pub task_annotations: BTreeMap<String, TaskAnnotation>,
    /// Whether each worker keeps the `rate_limit`s on its own (`"worker"`, Celery's way) or
    /// all together (`"cluster"`: needs a Redis `result_backend`, which holds the shared state).
    pub task_rate_limit_scope: RateLimitScope,
    /// Task name (exact or glob with `*`) to route.
    pub task_routes: BTreeMap<String, Route>,
    /// Ack after the task ends instead of when it starts.
    pub task_acks_late: bool,
    /// With `task_acks_late`: a task whose run was lost (its code panicked, the analogue of a
    /// pool process dying) goes back to its queue instead of ending as FAILURE `WorkerLostError`.
    pub task_reject_on_worker_lost: bool,
    /// Store STARTED when a task begins.
    pub task_track_started: bool,
    /// Store no result for any task.
    pub task_ignore_result: bool,
    /// Messages a worker holds per unit of concurrency.
    pub worker_prefetch_multiplier: u16,
    /// The most messages a consumer's prefetch window grows to while it holds messages for
    /// their ETA (each held one widens it by one, as Celery 5.6 raises its QoS); past it,
    /// held messages take window slots. Unset: 65,535, AMQP's largest prefetch count.
    pub worker_eta_task_limit: Option<u16>,
    /// Tasks run at once by one worker process; 0 means the number of CPUs.
    pub worker_concurrency: usize,
    /// Seconds a result is kept; 0 keeps it forever.
    pub result_expires: u64,
    /// Also store name, args, kwargs, worker, retries and queue with each result.
    pub result_extended: bool,
    /// Largest task result stored, in bytes of its JSON; a larger one is stored as FAILURE
    /// (`ValueError`) instead, so one task cannot fill the backend and every chain step after
    /// it. 0: no cap.
    pub result_max_bytes: u64,
    /// Seconds after which a running task is stopped and fails with `TimeLimitExceeded`.
    pub task_time_limit: Option<f64>,
    /// Seconds after which a running task is told its soft limit passed.
    pub task_soft_time_limit: Option<f64>,
    /// Send `task-*` events from the start (as `celery worker -E`).
    pub worker_send_task_events: bool,
    /// Seconds between `worker-heartbeat` events.
    pub worker_heartbeat_interval: f64,
    /// Seconds a cold shutdown still gives running tasks to finish before abandoning them (Celery
    /// 5.5's soft shutdown); 0 abandons them at once.
    pub worker_soft_shutdown_timeout: f64,
    /// Port of the worker's Prometheus listener (`GET /metrics`); unset, there is none.
    pub worker_metrics_port: Option<u16>,
    /// Address the worker's Prometheus listener binds: loopback unless a scraper on another
    /// host needs it (`0.0.0.0`).
    pub worker_metrics_host: String,
    /// The client sends `task-sent` events.
    pub task_send_sent_event: bool,
    /// PostgreSQL URL of the web app's jobs table.
    pub database_url: String,
    /// Task that `POST /receive` runs for a payload that names no task (the payload is its
    /// one argument).
    pub web_default_task: String,
    /// Task names `POST /receive` accepts besides `web_default_task`: an explicit list (a task
    /// in a worker's registry is not open to the API unless listed).
    pub web_allowed_tasks: Vec<String>,
    /// Queues a `POST /receive` job may name; empty, any valid queue name.
    pub web_allowed_queues: Vec<String>,
    /// Largest request body the web app reads, in bytes.
    pub web_body_limit: u64,
    /// Bound on a workflow's steps × its body's bytes at `POST /receive`: each step may pass
    /// the whole payload on, so this bounds what one request can store.
    pub web_workflow_max_bytes: u64,
    /// Bytes of results one `/status` or `/tasks` answer inlines; results past it are linked
    /// to their job's own status instead.
    pub web_answer_max_bytes: u64,
    /// Bearer token the web app's job routes require; unset, they are open.
    pub web_auth_token: Option<String>,
    /// Secret of the HS256-signed JWTs the web app's job routes accept as bearer tokens (with
    /// `exp` required), besides `web_auth_token`; unset, no JWT is accepted.
    pub web_jwt_secret: Option<String>,
    /// The `iss` a JWT must carry; unset, any or none.
    pub web_jwt_issuer: Option<String>,
    /// The audience a JWT's `aud` must name; unset, a JWT with an `aud` is refused.
    pub web_jwt_audience: Option<String>,
    /// Status streams (`/status/<id>/stream`) one web process keeps open at once; over it,
    /// 503.
    pub web_max_streams: usize,
    /// Seconds a status stream lasts at most before it ends (the client reconnects).
    pub web_stream_max_seconds: u64,
    /// Seconds between the web app's reconciliations of unfinished jobs with the backend.
    pub web_sweep_interval: u64,
    /// Failed publishes after which a job the broker keeps refusing (while it takes others)
    /// ends FAILURE with a `PublishError`; the waits between them double from 1 s up to 60 s.
    pub web_publish_max_attempts: u32,
    /// Seconds a `POST /receive` `Idempotency-Key` is kept: a repeat within it answers the job
    /// the key first made; past it the key is forgotten and a repeat makes a new job.
    pub web_idempotency_ttl: u64,
    /// Whether the web app also runs the monitor: it follows the cluster's events (`celeryev`)
    /// and records every task and worker in PostgreSQL (`GET /history`, `GET /workers`).
    pub monitor: bool,
    /// The monitor's event queue (RabbitMQ), one for all the web replicas, so each event is
    /// recorded once and events wait there while no monitor runs.
    pub monitor_queue: String,
    /// Seconds `monitor_queue` and the events in it are kept after the last monitor stopped
    /// (`x-expires`): how long the monitor may be down without losing events on RabbitMQ.
    pub monitor_queue_expires: u64,
    /// Days a task stays in the history (by its first event); 0 keeps it for ever.
    pub monitor_retention_days: u64,
    /// Base URL of an OpenTelemetry collector's OTLP/HTTP receiver (`http://host:4318`), where
    /// spans go; unset, no spans are made. The standard `OTEL_EXPORTER_OTLP_ENDPOINT` variable,
    /// when set, wins, as it does for Python services instrumented with OpenTelemetry.
    pub otlp_endpoint: Option<String>,
    /// Periodic tasks `beat` sends, by entry name.
    pub beat_schedule: BTreeMap<String, BeatEntry>,
    /// Prefix of the Redis keys where `beat` keeps its last run times and its lock (in the
    /// result backend's database), so separate deployments sharing a Redis keep apart.
    pub beat_key_prefix: String,
}

impl Default for CeleryConfig {
    fn default() -> Self {
        Self {
            broker_url: "amqp://guest:guest@127.0.0.1:5672//".into(),
            broker_failover_strategy: FailoverStrategy::default(),
            result_backend: None,
            result_backend_transport_options: BackendTransportOptions::default(),
            broker_api: None,
            broker_transport_options: TransportOptions::default(),
            broker_use_ssl: None,
            redis_backend_use_ssl: None,
            task_default_queue: "celery".into(),
            task_default_queue_type: QueueType::Classic,
            task_create_missing_queues: true,
            task_create_missing_queue_type: QueueType::Classic,
            task_default_exchange_type: "direct".into(),
            task_create_missing_queue_exchange_type: None,
            broker_native_delayed_delivery_queue_type: QueueType::Quorum,
            worker_detect_quorum_queues: true,
            task_annotations: BTreeMap::new(),
            task_rate_limit_scope: RateLimitScope::Worker,
            task_routes: BTreeMap::new(),
            task_acks_late: false,
            task_reject_on_worker_lost: false,
            task_track_started: false,
            task_ignore_result: false,
            worker_prefetch_multiplier: 4,
            worker_eta_task_limit: None,
            worker_concurrency: 0,
            result_expires: 86_400,
            result_extended: false,
            result_max_bytes: 1 << 20,
            task_time_limit: None,
            task_soft_time_limit: None,
            worker_send_task_events: false,
            worker_heartbeat_interval: 2.0,
            worker_soft_shutdown_timeout: 0.0,
            worker_metrics_port: None,
            worker_metrics_host: "127.0.0.1".into(),
            task_send_sent_event: false,
            database_url: "postgres://postgres@127.0.0.1:5432/rcelery".into(),
            web_default_task: "tasks.echo".into(),
            web_allowed_tasks: Vec::new(),
            web_allowed_queues: Vec::new(),
            web_body_limit: 1 << 20,
            web_workflow_max_bytes: 16 << 20,
            web_answer_max_bytes: 1 << 20,
            web_auth_token: None,
            web_jwt_secret: None,
            web_jwt_issuer: None,
            web_jwt_audience: None,
            web_max_streams: 1000,
            web_stream_max_seconds: 900,
            web_sweep_interval: 5,
            web_publish_max_attempts: 10,
            web_idempotency_ttl: 86_400,
            monitor: false,
            monitor_queue: "celeryev.monitor".into(),
            monitor_queue_expires: 86_400,
            monitor_retention_days: 30,
            otlp_endpoint: None,
            beat_schedule: BTreeMap::new(),
            beat_key_prefix: "celery-beat".into(),
        }
    }
}

impl CeleryConfig {
    /// Reads `path` (if it exists), applies the process environment, and validates.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?,
            None => String::new(),
        };
        Self::from_sources(&text, std::env::vars())
    }

    /// Builds the config from TOML text and `(name, value)` environment pairs.
    pub fn from_sources(
        toml_text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self> {
        let table: toml::Table =
            toml::from_str(toml_text).map_err(|e| Error::Config(e.message().to_string()))?;
        let mut settings: Map<String, Value> = serde_json::to_value(table)?
            .as_object()
            .cloned()
            .unwrap_or_default();
        // The known keys come from the struct itself, so a new field is overridable at once.
        let defaults = serde_json::to_value(Self::default())?;
        let defaults = defaults.as_object().expect("config serializes to a map");
        for (name, raw) in env {
            let Some(key) = name.strip_prefix("CELERY_").map(str::to_ascii_lowercase) else {
                continue;
            };
            if let Some(default) = defaults.get(&key) {
                settings.insert(key, env_value(default, &raw));
            }
        }
        let config: Self = serde_json::from_value(Value::Object(settings))
            .map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let brokers = failover_urls(&self.broker_url);
        let mut kinds = brokers
            .iter()
            .map(|url| BrokerKind::of(url))
            .collect::<Result<Vec<_>>>()?;
        kinds.dedup();
        match kinds.len() {
            0 => return Err(Error::Config("broker_url is empty".into())),
            1 => {}
            _ => {
                return Err(Error::Config(format!(
                    "broker_url {} mixes RabbitMQ and Redis in one failover list",
                    redact_url(&self.broker_url)
                )))
            }
        }
        if is_sentinel_url(&self.broker_url) {
            let master_name = self.broker_transport_options.master_name.as_deref();
            SentinelList::parse(&self.broker_url, "broker_url", master_name)?;
        }
        if let Some(url) = &self.result_backend {
            if !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || is_sentinel_url(url))
            {
                return Err(Error::Config(format!(
                    "result_backend {} is not supported: use redis://",
                    redact_url(url)
                )));
            }
        }
        if let Some(url) = self
            .result_backend
            .as_deref()
            .filter(|url| is_sentinel_url(url))
        {
            let master_name = self.result_backend_transport_options.master_name.as_deref();
            SentinelList::parse(url, "result_backend", master_name)?;
        }
        // Celery would turn TLS on for a plain URL here; we ask for the URL to say so, so that
        // reading `broker_url` alone tells whether the traffic is encrypted. A Sentinel list has
        // no TLS form of its own: there, as in kombu, the setting alone asks for TLS.
        if let Some(ssl) = &self.broker_use_ssl {
            ssl.validate("broker_use_ssl")?;
            if !brokers
                .iter()
                .all(|url| is_tls_url(url) || is_sentinel_url(url))
            {
                return Err(Error::Config(format!(
                    "broker_use_ssl is set but broker_url {} is not amqps://, rediss:// or sentinel://",
                    redact_url(&self.broker_url)
                )));
            }
        }
        if let Some(ssl) = &self.redis_backend_use_ssl {
            ssl.validate("redis_backend_use_ssl")?;
            if !self
                .result_backend
                .as_deref()
                .is_some_and(|url| is_tls_url(url) || is_sentinel_url(url))
            {
                return Err(Error::Config(
                    "redis_backend_use_ssl is set but result_backend is not rediss:// or sentinel://"
                        .into(),
                ));
            }
        }
        if self.worker_prefetch_multiplier == 0 {
            return Err(Error::Config(
                "worker_prefetch_multiplier must be at least 1".into(),
            ));
        }
        if self.worker_heartbeat_interval.is_nan() || self.worker_heartbeat_interval <= 0.0 {
            return Err(Error::Config(
                "worker_heartbeat_interval must be more than 0 seconds".into(),
            ));
        }
        for (task, annotation) in &self.task_annotations {
            if let Some(rate) = &annotation.rate_limit {
                crate::rate::parse(rate)?;
            }
            if let Some(seconds) = annotation.unique_for {
                if Duration::try_from_secs_f64(seconds).map_or(true, |d| d.is_zero()) {
                    return Err(Error::Config(format!(
                        "task_annotations {task}: unique_for must be a number of seconds above 0, not {seconds}"
                    )));
                }
            }
        }
        // The shared limiter lives in the result backend's Redis; without one there is nothing
        // to share, and silently limiting per worker would let N workers run N times the limit.
        if self.task_rate_limit_scope == RateLimitScope::Cluster && self.result_backend.is_none() {
            return Err(Error::Config(
                "task_rate_limit_scope = \"cluster\" needs a Redis result_backend".into(),
            ));
        }
        for (name, entry) in &self.beat_schedule {
            crate::schedule::Schedule::of(entry)
                .map_err(|reason| Error::Config(format!("beat_schedule {name}: {reason}")))?;
        }
        if self.web_stream_max_seconds == 0 {
            return Err(Error::Config(
                "web_stream_max_seconds must be at least 1 second".into(),
            ));
        }
        if self.web_sweep_interval == 0 {
            return Err(Error::Config(
                "web_sweep_interval must be at least 1 second".into(),
            ));
        }
        if self.web_idempotency_ttl == 0 {
            return Err(Error::Config(
                "web_idempotency_ttl must be at least 1 second".into(),
            ));
        }
        if !(1..=1000).contains(&self.web_publish_max_attempts) {
            return Err(Error::Config(
                "web_publish_max_attempts must be from 1 to 1000".into(),
            ));
        }
        for exchange_type in std::iter::once(&self.task_default_exchange_type)
            .chain(&self.task_create_missing_queue_exchange_type)
        {
            if !EXCHANGE_TYPES.contains(&exchange_type.as_str()) {
                return Err(Error::Config(format!(
                    "exchange type {exchange_type:?} is not one of {EXCHANGE_TYPES:?}"
                )));
            }
        }
        if self.task_default_queue.is_empty() {
            return Err(Error::Config("task_default_queue must not be empty".into()));
        }
        // An empty HMAC key would let anyone sign a JWT the web app accepts, and an empty token
        // would let `Authorization: Bearer ` in.
        // HS256's key is as strong as the secret is long: a short one is guessed offline
        // from any token seen.
        if self
            .web_jwt_secret
            .as_ref()
            .is_some_and(|secret| secret.len() < MIN_JWT_SECRET_BYTES)
        {
            return Err(Error::Config(format!(
                "web_jwt_secret must be at least {MIN_JWT_SECRET_BYTES} bytes"
            )));
        }
        if let Some(problem) = crate::protocol::queue_name::queue_name_problem(&self.monitor_queue)
        {
            return Err(Error::Config(format!("monitor_queue: {problem}")));
        }
        // RabbitMQ's x-expires is 32 bits of milliseconds.
        if !(1..=u64::from(u32::MAX) / 1000).contains(&self.monitor_queue_expires) {
            return Err(Error::Config(format!(
                "monitor_queue_expires must be from 1 to {} seconds",
                u32::MAX / 1000
            )));
        }
        if self.web_auth_token.as_deref() == Some("") {
            return Err(Error::Config("web_auth_token must not be empty".into()));
        }
        Ok(())
    }

    /// Concurrency with 0 resolved to the number of CPUs.
    pub fn concurrency(&self) -> usize {
        match self.worker_concurrency {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// The queue a task is sent to when the caller names none: first matching route, else default.
    pub fn queue_for(&self, task_name: &str) -> &str {
        self.task_routes
            .iter()
            .find(|(pattern, _)| glob_match(pattern, task_name))
            .map_or(self.task_default_queue.as_str(), |(_, route)| route.queue())
    }

    /// How long every send of `task_name` is unique for when the call does not say
    /// (`task_annotations`' `unique_for`); `None`: only when the call asks.
    pub fn unique_for(&self, task_name: &str) -> Option<Duration> {
        let seconds = self.task_annotations.get(task_name)?.unique_for?;
        Duration::try_from_secs_f64(seconds).ok()
    }

    /// Every queue the settings name: the default queue and each route's.
    pub fn queues(&self) -> std::collections::BTreeSet<&str> {
        std::iter::once(self.task_default_queue.as_str())
            .chain(self.task_routes.values().map(Route::queue))
            .collect()
    }

    /// The settings as Celery's `conf` shows them: every URL with its password masked.
    pub fn redacted(&self) -> Self {
        Self {
            broker_url: redact_url(&self.broker_url),
            result_backend: self.result_backend.as_deref().map(redact_url),
            broker_api: self.broker_api.as_deref().map(redact_url),
            database_url: redact_url(&self.database_url),
            web_auth_token: self.web_auth_token.as_ref().map(|_| "********".to_string()),
            web_jwt_secret: self.web_jwt_secret.as_ref().map(|_| "********".to_string()),
            broker_transport_options: TransportOptions {
                sentinel_kwargs: redact_kwargs(&self.broker_transport_options.sentinel_kwargs),
                ..self.broker_transport_options.clone()
            },
            result_backend_transport_options: BackendTransportOptions {
                sentinel_kwargs: redact_kwargs(
                    &self.result_backend_transport_options.sentinel_kwargs,
                ),
                ..self.result_backend_transport_options.clone()
            },
            ..self.clone()
        }
    }
}

/// The shortest `web_jwt_secret` taken: HS256's own key size (RFC 7518, 3.2).
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// The exchange types RabbitMQ has built in.
const EXCHANGE_TYPES: [&str; 4] = ["direct", "topic", "fanout", "headers"];

/// `sentinel_kwargs` with the password masked.
fn redact_kwargs(kwargs: &Option<SentinelKwargs>) -> Option<SentinelKwargs> {
    kwargs.as_ref().map(|kwargs| SentinelKwargs {
        password: kwargs.password.as_ref().map(|_| "********".to_string()),
        ..kwargs.clone()
    })
}

/// An override's value typed after the setting's default: strings stay strings, others are JSON.
fn env_value(default: &Value, raw: &str) -> Value {
    match default {
        Value::String(_) => Value::String(raw.to_string()),
        // A list: JSON, or the comma-separated form shells make easy.
        Value::Array(_) => serde_json::from_str(raw).unwrap_or_else(|_| {
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Value::from)
                .collect()
        }),
        _ => match raw.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" => Value::Bool(true),
            "false" | "no" | "off" => Value::Bool(false),
            _ => serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string())),
        },
    }
}

/// `*` matches any run of characters; everything else matches itself.
pub(crate) fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, rest)) => {
            let Some(tail) = name.strip_prefix(prefix) else {
                return false;
            };
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| glob_match(rest, &tail[i..]))
        }
    }
}

/// A URL, or Celery's list form of a failover list, read as the `;`-separated string.
fn url_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(url) => url,
        OneOrMany::Many(urls) => urls.join(";"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_queues_named_are_the_default_and_each_routes() {
        let text = r#"
            task_routes = { "tasks.*" = "rust", "py.mul" = { queue = "python" }, "py.x" = "rust" }
        "#;
        let config = CeleryConfig::from_sources(text, env(&[])).unwrap();
        assert_eq!(
            config.queues().into_iter().collect::<Vec<_>>(),
            ["celery", "python", "rust"]
        );
    }

    #[test]
    fn queue_and_exchange_types_are_checked() {
        let config = CeleryConfig::from_sources(
            "task_default_queue_type = \"quorum\"\ntask_default_exchange_type = \"topic\"",
            env(&[("CELERY_TASK_CREATE_MISSING_QUEUE_TYPE", "quorum")]),
        )
        .unwrap();
        assert_eq!(config.task_default_queue_type, QueueType::Quorum);
        assert_eq!(config.task_create_missing_queue_type, QueueType::Quorum);
        let error = CeleryConfig::from_sources(r#"task_default_queue_type = "stream""#, env(&[]))
            .unwrap_err();
        assert!(error.to_string().contains("classic"), "{error}");
        let error = CeleryConfig::from_sources(
            r#"task_create_missing_queue_exchange_type = "x-delayed""#,
            env(&[]),
        )
        .unwrap_err();
        assert!(error.to_string().contains("topic"), "{error}");
    }

    #[test]
    fn a_task_annotation_makes_every_send_of_the_task_unique_for_its_seconds() {
        let config = CeleryConfig::from_sources(
            r#"task_annotations = { "tasks.add" = { unique_for = 1.5 }, "tasks.mul" = { rate_limit = "1/s" } }"#,
            env(&[]),
        )
        .unwrap();
        assert_eq!(
            config.unique_for("tasks.add"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(config.unique_for("tasks.mul"), None);
        assert_eq!(config.unique_for("tasks.other"), None);
        for bad in ["0", "-1"] {
            let toml = format!(r#"task_annotations = {{ "t" = {{ unique_for = {bad} }} }}"#);
            let error = CeleryConfig::from_sources(&toml, env(&[])).unwrap_err();
            assert!(error.to_string().contains("unique_for"), "{error}");
        }
    }

    #[test]
    fn rate_limit_scope_is_worker_unless_set_and_cluster_needs_a_backend() {
        let config = CeleryConfig::from_sources("", env(&[])).unwrap();
        assert_eq!(config.task_rate_limit_scope, RateLimitScope::Worker);
        let config = CeleryConfig::from_sources(
            r#"result_backend = "redis://127.0.0.1:6379/0""#,
            env(&[("CELERY_TASK_RATE_LIMIT_SCOPE", "cluster")]),
        )
        .unwrap();
        assert_eq!(config.task_rate_limit_scope, RateLimitScope::Cluster);
        let err = CeleryConfig::from_sources(r#"task_rate_limit_scope = "cluster""#, env(&[]))
            .unwrap_err();
        assert!(err.to_string().contains("result_backend"), "{err}");
        let err =
            CeleryConfig::from_sources(r#"task_rate_limit_scope = "node""#, env(&[])).unwrap_err();
        assert!(err.to_string().contains("node"), "{err}");
    }

    #[test]
    fn the_monitor_is_off_by_default_switched_on_by_the_environment_and_its_queue_checked() {
        let config = CeleryConfig::from_sources("", env(&[])).unwrap();
        assert!(!config.monitor);
        let config = CeleryConfig::from_sources(
            "monitor_retention_days = 7",
            env(&[
                ("CELERY_MONITOR", "true"),
                ("CELERY_MONITOR_QUEUE", "ev.mine"),
            ]),
        )
        .unwrap();
        assert!(config.monitor);
        assert_eq!(
            (config.monitor_queue.as_str(), config.monitor_retention_days),
            ("ev.mine", 7)
        );
        for bad in [
            r#"monitor_queue = "a b""#,
            "monitor_queue_expires = 0",
            "monitor_queue_expires = 5000000",
        ] {
            assert!(CeleryConfig::from_sources(bad, env(&[])).is_err(), "{bad}");
        }
    }

    #[test]
    fn file_values_and_env_overrides_combine() {
        let text = r#"
            broker_url = "redis://127.0.0.1:6379/0"
            worker_concurrency = 4
            task_routes = { "tasks.*" = "rust", "py.mul" = { queue = "python" } }
        "#;
        let config = CeleryConfig::from_sources(
            text,
            env(&[
                ("CELERY_WORKER_CONCURRENCY", "16"),
                ("CELERY_TASK_ACKS_LATE", "true"),
                ("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/1"),
                ("CELERY_WEB_ALLOWED_TASKS", "py.mul, py.concat"),
                (
                    "CELERY_BROKER_TRANSPORT_OPTIONS",
                    r#"{"visibility_timeout": 5}"#,
                ),
                ("CELERY_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
                ("CELERY_NOT_A_SETTING", "ignored"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(config.worker_concurrency, 16);
        assert_eq!(
            config.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4318")
        );
        assert!(config.task_acks_late);
        assert_eq!(
            config.result_backend.as_deref(),
            Some("redis://127.0.0.1:6379/1")
        );
        assert_eq!(config.web_allowed_tasks, ["py.mul", "py.concat"]);
        assert_eq!(config.broker_transport_options.visibility_timeout, 5);
        assert_eq!(config.queue_for("tasks.add"), "rust");
        assert_eq!(config.queue_for("py.mul"), "python");
        assert_eq!(config.queue_for("other"), "celery");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let err = CeleryConfig::from_sources("broker_urll = \"x\"", env(&[])).unwrap_err();
        assert!(err.to_string().contains("broker_urll"), "{err}");
        let err = CeleryConfig::from_sources("", env(&[("CELERY_WORKER_CONCURRENCY", "many")]))
            .unwrap_err();
        assert!(err.to_string().contains("invalid type"), "{err}");
        let err = CeleryConfig::from_sources("broker_url = \"kafka://x\"", env(&[])).unwrap_err();
        assert!(err.to_string().contains("kafka"), "{err}");
        let err = CeleryConfig::from_sources("result_backend = \"rpc://\"", env(&[])).unwrap_err();
        assert!(err.to_string().contains("not supported"), "{err}");
        let err =
            CeleryConfig::from_sources("", env(&[("CELERY_WEB_JWT_SECRET", "")])).unwrap_err();
        assert!(err.to_string().contains("web_jwt_secret"), "{err}");
        let err = CeleryConfig::from_sources("web_auth_token = \"\"", env(&[])).unwrap_err();
        assert!(err.to_string().contains("web_auth_token"), "{err}");
        let short = "k".repeat(31);
        let err =
            CeleryConfig::from_sources("", env(&[("CELERY_WEB_JWT_SECRET", &short)])).unwrap_err();
        assert!(err.to_string().contains("at least 32 bytes"), "{err}");
        let long = "k".repeat(32);
        let config =
            CeleryConfig::from_sources("", env(&[("CELERY_WEB_JWT_SECRET", &long)])).unwrap();
        assert_eq!(config.web_jwt_secret.as_deref(), Some(long.as_str()));
    }

    #[test]
    fn tls_settings_read_celerys_names_and_need_a_tls_url() {
        let text = r#"
            broker_url = "amqps://guest:guest@broker:5671//"
            broker_use_ssl = { ca_certs = "/etc/rcelery/ca.pem", cert_reqs = "CERT_REQUIRED" }
            result_backend = "rediss://cache:6380/0"
        "#;
        let config = CeleryConfig::from_sources(
            text,
            env(&[(
                "CELERY_REDIS_BACKEND_USE_SSL",
                r#"{"ssl_cert_reqs": "CERT_NONE"}"#,
            )]),
        )
        .unwrap();
        let broker = config.broker_use_ssl.unwrap();
        assert_eq!(
            broker.ca_certs.as_deref(),
            Some(Path::new("/etc/rcelery/ca.pem"))
        );
        assert!(broker.verifies());
        assert!(!config.redis_backend_use_ssl.unwrap().verifies());

        let plain = "broker_url = \"amqp://h//\"\nbroker_use_ssl = { cert_reqs = \"CERT_NONE\" }";
        let err = CeleryConfig::from_sources(plain, env(&[])).unwrap_err();
        assert!(
            err.to_string()
                .contains("is not amqps://, rediss:// or sentinel://"),
            "{err}"
        );
        let err = CeleryConfig::from_sources(
            "result_backend = \"redis://h/0\"\nredis_backend_use_ssl = {}",
            env(&[]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not rediss://"), "{err}");
        let half = "broker_url = \"rediss://h/0\"\nbroker_use_ssl = { certfile = \"c.pem\" }";
        let err = CeleryConfig::from_sources(half, env(&[])).unwrap_err();
        assert!(err.to_string().contains("certfile and keyfile"), "{err}");
        let unknown = "broker_url = \"rediss://h/0\"\nbroker_use_ssl = { ssl_version = 2 }";
        let err = CeleryConfig::from_sources(unknown, env(&[])).unwrap_err();
        assert!(err.to_string().contains("ssl_version"), "{err}");
    }

    #[test]
    fn beat_schedule_reads_intervals_and_crontabs_and_refuses_bad_ones() {
        let text = r#"
            [beat_schedule.tick]
            task = "tasks.add"
            schedule = 1.5
            args = [1, 2]
            queue = "rust"

            [beat_schedule.nightly]
            task = "py.report"
            crontab = "30 2 * * *"
            kwargs = { full = true }
            expires = 3600
        "#;
        let config = CeleryConfig::from_sources(text, env(&[])).unwrap();
        let tick = &config.beat_schedule["tick"];
        assert_eq!(
            (tick.schedule, tick.queue.as_deref()),
            (Some(1.5), Some("rust"))
        );
        let nightly = &config.beat_schedule["nightly"];
        assert_eq!(
            (nightly.crontab.as_deref(), nightly.expires),
            (Some("30 2 * * *"), Some(3600.0))
        );
        let bad = "[beat_schedule.broken]\ntask = \"tasks.add\"\ncrontab = \"61 * * * *\"";
        let err = CeleryConfig::from_sources(bad, env(&[])).unwrap_err();
        assert!(
            err.to_string().contains("beat_schedule broken: crontab"),
            "{err}"
        );
        let both = "[beat_schedule.both]\ntask = \"t\"\nschedule = 1\ncrontab = \"* * * * *\"";
        let err = CeleryConfig::from_sources(both, env(&[])).unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err}");
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            redact_url("amqp://guest:s3cret@127.0.0.1:5672//"),
            "amqp://guest:********@127.0.0.1:5672//"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        let config = CeleryConfig {
            result_backend: Some("redis://:pw@127.0.0.1/1".into()),
            web_auth_token: Some("t0ken".into()),
            web_jwt_secret: Some("jwt-s3cret".into()),
            ..CeleryConfig::default()
        };
        let shown = format!("{:?}", config.redacted());
        assert!(
            !shown.contains("pw@")
                && !shown.contains(":guest@")
                && !shown.contains("t0ken")
                && !shown.contains("jwt-s3cret"),
            "{shown}"
        );
        assert_eq!(
            config.redacted().web_jwt_secret.as_deref(),
            Some("********")
        );
        assert_eq!(CeleryConfig::default().redacted().web_jwt_secret, None);
    }

    #[test]
    fn broker_url_takes_a_failover_list_and_a_strategy() {
        let list = "amqp://guest:pw@127.0.0.1:5701//;amqp://guest:pw@127.0.0.1:5702//";
        let config = CeleryConfig::from_sources(
            "",
            env(&[
                ("CELERY_BROKER_URL", list),
                ("CELERY_BROKER_FAILOVER_STRATEGY", "shuffle"),
            ]),
        )
        .unwrap();
        assert_eq!(config.broker_url, list);
        assert_eq!(config.broker_failover_strategy, FailoverStrategy::Shuffle);
        let text = "broker_url = [\"amqp://a:5701//\", \"amqp://b:5702//\"]";
        let config = CeleryConfig::from_sources(text, env(&[])).unwrap();
        assert_eq!(config.broker_url, "amqp://a:5701//;amqp://b:5702//");
        assert_eq!(
            config.broker_failover_strategy,
            FailoverStrategy::RoundRobin
        );

        let shown = CeleryConfig {
            broker_url: list.into(),
            ..CeleryConfig::default()
        }
        .redacted()
        .broker_url;
        assert_eq!(
            shown,
            "amqp://guest:********@127.0.0.1:5701//;amqp://guest:********@127.0.0.1:5702//"
        );
        for (bad, why) in [
            ("amqp://a//;kafka://b", "kafka"),
            ("amqp://a//;redis://b/0", "mixes"),
            (" ; ", "empty"),
        ] {
            let err =
                CeleryConfig::from_sources("", env(&[("CELERY_BROKER_URL", bad)])).unwrap_err();
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
        let err = CeleryConfig::from_sources("broker_failover_strategy = \"random\"", env(&[]))
            .unwrap_err();
        assert!(err.to_string().contains("round-robin"), "{err}");
        let half = "broker_url = \"amqps://a//;amqp://b//\"\nbroker_use_ssl = {}";
        let err = CeleryConfig::from_sources(half, env(&[])).unwrap_err();
        assert!(err.to_string().contains("not amqps://"), "{err}");
    }

    #[test]
    fn sentinel_urls_need_a_master_name_and_take_tls_from_the_settings() {
        let url = "sentinel://:pw@127.0.0.1:26379/2;sentinel://127.0.0.1:26380/2";
        let err =
            CeleryConfig::from_sources(&format!("broker_url = \"{url}\""), env(&[])).unwrap_err();
        assert!(
            err.to_string().contains("broker_url is a sentinel:// URL")
                && err.to_string().contains("master_name"),
            "{err}"
        );
        let text = format!(
            r#"
            broker_url = "{url}"
            broker_transport_options = {{ master_name = "mymaster", sentinel_kwargs = {{ password = "guard" }} }}
            broker_use_ssl = {{ cert_reqs = "CERT_NONE" }}
            result_backend = "{url}"
            "#
        );
        let err = CeleryConfig::from_sources(&text, env(&[])).unwrap_err();
        assert!(
            err.to_string().contains("result_backend is a sentinel://"),
            "{err}"
        );
        let config = CeleryConfig::from_sources(
            &text,
            env(&[(
                "CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS",
                r#"{"master_name": "other"}"#,
            )]),
        )
        .unwrap();
        let broker = SentinelList::parse(
            &config.broker_url,
            "broker_url",
            config.broker_transport_options.master_name.as_deref(),
        )
        .unwrap();
        assert_eq!((broker.master_name.as_str(), broker.db), ("mymaster", 2));
        let backend = SentinelList::parse(
            config.result_backend.as_deref().unwrap(),
            "result_backend",
            config
                .result_backend_transport_options
                .master_name
                .as_deref(),
        )
        .unwrap();
        assert_eq!(backend.master_name, "other");
        assert_eq!(BrokerKind::of(url).unwrap(), BrokerKind::Redis);
        let shown = format!("{:?}", config.redacted());
        assert!(
            !shown.contains("pw@") && !shown.contains("guard"),
            "{shown}"
        );

        let unknown = format!(
            "broker_url = \"{url}\"\nbroker_transport_options = {{ master_name = \"m\", sentinel_kwargs = {{ ssl = true }} }}"
        );
        let err = CeleryConfig::from_sources(&unknown, env(&[])).unwrap_err();
        assert!(err.to_string().contains("ssl"), "{err}");
    }

    #[test]
    fn globs_match_like_celery_routes() {
        assert!(glob_match("tasks.*", "tasks.add"));
        assert!(glob_match("*.add", "tasks.add"));
        assert!(glob_match("a*c*e", "abcde"));
        assert!(!glob_match("tasks.*", "py.add"));
        assert!(!glob_match("tasks.add", "tasks.add2"));
    }
}
