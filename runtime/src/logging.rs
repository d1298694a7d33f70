//! Log set-up shared by every binary: `tracing` to stderr, level from `--loglevel` or `RUST_LOG`,
//! lines as text or as JSON (`--log-format`), and spans to OpenTelemetry when tracing is on.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::telemetry::Telemetry;

/// How log lines are written. Text is for people; JSON (one object a line) is for log
/// collectors, which would otherwise have to parse the text layout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people: `timestamp LEVEL target: message field=value ...`.
    #[default]
    Text,
    /// One JSON object a line: timestamp, level, message, the event's fields, target, spans.
    Json,
}

/// Whether the installed subscriber writes colour codes.
static IN_COLOR: OnceLock<bool> = OnceLock::new();

/// Whether log lines are written in colour (`false` before [`init`]), as `inspect conf` reports
/// Celery's `worker_log_color`.
pub fn in_color() -> bool {
    IN_COLOR.get().copied().unwrap_or(false)
}

/// Installs the global subscriber. `level` is Celery's `--loglevel` (debug, info, warning, error,
/// critical); `RUST_LOG`, when set, wins. Spans also go to `telemetry`'s export when it has one.
pub fn init(level: &str, format: LogFormat, telemetry: &Telemetry) {
    let level = match level.to_ascii_lowercase().as_str() {
        "warning" | "warn" => "warn",
        "critical" | "fatal" => "error",
        other => match other {
            "trace" | "debug" | "info" | "error" => other,
            _ => "info",
        },
    }
    .to_string();
    // rusty-celery's app handle logs its own (unused) broker set-up at info: keep it quiet.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},celery=warn")));
    let color = format == LogFormat::Text && std::io::stderr().is_terminal();
    let _ = IN_COLOR.set(color);
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => lines.with_ansi(color).boxed(),
        // The event's fields sit beside `message` at the top level, so a collector indexes
        // them as they are; no colour codes even on a terminal, so every line stays JSON.
        LogFormat::Json => lines.json().flatten_event(true).with_ansi(false).boxed(),
    };
    // Each layer filters for itself: the log level chooses lines, not spans, so a process that
    // logs only warnings still traces.
    let _ = tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .with(telemetry.layer())
        .try_init();
}
