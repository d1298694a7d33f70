//! The signals that ask a process to stop, as Celery's processes take them: SIGINT (Ctrl-C) and
//! SIGTERM.

/// Completes at the next SIGINT or SIGTERM.
pub async fn stop_requested() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}
