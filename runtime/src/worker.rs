//! The dispatcher: takes task messages from the broker and runs them as Celery's worker would.
//!
//! Per message: decode (undecodable → logged with its delivery tag and rejected); look the task
//! up (unknown → FAILURE `NotRegistered`, acked); drop it as REVOKED when expired; hold it
//! unacked until its ETA; wait for a free slot of `worker_concurrency`; ack (now, or after the
//! run with `task_acks_late`); store STARTED, the task's own states, then SUCCESS or FAILURE.
//! Nothing a message contains can stop the loop.

use std::sync::Arc;
use std::time::Instant;

use celery::Celery;
use chrono::Utc;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backend::RedisBackend;
use crate::broker::{self, Broker, BrokerKind, Delivery};
use crate::config::CeleryConfig;
use crate::error::{Error, Result};
use crate::progress::{TaskContext, Updates};
use crate::protocol::result::{state, ExceptionInfo, Extended, ResultMeta};
use crate::protocol::TaskRequest;
use crate::registry::{Outcome, Registry};

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
/// connects lazily and declares nothing, whereas its AMQP transport declares the default queue.
pub async fn app_handle(config: &CeleryConfig) -> Result<Arc<Celery>> {
    let url = [Some(&config.broker_url), config.result_backend.as_ref()]
        .into_iter()
        .flatten()
        .find(|url| BrokerKind::of(url).ok() == Some(BrokerKind::Redis))
        .unwrap_or(&config.broker_url);
    let app = celery::CeleryBuilder::new("rcelery", url)
        .default_queue(&config.task_default_queue)
        .build()
        .await
        .map_err(|e| Error::Config(format!("cannot build the task app handle: {e}")))?;
    Ok(Arc::new(app))
}

/// One worker node.
pub struct Worker {
    app: Arc<Celery>,
    registry: Registry,
    broker: Arc<dyn Broker>,
    backend: Option<RedisBackend>,
    config: CeleryConfig,
    hostname: String,
    queues: Vec<String>,
    slots: Semaphore,
    /// Cancelled at shutdown: messages not yet started are given back to the broker.
    stopping: CancellationToken,
}

impl Worker {
    /// Connects to the broker and backend of `config`; consumes `queues` as node `hostname`.
    pub async fn new(
        config: CeleryConfig,
        registry: Registry,
        hostname: String,
        queues: Vec<String>,
    ) -> Result<Self> {
        let broker = broker::connect(&config.broker_url).await?;
        let backend = match &config.result_backend {
            Some(url) => Some(RedisBackend::connect(url, config.result_expires).await?),
            None => None,
        };
        let app = app_handle(&config).await?;
        let slots = Semaphore::new(config.concurrency());
        Ok(Self {
            app,
            registry,
            broker,
            backend,
            config,
            hostname,
            queues,
            slots,
            stopping: CancellationToken::new(),
        })
    }

    /// Consumes until `shutdown` resolves or the broker connection is lost, then finishes the
    /// tasks already running and gives the ones not started back to the broker.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let worker = Arc::new(self);
        let prefetch =
            worker.config.concurrency() * usize::from(worker.config.worker_prefetch_multiplier);
        let prefetch = u16::try_from(prefetch).unwrap_or(u16::MAX);
        let mut deliveries = worker.broker.consume(&worker.queues, prefetch).await?;
        info!(
            hostname = %worker.hostname,
            broker = %crate::config::redact_url(&worker.config.broker_url),
            queues = ?worker.queues,
            concurrency = worker.config.concurrency(),
            tasks = ?worker.registry.names().collect::<Vec<_>>(),
            "{} ready.",
            worker.hostname
        );
        let mut running = JoinSet::new();
        tokio::pin!(shutdown);
        let lost = loop {
            tokio::select! {
                () = &mut shutdown => break false,
                delivery = deliveries.recv() => match delivery {
                    Some(delivery) => { running.spawn(worker.clone().handle(delivery)); }
                    None => break true,
                },
                Some(done) = running.join_next() => {
                    if let Err(error) = done {
                        error!(%error, "message handler failed");
                    }
                }
            }
        };
        drop(deliveries);
        worker.stopping.cancel();
        info!(
            tasks = running.len(),
            "stopped consuming; giving back tasks not started, finishing the others"
        );
        while running.join_next().await.is_some() {}
        if let Err(error) = worker.broker.close().await {
            warn!(%error, "closing the broker connection");
        }
        if lost {
            return Err(Error::ConnectionLost);
        }
        Ok(())
    }

    async fn handle(self: Arc<Self>, delivery: Delivery) {
        let Delivery {
            message,
            queue,
            tag,
            settle,
        } = delivery;
        let request = match message.and_then(|message| TaskRequest::decode(&message)) {
            Ok(request) => request,
            Err(error) => {
                error!(delivery_tag = %tag, %queue, task_id = ?error.task_id, reason = %error.reason, "rejecting undecodable message");
                if let Some(id) = &error.task_id {
                    let exc =
                        ExceptionInfo::new("kombu.exceptions", "DecodeError", error.reason.clone());
                    let mut meta = ResultMeta::new(id, state::FAILURE, exc.to_value(), Utc::now());
                    meta.traceback = Some(traceback(&exc));
                    self.store(meta).await;
                }
                settle_with(settle.reject(false), &tag).await;
                return;
            }
        };
        let Some(handler) = self.registry.get(&request.task) else {
            error!(task = %request.task, id = %request.id, "received unregistered task");
            let exc = ExceptionInfo::celery("NotRegistered", request.task.clone());
            self.finish(&request, &queue, state::FAILURE, exc.to_value(), None)
                .await;
            settle_with(settle.ack(), &tag).await;
            return;
        };
        // Held unacked until due and until a slot is free: a crash before then gives the message
        // back to the broker, and so does a shutdown.
        let due_and_free = async {
            if let Some(wait) = request.eta.and_then(|eta| (eta - Utc::now()).to_std().ok()) {
                tokio::time::sleep(wait).await;
            }
            self.slots.acquire().await
        };
        let _slot = tokio::select! {
            slot = due_and_free => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            () = self.stopping.cancelled() => {
                info!(task = %request.task, id = %request.id, "giving back a task not started");
                settle_with(settle.reject(true), &tag).await;
                return;
            }
        };
        if request.expires.is_some_and(|expires| expires <= Utc::now()) {
            warn!(task = %request.task, id = %request.id, "discarding expired task");
            let exc = ExceptionInfo::celery("TaskRevokedError", "expired");
            self.finish(&request, &queue, state::REVOKED, exc.to_value(), None)
                .await;
            settle_with(settle.ack(), &tag).await;
            return;
        }
        let settle = if self.config.task_acks_late {
            Some(settle)
        } else {
            settle_with(settle.ack(), &tag).await;
            None
        };
        let stores = self.stores(&request);
        if stores && self.config.task_track_started {
            let started = json!({"pid": std::process::id(), "hostname": self.hostname});
            self.store(self.meta(&request, &queue, state::STARTED, started))
                .await;
        }
        let (context, updates) = TaskContext::new(&request.id);
        let reporter = stores.then(|| {
            tokio::spawn(
                self.clone()
                    .report_states(request.clone(), queue.clone(), updates),
            )
        });
        let began = Instant::now();
        let outcome = handler
            .run(self.app.clone(), &request, &self.hostname, context)
            .await;
        let runtime = began.elapsed().as_secs_f64();
        if let Some(reporter) = reporter {
            // Its last write lands before the final state, so the final state is what stays.
            let _ = reporter.await;
        }
        match outcome {
            Outcome::Success(value) => {
                info!(task = %request.task, id = %request.id, runtime, result = %value, "task succeeded");
                self.finish(&request, &queue, state::SUCCESS, value, None)
                    .await;
            }
            Outcome::Failure(exc) => {
                error!(task = %request.task, id = %request.id, runtime, exception = %exc.repr(), "task failed");
                let tb = traceback(&exc);
                self.finish(&request, &queue, state::FAILURE, exc.to_value(), Some(tb))
                    .await;
            }
        }
        if let Some(settle) = settle {
            settle_with(settle.ack(), &tag).await;
        }
    }

    /// Writes each state the task reports, newest first-come, until the task ends.
    async fn report_states(
        self: Arc<Self>,
        request: TaskRequest,
        queue: String,
        mut updates: Updates,
    ) {
        while updates.changed().await.is_ok() {
            let Some(update) = updates.borrow_and_update().clone() else {
                continue;
            };
            self.store(self.meta(&request, &queue, &update.state, update.meta))
                .await;
        }
    }

    fn stores(&self, request: &TaskRequest) -> bool {
        self.backend.is_some() && !request.ignore_result && !self.config.task_ignore_result
    }

    /// Stores a final state unless the request asked for no result.
    async fn finish(
        &self,
        request: &TaskRequest,
        queue: &str,
        status: &str,
        result: Value,
        traceback: Option<String>,
    ) {
        if self.stores(request) {
            let mut meta = self.meta(request, queue, status, result);
            meta.traceback = traceback;
            self.store(meta).await;
        }
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

    async fn store(&self, meta: ResultMeta) {
        let Some(backend) = &self.backend else { return };
        if let Err(error) = backend.store(&meta).await {
            error!(id = %meta.task_id, status = %meta.status, %error, "cannot store result");
        }
    }
}

/// The traceback text stored with an exception state.
fn traceback(exc: &ExceptionInfo) -> String {
    format!("{}.{}: {}", exc.exc_module, exc.exc_type, exc.message())
}

async fn settle_with(settlement: impl std::future::Future<Output = Result<()>>, tag: &str) {
    if let Err(error) = settlement.await {
        error!(delivery_tag = %tag, %error, "cannot settle message with the broker");
    }
}
