//! `worker`: one worker node process over a crate's task registry, with `celery worker`'s
//! options, reconnecting after a lost broker and stopping warm then cold on signals. Each task
//! crate's `worker` binary is [`main`], given its own registry.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cli::Common;
use crate::metrics::WorkerMetrics;
use crate::registry::Registry;
use crate::worker::{expand_hostname, Worker};
use crate::{CeleryConfig, Error, Result};

/// `worker`'s command line.
#[derive(Debug, clap::Parser)]
#[command(about = "Run Rust tasks as a Celery worker")]
pub struct WorkerArgs {
    #[command(flatten)]
    pub common: Common,
    /// Comma-separated queues to consume (default: task_default_queue).
    #[arg(short = 'Q', long, value_delimiter = ',')]
    pub queues: Vec<String>,
    /// Tasks run at once (default: worker_concurrency).
    #[arg(short = 'c', long)]
    pub concurrency: Option<usize>,
    /// Node name; %h is the host name, %n its first label, %d the domain.
    #[arg(short = 'n', long, default_value = "celery@%h")]
    pub hostname: String,
    /// Send task events from the start (worker_send_task_events).
    #[arg(short = 'E', long = "task-events")]
    pub task_events: bool,
    /// Serve Prometheus metrics on this port (default: worker_metrics_port; unset, none).
    #[arg(long)]
    pub metrics_port: Option<u16>,
}

/// The stack of every thread (unless `RUST_MIN_STACK` says otherwise), in bytes: lapin reads
/// and drops a message's header tables recursively, on its I/O thread and ours, and the
/// deepest nesting one frame (128 KiB) carries, about 21,800 levels, overflows the default
/// 2 MiB and aborts the process. Only the pages a thread touches are taken from memory.
const THREAD_STACK_BYTES: &str = "268435456";

/// Parses the command line and runs a worker node over `registry` until it is stopped. Call
/// it first thing in `main`, before any thread starts.
pub fn main(registry: fn() -> Registry) -> Result<()> {
    // Read once, when the first thread starts: so before the runtime makes its threads.
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        std::env::set_var("RUST_MIN_STACK", THREAD_STACK_BYTES);
    }
    let args = <WorkerArgs as clap::Parser>::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args, registry))
}

/// Runs a worker node as `args` ask, over the tasks of `registry`.
pub async fn run(args: WorkerArgs, registry: fn() -> Registry) -> Result<()> {
    let mut config = CeleryConfig::load(Some(&args.common.config))?;
    let _telemetry = args.common.init_logging(&config, "rcelery-worker")?;
    config.worker_send_task_events |= args.task_events;
    if let Some(concurrency) = args.concurrency {
        config.worker_concurrency = concurrency;
    }
    if let Some(port) = args.metrics_port {
        config.worker_metrics_port = Some(port);
    }
    let metrics = Arc::new(WorkerMetrics::new());
    if let Some(port) = config.worker_metrics_port {
        let address = (config.worker_metrics_host.as_str(), port);
        let listener = tokio::net::TcpListener::bind(address).await?;
        tracing::info!(address = %listener.local_addr()?, "serving Prometheus metrics at /metrics");
        let served = metrics.clone();
        tokio::spawn(crate::metrics::serve(
            listener,
            Arc::new(move || served.render()),
        ));
    }
    let queues = if args.queues.is_empty() {
        vec![config.task_default_queue.clone()]
    } else {
        args.queues
    };
    let hostname = expand_hostname(&args.hostname);
    let (warm, cold) = (CancellationToken::new(), CancellationToken::new());
    tokio::spawn(watch_signals(warm.clone(), cold.clone()));
    // The first start must succeed (a wrong URL is a clear error at once); after a lost
    // connection the worker reconnects with backoff instead of exiting.
    let mut worker = Worker::new(config.clone(), registry(), hostname.clone(), queues.clone())
        .await?
        .with_metrics(metrics.clone());
    loop {
        let worker_cold = worker.cold_shutdown();
        let link = cold.clone();
        tokio::spawn(async move {
            link.cancelled().await;
            worker_cold.cancel();
        });
        match worker.run(warm.clone().cancelled_owned()).await {
            Ok(()) => break,
            Err(Error::ConnectionLost) => tracing::warn!("broker connection lost; reconnecting"),
            Err(error) => return Err(error),
        }
        worker = match reconnect(&config, registry, &hostname, &queues, &warm).await {
            Some(worker) => {
                metrics.reconnected();
                worker.with_metrics(metrics.clone())
            }
            None => break,
        };
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// A new worker once the broker answers again, retrying with backoff up to 30 s between tries;
/// `None` if shutdown is asked for meanwhile.
async fn reconnect(
    config: &CeleryConfig,
    registry: fn() -> Registry,
    hostname: &str,
    queues: &[String],
    warm: &CancellationToken,
) -> Option<Worker> {
    let mut backoff = Duration::from_millis(500);
    loop {
        match Worker::new(
            config.clone(),
            registry(),
            hostname.to_string(),
            queues.to_vec(),
        )
        .await
        {
            Ok(worker) => return Some(worker),
            Err(error) => tracing::warn!(%error, retry_in = ?backoff, "cannot reconnect yet"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = warm.cancelled() => return None,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// First SIGINT/SIGTERM: warm shutdown (finish running tasks); second: cold (stop at once).
async fn watch_signals(warm: CancellationToken, cold: CancellationToken) {
    crate::signals::stop_requested().await;
    tracing::info!("warm shutdown: finishing running tasks; signal again to stop at once");
    warm.cancel();
    crate::signals::stop_requested().await;
    cold.cancel();
}
