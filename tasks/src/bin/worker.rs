//! `worker`: runs the Rust tasks as a Celery worker node (`celery worker` options).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use runtime::worker::{expand_hostname, Worker};
use runtime::CeleryConfig;

#[derive(Parser)]
#[command(about = "Run the Rust tasks as a Celery worker")]
struct Args {
    /// Settings file (Celery setting names; CELERY_* environment variables override).
    #[arg(long, default_value = "celeryconfig.toml")]
    config: PathBuf,
    /// Comma-separated queues to consume (default: task_default_queue).
    #[arg(short = 'Q', long, value_delimiter = ',')]
    queues: Vec<String>,
    /// Tasks run at once (default: worker_concurrency).
    #[arg(short = 'c', long)]
    concurrency: Option<usize>,
    /// Node name; %h is the host name, %n its first label, %d the domain.
    #[arg(short = 'n', long, default_value = "celery@%h")]
    hostname: String,
    /// Send task events from the start (worker_send_task_events).
    #[arg(short = 'E', long = "task-events")]
    task_events: bool,
    /// debug, info, warning, error or critical.
    #[arg(short = 'l', long, default_value = "info")]
    loglevel: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    runtime::logging::init(&args.loglevel);
    let mut config = CeleryConfig::load(Some(&args.config)).context("loading settings")?;
    config.worker_send_task_events |= args.task_events;
    if let Some(concurrency) = args.concurrency {
        config.worker_concurrency = concurrency;
    }
    let queues = if args.queues.is_empty() {
        vec![config.task_default_queue.clone()]
    } else {
        args.queues
    };
    let worker = Worker::new(
        config,
        tasks::registry(),
        expand_hostname(&args.hostname),
        queues,
    )
    .await
    .context("starting the worker")?;
    let cold = worker.cold_shutdown();
    worker
        .run(async move {
            shutdown_signal().await;
            tracing::info!("warm shutdown: finishing running tasks; signal again to stop at once");
            tokio::spawn(async move {
                shutdown_signal().await;
                cold.cancel();
            });
        })
        .await?;
    tracing::info!("worker stopped");
    Ok(())
}

/// Resolves on the next SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}
