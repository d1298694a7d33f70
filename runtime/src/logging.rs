//! Log set-up shared by every binary: `tracing` to stderr, level from `--loglevel` or `RUST_LOG`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `level` is Celery's `--loglevel` (debug, info, warning, error,
/// critical); `RUST_LOG`, when set, wins.
pub fn init(level: &str) {
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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
