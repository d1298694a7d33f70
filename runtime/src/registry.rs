//! The tasks a worker can run, each defined with rusty-celery's `#[celery::task]` macro.
//!
//! The crate gives us the task type (`Task`, its `ARGS` and `Params`); this module adds what its
//! own worker lacks: Celery's argument binding (positional and keyword, with Python's
//! `TypeError`s for too many, duplicate, unknown or missing arguments), running blocking task
//! code off the async threads, and turning every outcome into what the backend stores.
//!
//! A task takes Python's `*args` and `**kwargs` through two reserved parameter names:
//! `var_args: Vec<Value>` gets the positional arguments past the named ones (and makes the
//! parameters after it keyword-only), `var_kwargs: Map<String, Value>` the keyword arguments no
//! parameter is named for. `def sleeping(i, **_)` is
//! `fn sleeping(i: f64, var_kwargs: Map<String, Value>)`.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use celery::error::TaskError;
use celery::protocol::{Message as CrateMessage, MessageHeaders, MessageProperties};
use celery::task::{Request, Task, TaskOptions};
use celery::Celery;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::canvas::Signature;
use crate::progress::TaskContext;
use crate::protocol::result::ExceptionInfo;
use crate::protocol::TaskRequest;

/// How a task run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Returned this value.
    Success(Value),
    /// Raised this exception.
    Failure(ExceptionInfo),
    /// Asked to run again, at `eta` or after the task's backoff: `TaskError::Retry` (from
    /// `retry_with_countdown`/`retry_with_eta`), an `ExpectedError`, or an `UnexpectedError`
    /// of a task declared `retry_for_unexpected = true`.
    Retry {
        /// When to run again, if the task said.
        eta: Option<DateTime<Utc>>,
        /// What to store as the RETRY state (and as FAILURE once retries run out).
        exc: ExceptionInfo,
    },
    /// The task's code panicked: its run is lost, as when a Celery pool process dies mid-task.
    /// The panic message says where.
    Panicked(String),
    /// Asked to be replaced by this signature ([`crate::replace::replace`]), whatever it
    /// returned after asking.
    Replaced(Signature),
}

/// One registered task, its type erased.
#[async_trait]
pub trait Handler: Send + Sync {
    /// The task's own options (`#[celery::task(max_retries = .., time_limit = ..)]`).
    fn options(&self) -> TaskOptions;

    /// Runs the task for `request` on this worker node, within `context`.
    async fn run(
        &self,
        app: Arc<Celery>,
        request: &TaskRequest,
        hostname: &str,
        context: TaskContext,
    ) -> Outcome;
}

/// Where a task's code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Execution {
    /// On the async runtime: the task awaits and never blocks.
    Async,
    /// On the blocking thread pool: the task may compute or block for long.
    Blocking,
}

struct TaskHandler<T> {
    execution: Execution,
    task: PhantomData<fn() -> T>,
}

/// Task name to handler.
#[derive(Clone)]
pub struct Registry {
    tasks: BTreeMap<&'static str, Arc<dyn Handler>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// A registry of Celery's built-in tasks that the runtime's own features send
    /// (`celery.accumulate`, which gathers the results of a group a task is replaced with).
    pub fn new() -> Self {
        Self {
            tasks: BTreeMap::new(),
        }
        .task::<crate::replace::accumulate>()
    }

    /// Registers an async task under its `name`; it runs on the async threads.
    pub fn task<T>(self) -> Self
    where
        T: Task + 'static,
        T::Returns: Serialize,
    {
        self.with::<T>(Execution::Async)
    }

    /// Registers a task whose code blocks or computes; it runs on the blocking thread pool.
    pub fn blocking_task<T>(self) -> Self
    where
        T: Task + 'static,
        T::Returns: Serialize,
    {
        self.with::<T>(Execution::Blocking)
    }

    fn with<T>(mut self, execution: Execution) -> Self
    where
        T: Task + 'static,
        T::Returns: Serialize,
    {
        self.tasks.insert(
            T::NAME,
            Arc::new(TaskHandler::<T> {
                execution,
                task: PhantomData,
            }),
        );
        self
    }

    /// The handler of `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Handler>> {
        self.tasks.get(name).cloned()
    }

    /// Registered names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.tasks.keys().copied()
    }
}

#[async_trait]
impl<T> Handler for TaskHandler<T>
where
    T: Task + 'static,
    T::Returns: Serialize,
{
    fn options(&self) -> TaskOptions {
        T::DEFAULTS
    }

    async fn run(
        &self,
        app: Arc<Celery>,
        request: &TaskRequest,
        hostname: &str,
        context: TaskContext,
    ) -> Outcome {
        let params = match bind::<T::Params>(T::NAME, T::ARGS, &request.args, &request.kwargs) {
            Ok(params) => params,
            Err(exc) => return Outcome::Failure(exc),
        };
        let mut crate_request = Request::<T>::new(app, crate_message(request), params.clone());
        crate_request.hostname = Some(hostname.to_string());
        let task = T::from_request(crate_request, T::DEFAULTS);
        let asked = context.clone();
        let run = context.scope(async move {
            let result = task.run(params).await;
            match &result {
                Ok(value) => task.on_success(value).await,
                Err(error) => task.on_failure(error).await,
            }
            result.map(|value| serde_json::to_value(&value))
        });
        let joined = match self.execution {
            // Aborted if this future is dropped (a revoke with terminate), not left running.
            Execution::Async => tokio_util::task::AbortOnDropHandle::new(tokio::spawn(run)).await,
            Execution::Blocking => {
                let runtime = tokio::runtime::Handle::current();
                tokio::task::spawn_blocking(move || runtime.block_on(run)).await
            }
        };
        // A task that asked to be replaced is, whatever it returned after asking.
        match (joined, asked.take_replacement()) {
            (Ok(_), Some(replacement)) => Outcome::Replaced(replacement),
            (Ok(Ok(Ok(value))), None) => Outcome::Success(value),
            (Ok(Ok(Err(error))), None) => Outcome::Failure(ExceptionInfo::builtin(
                "TypeError",
                format!("{}() returned a value JSON cannot hold: {error}", T::NAME),
            )),
            (Ok(Err(error)), None) => outcome_of(
                error,
                asked.take_raised(),
                T::DEFAULTS.retry_for_unexpected == Some(true),
            ),
            (Err(join), _) => {
                Outcome::Panicked(format!("{}() panicked: {}", T::NAME, panic_message(join)))
            }
        }
    }
}

/// The parameter name that collects the positional arguments past the named ones, as Python's
/// `*args` does: declare it `var_args: Vec<serde_json::Value>`. Parameters after it are
/// keyword-only, as in Python (`fn retry_once(var_args: Vec<Value>, expires: Option<f64>)` is
/// `def retry_once(*args, expires=None)`).
pub const VAR_ARGS: &str = "var_args";

/// The parameter name that collects the keyword arguments no named parameter takes, as Python's
/// `**kwargs` does: declare it `var_kwargs: serde_json::Map<String, serde_json::Value>`.
pub const VAR_KWARGS: &str = "var_kwargs";

/// Binds Celery's positional and keyword arguments to the task's parameters, the way Python
/// binds a call (with [`VAR_ARGS`] and [`VAR_KWARGS`] as `*args` and `**kwargs`), then lets
/// serde check the types.
fn bind<P: serde::de::DeserializeOwned>(
    name: &str,
    arg_names: &[&str],
    args: &[Value],
    kwargs: &Map<String, Value>,
) -> Result<P, ExceptionInfo> {
    let type_error =
        |message: String| ExceptionInfo::builtin("TypeError", format!("{name}() {message}"));
    let named = |arg: &str| arg != VAR_ARGS && arg != VAR_KWARGS;
    let var_args = arg_names.contains(&VAR_ARGS);
    let var_kwargs = arg_names.contains(&VAR_KWARGS);
    let positional: Vec<&str> = arg_names
        .iter()
        .copied()
        .take_while(|arg| *arg != VAR_ARGS)
        .filter(|arg| named(arg))
        .collect();
    if args.len() > positional.len() && !var_args {
        return Err(type_error(format!(
            "takes {} positional arguments but {} were given",
            positional.len(),
            args.len()
        )));
    }
    let mut params = Map::new();
    for (arg_name, value) in positional.iter().zip(args) {
        params.insert((*arg_name).to_string(), value.clone());
    }
    let mut rest = Map::new();
    for (key, value) in kwargs {
        let slot = if named(key) && arg_names.contains(&key.as_str()) {
            &mut params
        } else if var_kwargs {
            &mut rest
        } else {
            return Err(type_error(format!(
                "got an unexpected keyword argument '{key}'"
            )));
        };
        if slot.insert(key.clone(), value.clone()).is_some() {
            return Err(type_error(format!(
                "got multiple values for argument '{key}'"
            )));
        }
    }
    if var_args {
        let extra = args.iter().skip(positional.len()).cloned().collect();
        params.insert(VAR_ARGS.into(), Value::Array(extra));
    }
    if var_kwargs {
        params.insert(VAR_KWARGS.into(), Value::Object(rest));
    }
    serde_json::from_value(Value::Object(params)).map_err(|error| {
        let text = error.to_string();
        match text
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split_once('`'))
        {
            Some((field, _)) => type_error(format!("missing 1 required argument: '{field}'")),
            None => type_error(format!("got an argument of the wrong type: {text}")),
        }
    })
}

/// The crate's message for `Request::new`: only the fields its `Request` reads.
fn crate_message(request: &TaskRequest) -> CrateMessage {
    let seconds = |limit: Option<f64>| limit.map(|s| s.ceil() as u32);
    CrateMessage {
        properties: MessageProperties {
            correlation_id: request.id.clone(),
            content_type: crate::protocol::message::JSON.into(),
            content_encoding: "utf-8".into(),
            reply_to: request.properties.reply_to.clone(),
        },
        headers: MessageHeaders {
            id: request.id.clone(),
            task: request.task.clone(),
            root_id: request.root_id.clone(),
            parent_id: request.parent_id.clone(),
            group: request.group.clone(),
            eta: request.eta,
            expires: request.expires,
            retries: Some(request.retries),
            timelimit: (seconds(request.timelimit.1), seconds(request.timelimit.0)),
            origin: request.origin.clone(),
            ..MessageHeaders::default()
        },
        raw_body: Vec::new(),
    }
}

/// A task's error as Celery would end it, with the Python exception Celery users expect: the
/// one the task named with [`crate::raise::raise`], else a `RuntimeError` with its message.
fn outcome_of(
    error: TaskError,
    raised: Option<ExceptionInfo>,
    retry_for_unexpected: bool,
) -> Outcome {
    let exception =
        |message: String| raised.unwrap_or_else(|| ExceptionInfo::builtin("RuntimeError", message));
    match error {
        TaskError::Retry(eta) => Outcome::Retry {
            eta,
            exc: ExceptionInfo::celery("Retry", "Retry requested"),
        },
        TaskError::ExpectedError(message) => Outcome::Retry {
            eta: None,
            exc: exception(message),
        },
        TaskError::UnexpectedError(message) if retry_for_unexpected => Outcome::Retry {
            eta: None,
            exc: exception(message),
        },
        TaskError::UnexpectedError(message) => Outcome::Failure(exception(message)),
        TaskError::TimeoutError => {
            Outcome::Failure(ExceptionInfo::celery("TimeLimitExceeded", "task timed out"))
        }
    }
}

fn panic_message(join: tokio::task::JoinError) -> String {
    match join.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into()),
        Err(join) => join.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    struct AddParams {
        x: i64,
        y: i64,
    }

    fn call(args: Value, kwargs: Value) -> Result<AddParams, String> {
        let args = args.as_array().unwrap().clone();
        let kwargs = kwargs.as_object().unwrap().clone();
        bind::<AddParams>("tasks.add", &["x", "y"], &args, &kwargs).map_err(|e| {
            assert_eq!(
                (e.exc_type.as_str(), e.exc_module.as_str()),
                ("TypeError", "builtins")
            );
            e.message()
        })
    }

    #[test]
    fn binds_positional_keyword_and_mixed() {
        let expected = Ok(AddParams { x: 1, y: 2 });
        assert_eq!(call(json!([1, 2]), json!({})), expected);
        assert_eq!(call(json!([]), json!({"x": 1, "y": 2})), expected);
        assert_eq!(call(json!([1]), json!({"y": 2})), expected);
    }

    #[test]
    fn bad_calls_are_type_errors_like_pythons() {
        assert_eq!(
            call(json!([1, 2, 3]), json!({})).unwrap_err(),
            "tasks.add() takes 2 positional arguments but 3 were given"
        );
        assert_eq!(
            call(json!([1]), json!({})).unwrap_err(),
            "tasks.add() missing 1 required argument: 'y'"
        );
        assert_eq!(
            call(json!([1]), json!({"x": 2})).unwrap_err(),
            "tasks.add() got multiple values for argument 'x'"
        );
        assert_eq!(
            call(json!([1, 2]), json!({"z": 3})).unwrap_err(),
            "tasks.add() got an unexpected keyword argument 'z'"
        );
        let wrong = call(json!(["a", 2]), json!({})).unwrap_err();
        assert!(
            wrong.starts_with(
                "tasks.add() got an argument of the wrong type: invalid type: string \"a\""
            ),
            "{wrong}"
        );
    }

    /// `def retry_once(x, *args, expires=None, **kwargs)`.
    #[derive(Debug, Deserialize, PartialEq)]
    struct VariadicParams {
        x: i64,
        var_args: Vec<Value>,
        expires: Option<f64>,
        var_kwargs: Map<String, Value>,
    }

    const VARIADIC: &[&str] = &["x", VAR_ARGS, "expires", VAR_KWARGS];

    fn call_variadic(names: &[&str], args: Value, kwargs: Value) -> Result<Value, String> {
        let args = args.as_array().unwrap().clone();
        let kwargs = kwargs.as_object().unwrap().clone();
        bind::<Value>("t.v", names, &args, &kwargs).map_err(|e| e.message())
    }

    #[test]
    fn variadic_parameters_collect_the_rest_as_pythons_star_args_and_kwargs() {
        let args = json!([1, 2, "three"]);
        let kwargs = json!({"expires": 60.0, "other": true});
        let bound = bind::<VariadicParams>(
            "t.v",
            VARIADIC,
            args.as_array().unwrap(),
            kwargs.as_object().unwrap(),
        )
        .unwrap();
        assert_eq!(
            bound,
            VariadicParams {
                x: 1,
                var_args: vec![json!(2), json!("three")],
                expires: Some(60.0),
                var_kwargs: json!({"other": true}).as_object().unwrap().clone(),
            }
        );
        // Nothing extra: both are empty, never missing.
        assert_eq!(
            call_variadic(VARIADIC, json!([1]), json!({})),
            Ok(json!({"x": 1, "var_args": [], "var_kwargs": {}}))
        );
    }

    #[test]
    fn parameters_after_var_args_are_keyword_only() {
        assert_eq!(
            call_variadic(&[VAR_ARGS, "expires"], json!([5, 6]), json!({})),
            Ok(json!({"var_args": [5, 6]}))
        );
        assert_eq!(
            call_variadic(&[VAR_ARGS, "expires"], json!([]), json!({"expires": 1})),
            Ok(json!({"var_args": [], "expires": 1}))
        );
    }

    #[test]
    fn var_kwargs_alone_still_refuses_extra_positionals_and_duplicates() {
        let sleeping = &["i", VAR_KWARGS];
        assert_eq!(
            call_variadic(sleeping, json!([1]), json!({"queue": "q"})),
            Ok(json!({"i": 1, "var_kwargs": {"queue": "q"}}))
        );
        assert_eq!(
            call_variadic(sleeping, json!([1, 2]), json!({})).unwrap_err(),
            "t.v() takes 1 positional arguments but 2 were given"
        );
        assert_eq!(
            call_variadic(sleeping, json!([1]), json!({"i": 2})).unwrap_err(),
            "t.v() got multiple values for argument 'i'"
        );
        // Without `var_kwargs`, an unknown keyword is still refused.
        assert_eq!(
            call_variadic(&[VAR_ARGS], json!([]), json!({"z": 1})).unwrap_err(),
            "t.v() got an unexpected keyword argument 'z'"
        );
    }

    #[test]
    fn a_raised_exception_replaces_the_runtime_error() {
        let named = ExceptionInfo::with_args("t.integration.tasks", "ExpectedException", vec![]);
        let error = || TaskError::UnexpectedError("boom".into());
        assert_eq!(
            outcome_of(error(), Some(named.clone()), false),
            Outcome::Failure(named.clone())
        );
        assert_eq!(
            outcome_of(error(), None, false),
            Outcome::Failure(ExceptionInfo::builtin("RuntimeError", "boom"))
        );
        assert_eq!(
            outcome_of(error(), Some(named.clone()), true),
            Outcome::Retry {
                eta: None,
                exc: named
            }
        );
    }
}
