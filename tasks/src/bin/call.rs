//! `call`: sends a task by name, like `celery call`, or a whole canvas (`--canvas`), and
//! optionally waits for the result.
//!
//! Prints the task id (for a canvas, the id of each result it ends with); with `--wait`, then
//! each result as JSON. Exit status 1 when a task failed (its exception on stderr), 2 when
//! waiting timed out.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Parser;
use runtime::canvas::Signature;
use runtime::cli::Common;
use runtime::client::{Client, SendOptions};
use runtime::{CeleryConfig, Error};
use serde_json::{Map, Value};

#[derive(Parser)]
#[command(about = "Send a Celery task by name")]
// Quieter than the long-running binaries: stdout carries the ids and results, and stderr should
// stay empty unless something goes wrong.
#[command(mut_arg("loglevel", |arg| arg.default_value("warning")))]
struct Args {
    /// Task name, e.g. tasks.add or proj.tasks.mul.
    #[arg(required_unless_present = "canvas")]
    name: Option<String>,
    /// A canvas to send instead (task, chain, group or chord), as Celery serializes a signature:
    /// `json.dumps(sig)` in Python, `Signature::to_value` in Rust.
    #[arg(long, conflicts_with = "name")]
    canvas: Option<String>,
    /// Positional arguments as a JSON list.
    #[arg(short = 'a', long, default_value = "[]")]
    args: String,
    /// Keyword arguments as a JSON object.
    #[arg(short = 'k', long, default_value = "{}")]
    kwargs: String,
    /// Queue (default: task_routes, then task_default_queue).
    #[arg(long)]
    queue: Option<String>,
    /// Seconds to wait before the task may run.
    #[arg(long)]
    countdown: Option<f64>,
    /// Earliest run time, ISO-8601.
    #[arg(long)]
    eta: Option<DateTime<Utc>>,
    /// Seconds after which the task is discarded if not started.
    #[arg(long)]
    expires: Option<f64>,
    /// Wait for the result and print it.
    #[arg(long)]
    wait: bool,
    /// Seconds to wait for the result.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    #[command(flatten)]
    common: Common,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    args.common.init_logging();
    let positional: Vec<Value> =
        serde_json::from_str(&args.args).context("--args must be a JSON list")?;
    let keyword: Map<String, Value> =
        serde_json::from_str(&args.kwargs).context("--kwargs must be a JSON object")?;
    let config = CeleryConfig::load(Some(&args.common.config)).context("loading settings")?;
    let client = Client::connect(config).await.context("connecting")?;
    let options = SendOptions {
        queue: args.queue,
        countdown: args.countdown,
        eta: args.eta,
        expires: args.expires,
        ..SendOptions::default()
    };
    let results = match (&args.canvas, &args.name) {
        (Some(canvas), _) => {
            let value: Value = serde_json::from_str(canvas).context("--canvas must be JSON")?;
            let signature = Signature::from_value(&value).context("--canvas")?;
            client.apply(&signature).await?
        }
        (None, Some(name)) => vec![client.send_task(name, positional, keyword, options).await?],
        (None, None) => unreachable!("clap requires a task name or --canvas"),
    };
    for result in &results {
        println!("{}", result.id);
    }
    let mut outcomes = Vec::new();
    if args.wait {
        for result in &results {
            outcomes.push(result.get(Duration::from_secs_f64(args.timeout)).await);
        }
    }
    client.close().await?;
    for outcome in outcomes {
        match outcome {
            Ok(value) => println!("{value}"),
            Err(error @ Error::TaskFailed { .. }) => {
                eprintln!("{error}");
                return Ok(ExitCode::from(1));
            }
            Err(error @ Error::Timeout(_)) => {
                eprintln!("{error}");
                return Ok(ExitCode::from(2));
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(ExitCode::SUCCESS)
}
