//! The tasks of Celery's own integration suite (`t/integration/tasks.py` in the `celery` sdist),
//! in Rust, under the names the suite calls them by, so the suite runs against our worker
//! (`make celery-suite`). What a task does follows the Python original; a task the suite needs
//! that Rust cannot express is left out, with the reason, in `not_run.toml`.
//!
//! These are the suite's tasks, not the product's: the product's own tasks live in `tasks/`.

// The crate's macro implements `Task` inside a const block, which this lint flags.
#![allow(non_local_definitions)]

mod arithmetic;
mod failures;
mod records;
mod rejects;
mod replace;
mod request;
mod retries;
mod signatures;

use runtime::registry::Registry;
use serde_json::Value;

/// Every ported task.
pub fn registry() -> Registry {
    let registry = arithmetic::register(Registry::new());
    let registry = failures::register(registry);
    let registry = retries::register(registry);
    let registry = rejects::register(registry);
    let registry = records::register(registry);
    let registry = replace::register(registry);
    let registry = signatures::register(registry);
    request::register(registry)
}

/// Python's truth of a JSON value (`if value:`), as the suite's tasks test their arguments.
pub(crate) fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}
