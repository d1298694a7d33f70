//! Log set-up shared by every binary: `tracing` to stderr, level from `--loglevel` or `RUST_LOG`,
//! lines as text or as JSON (`--log-format`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

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

/// Installs the global subscriber. `level` is Celery's `--loglevel` (debug, info, warning, error,
/// critical); `RUST_LOG`, when set, wins.
pub fn init(level: &str, format: LogFormat) {
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
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => subscriber.with_ansi(std::io::stderr().is_terminal()).init(),
        // The event's fields sit beside `message` at the top level, so a collector indexes
        // them as they are; no colour codes even on a terminal, so every line stays JSON.
        LogFormat::Json => subscriber
            .json()
            .flatten_event(true)
            .with_ansi(false)
            .init(),
    }
}
