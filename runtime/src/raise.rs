//! How a Rust task ends other than by returning, as Celery's Python tasks do: raising a Python
//! exception of a class it names, so Python's `get()` re-raises that class, or retrying with
//! Celery's `Task.retry` options (the exception, when, how often, new arguments).
//!
//! ```ignore
//! return Err(raise(ExceptionInfo::with_args("myapp.errors", "QuotaExceeded", vec![json!(3)])));
//! return Err(retry(Retry { countdown: Some(5.0), ..Retry::default() }));
//! ```
//!
//! The crate's `TaskError` holds only a message, so what the task asked travels beside it: these
//! functions record it for the running task (a task-local the registry scopes each run in) and
//! the registry reads it back when the task's error comes out.

use std::future::Future;
use std::sync::{Arc, Mutex};

use celery::error::TaskError;
use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value};

use crate::protocol::result::ExceptionInfo;

tokio::task_local! {
    static RAISED: Arc<Mutex<Option<Raised>>>;
}

/// What a task's `retry` asks for, as the keyword arguments of Celery's `Task.retry`; every field
/// left `None` keeps what the task had.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Retry {
    /// The exception stored as the RETRY state, and as the FAILURE once retries run out.
    pub exc: Option<ExceptionInfo>,
    /// Run again this many seconds from now.
    pub countdown: Option<f64>,
    /// Run again at this time (when no `countdown`).
    pub eta: Option<DateTime<Utc>>,
    /// The most retries, instead of the task's `max_retries`.
    pub max_retries: Option<u32>,
    /// Positional arguments of the next run, instead of this run's.
    pub args: Option<Vec<Value>>,
    /// Keyword arguments of the next run, instead of this run's.
    pub kwargs: Option<Map<String, Value>>,
    /// The next run expires this many seconds from now.
    pub expires: Option<f64>,
}

/// How a task said it ends, beside its `TaskError`.
#[derive(Debug, Clone, PartialEq)]
pub enum Raised {
    /// With this exception.
    Exception(ExceptionInfo),
    /// By running again, so.
    Retry(Retry),
}

/// Records `exc` as the calling task's exception and returns the error that ends the task with
/// it (a failure, or a retry for a task declared `retry_for_unexpected`). Outside a task there is
/// nothing to record, and the error is the bare `RuntimeError` it would be anyway.
pub fn raise(exc: ExceptionInfo) -> TaskError {
    let message = exc.message();
    record(Raised::Exception(exc));
    TaskError::UnexpectedError(message)
}

/// Records `retry` for the calling task and returns the error that makes it run again.
pub fn retry(retry: Retry) -> TaskError {
    let eta = match retry.countdown {
        Some(seconds) => Some(Utc::now() + seconds_from_now(seconds)),
        None => retry.eta,
    };
    record(Raised::Retry(retry));
    TaskError::Retry(eta)
}

/// `seconds` as a duration, clamped to what a date can add (a hostile countdown cannot panic).
pub(crate) fn seconds_from_now(seconds: f64) -> Duration {
    const MAX_SECONDS: f64 = 100.0 * 365.0 * 86_400.0;
    let millis = (seconds.clamp(0.0, MAX_SECONDS) * 1000.0) as i64;
    Duration::milliseconds(millis)
}

fn record(raised: Raised) {
    // Outside a task nothing reads it: the returned error alone ends the call.
    let _ = RAISED.try_with(|slot| {
        if let Ok(mut slot) = slot.lock() {
            *slot = Some(raised);
        }
    });
}

/// Runs a task's `future`, returning its output and what it last raised or asked through this
/// module.
pub(crate) async fn catching<F: Future>(future: F) -> (F::Output, Option<Raised>) {
    let slot = Arc::new(Mutex::new(None));
    let output = RAISED.scope(slot.clone(), future).await;
    let raised = slot.lock().ok().and_then(|mut slot| slot.take());
    (output, raised)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn the_raised_exception_is_kept_for_the_task_that_raised_it() {
        let exc = ExceptionInfo::with_args(
            "t.integration.tasks",
            "ExpectedException",
            vec![json!("Task expected to fail"), json!(2)],
        );
        let (error, raised) = catching(async { raise(exc.clone()) }).await;
        assert!(
            matches!(&error, TaskError::UnexpectedError(m) if m == "Task expected to fail, 2"),
            "{error:?}"
        );
        assert_eq!(raised, Some(Raised::Exception(exc)));
        let (_, nothing) = catching(async {}).await;
        assert_eq!(nothing, None);
    }

    #[tokio::test]
    async fn a_retry_keeps_its_options_and_its_countdown_becomes_the_eta() {
        let asked = Retry {
            countdown: Some(5.0),
            max_retries: Some(1),
            args: Some(vec![json!(2)]),
            ..Retry::default()
        };
        let before = Utc::now();
        let (error, raised) = catching(async { retry(asked.clone()) }).await;
        let TaskError::Retry(Some(eta)) = error else {
            panic!("{error:?}")
        };
        assert!(eta >= before + Duration::seconds(5) && eta <= Utc::now() + Duration::seconds(5));
        assert_eq!(raised, Some(Raised::Retry(asked)));
    }

    #[test]
    fn outside_a_task_it_is_only_the_error() {
        let error = raise(ExceptionInfo::builtin("ValueError", "bad"));
        assert!(matches!(error, TaskError::UnexpectedError(m) if m == "bad"));
        assert_eq!(seconds_from_now(1e300), Duration::days(36_500));
    }
}
