//! `call`: sends a task by name, like `celery call`, or a whole canvas (`--canvas`), and
//! optionally waits for the result.
//!
//! Prints the task id (for a canvas, the id of each result it ends with); with `--wait`, then
//! each result as JSON. Exit status 1 when a task failed (its exception on stderr), 2 when
//! waiting timed out.

use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::canvas::Signature;
use crate::cli::Common;
use crate::client::{Client, SendOptions};
use crate::{CeleryConfig, Error, Result};

/// `call`'s command line.
#[derive(Debug, clap::Parser)]
#[command(about = "Send a Celery task by name")]
// Quieter than the long-running binaries: stdout carries the ids and results, and stderr should
// stay empty unless something goes wrong.
#[command(mut_arg("loglevel", |arg| arg.default_value("warning")))]
pub struct CallArgs {
    /// Task name, e.g. tasks.add or proj.tasks.mul.
    #[arg(required_unless_present = "canvas")]
    pub name: Option<String>,
    /// A canvas to send instead (task, chain, group or chord), as Celery serializes a signature:
    /// `json.dumps(sig)` in Python, `Signature::to_value` in Rust.
    #[arg(long, conflicts_with = "name")]
    pub canvas: Option<String>,
    /// Positional arguments as a JSON list.
    #[arg(short = 'a', long, default_value = "[]")]
    pub args: String,
    /// Keyword arguments as a JSON object.
    #[arg(short = 'k', long, default_value = "{}")]
    pub kwargs: String,
    /// Queue (default: task_routes, then task_default_queue).
    #[arg(long)]
    pub queue: Option<String>,
    /// Seconds to wait before the task may run.
    #[arg(long)]
    pub countdown: Option<f64>,
    /// Earliest run time, ISO-8601.
    #[arg(long)]
    pub eta: Option<DateTime<Utc>>,
    /// Seconds after which the task is discarded if not started.
    #[arg(long)]
    pub expires: Option<f64>,
    /// Wait for the result and print it.
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait for the result.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    #[command(flatten)]
    pub common: Common,
}

/// Parses the command line, sends, and answers the exit status.
pub fn main() -> Result<ExitCode> {
    let args = <CallArgs as clap::Parser>::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

/// Sends as `args` ask and prints the ids, then the results when asked to wait.
pub async fn run(args: CallArgs) -> Result<ExitCode> {
    let config = CeleryConfig::load(Some(&args.common.config))?;
    let _telemetry = args.common.init_logging(&config, "rcelery-call")?;
    let json = |text: &str, what: &str| {
        serde_json::from_str::<Value>(text)
            .map_err(|e| Error::InvalidOption(format!("{what} must be JSON: {e}")))
    };
    let positional: Vec<Value> = match json(&args.args, "--args")? {
        Value::Array(items) => items,
        _ => return Err(Error::InvalidOption("--args must be a JSON list".into())),
    };
    let keyword: Map<String, Value> = match json(&args.kwargs, "--kwargs")? {
        Value::Object(fields) => fields,
        _ => {
            return Err(Error::InvalidOption(
                "--kwargs must be a JSON object".into(),
            ))
        }
    };
    let client = Client::connect(config).await?;
    let options = SendOptions {
        queue: args.queue,
        countdown: args.countdown,
        eta: args.eta,
        expires: args.expires,
        ..SendOptions::default()
    };
    let results = match (&args.canvas, args.name) {
        (Some(canvas), _) => {
            let signature = Signature::from_value(&json(canvas, "--canvas")?)
                .map_err(|e| Error::InvalidOption(format!("--canvas: {e}")))?;
            client.apply(&signature).await?
        }
        (None, Some(name)) => vec![
            client
                .send_task(&name, positional, keyword, options)
                .await?,
        ],
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
            Err(error) => return Err(error),
        }
    }
    Ok(ExitCode::SUCCESS)
}
