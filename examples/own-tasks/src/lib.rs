//! A team's own tasks, in a crate of their own: this is all it takes besides the worker binary
//! in `src/bin/own-tasks-worker.rs`. Python calls them by name (`app.send_task("own.reverse",
//! ("abc",))`) like any Celery task.

// The celery crate's macro implements `Task` inside a const block, which this lint flags.
#![allow(non_local_definitions)]

use celery::error::TaskError;
use celery::task::TaskResult;
use runtime::registry::Registry;

/// The tasks of this crate, for its worker.
pub fn registry() -> Registry {
    Registry::new().task::<reverse>().task::<divide>()
}

/// `text` backwards, by characters.
#[celery::task(name = "own.reverse")]
pub fn reverse(text: String) -> TaskResult<String> {
    Ok(text.chars().rev().collect())
}

/// `x / y`; dividing by zero fails the task, and Python's `get()` raises it.
#[celery::task(name = "own.divide")]
pub fn divide(x: f64, y: f64) -> TaskResult<f64> {
    if y == 0.0 {
        return Err(TaskError::UnexpectedError("division by zero".into()));
    }
    Ok(x / y)
}
