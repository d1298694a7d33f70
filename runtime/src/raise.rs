//! A Rust task ending with a Python exception of a class it names, so Python's `get()` re-raises
//! that class: `return Err(raise(ExceptionInfo::with_args("myapp.errors", "QuotaExceeded",
//! vec![json!("over quota")])))`.
//!
//! The crate's `TaskError` holds only a message, so the exception travels beside it: [`raise`]
//! records it in the running task's context (see [`crate::progress`]) and the registry stores
//! it in place of the `RuntimeError` a bare `TaskError` becomes.

use celery::error::TaskError;

use crate::progress::record_raised;
use crate::protocol::result::ExceptionInfo;

/// Records `exc` as the calling task's exception and returns the error that ends the task with
/// it (a failure, or a retry for a task declared `retry_for_unexpected`). Outside a task there is
/// nothing to record, and the error is the bare `RuntimeError` it would be anyway.
pub fn raise(exc: ExceptionInfo) -> TaskError {
    let message = exc.message();
    // Outside a task nothing can store the exception; the bare error still ends the call.
    let _ = record_raised(exc);
    TaskError::UnexpectedError(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::TaskContext;
    use serde_json::json;

    #[tokio::test]
    async fn the_raised_exception_is_kept_for_the_task_that_raised_it() {
        let (context, _updates) = TaskContext::new("t1");
        let exc = ExceptionInfo::with_args(
            "t.integration.tasks",
            "ExpectedException",
            vec![json!("Task expected to fail"), json!(2)],
        );
        let error = context.clone().scope(async { raise(exc.clone()) }).await;
        assert!(
            matches!(&error, TaskError::UnexpectedError(m) if m == "Task expected to fail, 2"),
            "{error:?}"
        );
        assert_eq!(context.take_raised(), Some(exc));
        assert_eq!(context.take_raised(), None);
    }

    #[test]
    fn outside_a_task_it_is_only_the_error() {
        let error = raise(ExceptionInfo::builtin("ValueError", "bad"));
        assert!(matches!(error, TaskError::UnexpectedError(m) if m == "bad"));
    }
}
