//! The result meta Celery's key-value backends store, its states, and encoded exceptions.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Celery's built-in state names; any other string is a custom state such as `PROGRESS`.
pub mod state {
    /// No result is known (never stored: a missing key reads as PENDING).
    pub const PENDING: &str = "PENDING";
    /// Running, when `task_track_started` is on.
    pub const STARTED: &str = "STARTED";
    /// The custom state our tasks use to report `{current, total}`.
    pub const PROGRESS: &str = "PROGRESS";
    /// Will run again.
    pub const RETRY: &str = "RETRY";
    /// Finished with a value.
    pub const SUCCESS: &str = "SUCCESS";
    /// Finished with an exception.
    pub const FAILURE: &str = "FAILURE";
    /// Revoked or expired before running.
    pub const REVOKED: &str = "REVOKED";

    /// States after which nothing changes.
    pub fn is_ready(state: &str) -> bool {
        matches!(state, SUCCESS | FAILURE | REVOKED)
    }

    /// States whose result is an encoded exception.
    pub fn is_exception(state: &str) -> bool {
        matches!(state, FAILURE | RETRY | REVOKED)
    }
}

/// An exception as Celery's JSON serializer writes it, so Python re-raises the same class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExceptionInfo {
    /// Class name, e.g. `ValueError`.
    pub exc_type: String,
    /// The exception's `args`.
    pub exc_message: Value,
    /// Module Python imports the class from, e.g. `builtins`.
    pub exc_module: String,
}

impl ExceptionInfo {
    /// An exception of a class from `module` with one message argument.
    pub fn new(module: &str, class: &str, message: impl Into<String>) -> Self {
        Self {
            exc_type: class.into(),
            exc_message: json!([message.into()]),
            exc_module: module.into(),
        }
    }

    /// An exception of a class from `module` raised with these `args`, as `Class(*args)`.
    pub fn with_args(module: &str, class: &str, args: Vec<Value>) -> Self {
        Self {
            exc_type: class.into(),
            exc_message: Value::Array(args),
            exc_module: module.into(),
        }
    }

    /// A builtin Python exception (`TypeError`, `RuntimeError`, ...).
    pub fn builtin(class: &str, message: impl Into<String>) -> Self {
        Self::new("builtins", class, message)
    }

    /// One of `celery.exceptions` (`NotRegistered`, `TaskRevokedError`, ...).
    pub fn celery(class: &str, message: impl Into<String>) -> Self {
        Self::new("celery.exceptions", class, message)
    }

    /// The message as `str(exc)` shows it: the one argument, or all of them joined.
    pub fn message(&self) -> String {
        let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
        match &self.exc_message {
            Value::Array(args) => args.iter().map(text).collect::<Vec<_>>().join(", "),
            other => text(other),
        }
    }

    /// `repr(exc)`, as events and Flower show it.
    pub fn repr(&self) -> String {
        let args = match &self.exc_message {
            Value::Array(args) => args.clone(),
            other => vec![other.clone()],
        };
        let args = super::repr::repr_args(&args);
        let inner = args
            .strip_prefix('(')
            .and_then(|a| a.strip_suffix(')'))
            .unwrap_or(&args);
        format!("{}({})", self.exc_type, inner.trim_end_matches(','))
    }

    /// The encoded form stored as a result.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("exception info always serializes")
    }
}

/// The fields `result_extended` adds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Extended {
    /// Task name.
    pub name: String,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// Hostname of the worker.
    pub worker: String,
    /// Retries so far.
    pub retries: u32,
    /// Queue the message came from.
    pub queue: String,
}

/// `celery-task-meta-<id>` as Celery writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMeta {
    /// State name.
    pub status: String,
    /// Return value, state meta, or encoded exception.
    pub result: Value,
    /// Traceback text for exception states.
    pub traceback: Option<String>,
    /// Results of tasks this task sent.
    #[serde(default)]
    pub children: Vec<Value>,
    /// Set for ready states only.
    pub date_done: Option<String>,
    /// The task id.
    pub task_id: String,
    /// Group id, when the task was a group member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Parent task id, when one sent this task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// Present when `result_extended` is on.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub extended: Option<Extended>,
}

impl ResultMeta {
    /// A meta for `state` with `result`, dated now when the state is ready.
    pub fn new(task_id: &str, state: &str, result: Value, now: DateTime<Utc>) -> Self {
        Self {
            status: state.into(),
            result,
            traceback: None,
            children: Vec::new(),
            date_done: state::is_ready(state)
                .then(|| now.to_rfc3339_opts(SecondsFormat::Micros, false)),
            task_id: task_id.into(),
            group_id: None,
            parent_id: None,
            extended: None,
        }
    }

    /// The stored exception, for exception states.
    pub fn exception(&self) -> Option<ExceptionInfo> {
        if !state::is_exception(&self.status) {
            return None;
        }
        serde_json::from_value(self.result.clone()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_meta_has_celerys_shape() {
        let now = DateTime::parse_from_rfc3339("2026-11-25T05:24:14.328674+00:00")
            .unwrap()
            .to_utc();
        let meta = ResultMeta::new("c9cc", state::SUCCESS, json!(5), now);
        assert_eq!(
            serde_json::to_value(&meta).unwrap(),
            json!({"status": "SUCCESS", "result": 5, "traceback": null, "children": [],
                   "date_done": "2026-11-25T05:24:14.328674+00:00", "task_id": "c9cc"})
        );
        let progress = ResultMeta::new(
            "c9cc",
            state::PROGRESS,
            json!({"current": 1, "total": 4}),
            now,
        );
        assert_eq!(progress.date_done, None);
    }

    #[test]
    fn extended_fields_are_flat() {
        let mut meta = ResultMeta::new("id", state::STARTED, json!({}), Utc::now());
        meta.parent_id = Some("p".into());
        meta.extended = Some(Extended {
            name: "tasks.add".into(),
            args: vec![json!(1)],
            kwargs: Map::new(),
            worker: "w@h".into(),
            retries: 0,
            queue: "celery".into(),
        });
        let value = serde_json::to_value(&meta).unwrap();
        assert_eq!(
            (&value["name"], &value["worker"], &value["parent_id"]),
            (&json!("tasks.add"), &json!("w@h"), &json!("p"))
        );
        assert!(value.get("group_id").is_none());
        assert_eq!(serde_json::from_value::<ResultMeta>(value).unwrap(), meta);
    }

    #[test]
    fn exceptions_encode_like_celery() {
        let exc = ExceptionInfo::builtin("ValueError", "boom");
        assert_eq!(
            exc.to_value(),
            json!({"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"})
        );
        assert_eq!(exc.repr(), "ValueError('boom')");
        assert_eq!(exc.message(), "boom");
        let meta = ResultMeta::new("id", state::FAILURE, exc.to_value(), Utc::now());
        assert_eq!(meta.exception(), Some(exc));
    }
}
