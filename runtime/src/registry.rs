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

use std::any::Any;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use async_trait::async_trait;
use celery::error::TaskError;
use celery::protocol::{Message as CrateMessage, MessageHeaders, MessageProperties};
use celery::task::{Request, Task, TaskOptions};
use celery::Celery;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::canvas::Signature;
use crate::progress::TaskContext;
use crate::protocol::result::ExceptionInfo;
use crate::protocol::TaskRequest;
use crate::raise::{self, Raised};

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
        /// What the next run changes, as the task asked with [`crate::raise::retry`].
        next: NextRun,
    },
    /// The task rejected its message (Celery's `Reject`): back to its queue when `requeue`,
    /// else dropped with FAILURE `exc` stored.
    Rejected {
        /// Celery's `Reject` exception.
        exc: ExceptionInfo,
        /// Whether the message goes back to its queue.
        requeue: bool,
    },
    /// The task's code panicked: its run is lost, as when a Celery pool process dies mid-task.
    /// The panic message says where.
    Panicked(String),
    /// Asked to be replaced by this signature ([`crate::replace::replace`]), whatever it
    /// returned after asking.
    Replaced(Signature),
}

/// What a retried task's next run changes (all `None`: nothing).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NextRun {
    /// The most retries, instead of the task's.
    pub max_retries: Option<u32>,
    /// New positional arguments.
    pub args: Option<Vec<Value>>,
    /// New keyword arguments.
    pub kwargs: Option<Map<String, Value>>,
    /// Expires this many seconds after the retry.
    pub expires: Option<f64>,
}

/// One registered task, its type erased.
#[async_trait]
pub trait Handler: Send + Sync {
    /// The task's own options (`#[celery::task(max_retries = .., time_limit = ..)]`).
    fn options(&self) -> TaskOptions;

    /// The task's parameter names, in order (`var_args`, `var_kwargs` for Python's `*args`,
    /// `**kwargs`).
    fn parameters(&self) -> &'static [&'static str];

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
    /// On the async runtime, in the future that handles its message: the task awaits and never
    /// blocks, and a short one costs no hand-off to another runtime task.
    Async,
    /// On the blocking thread pool: the task may compute or block for long.
    Blocking,
}

struct TaskHandler<T> {
    execution: Execution,
    task: PhantomData<fn() -> T>,
}

/// Task name to handler.
#[derive(Default, Clone)]
pub struct Registry {
    tasks: BTreeMap<&'static str, Arc<dyn Handler>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
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

    /// Registers `handler` under `name`: a task the runtime defines itself, not with the macro.
    pub(crate) fn handler(mut self, name: &'static str, handler: Arc<dyn Handler>) -> Self {
        self.tasks.insert(name, handler);
        self
    }

    /// The handler of `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Handler>> {
        self.tasks.get(name).cloned()
    }

    /// Registered names, sorted; Celery's own built-ins (`celery.*`) only with `builtins`, as
    /// Celery's `inspect registered` and its worker's banner leave them out unless asked.
    pub fn names(&self, builtins: bool) -> impl Iterator<Item = &'static str> + '_ {
        self.tasks
            .keys()
            .copied()
            .filter(move |name| builtins || !name.starts_with("celery."))
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

    fn parameters(&self) -> &'static [&'static str] {
        T::ARGS
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
        let run = raise::catching(context.scope(async move {
            let result = task.run(params).await;
            match &result {
                Ok(value) => task.on_success(value).await,
                Err(error) => task.on_failure(error).await,
            }
            result.map(|value| serde_json::to_value(&value))
        }));
        let joined = match self.execution {
            // Run here, so dropped with this future (a revoke with terminate) rather than left
            // running; a panic ends this run, not the worker.
            Execution::Async => AssertUnwindSafe(run).catch_unwind().await,
            Execution::Blocking => {
                let runtime = tokio::runtime::Handle::current();
                tokio::task::spawn_blocking(move || runtime.block_on(run))
                    .await
                    .map_err(|join| match join.try_into_panic() {
                        Ok(payload) => payload,
                        Err(join) => Box::new(join.to_string()) as Box<dyn Any + Send>,
                    })
            }
        };
        // A task that asked to be replaced is, whatever it returned after asking.
        match (joined, asked.take_replacement()) {
            (Ok(_), Some(replacement)) => Outcome::Replaced(replacement),
            (Ok((Ok(Ok(value)), _)), None) => Outcome::Success(value),
            (Ok((Ok(Err(error)), _)), None) => Outcome::Failure(ExceptionInfo::builtin(
                "TypeError",
                format!("{}() returned a value JSON cannot hold: {error}", T::NAME),
            )),
            (Ok((Err(error), raised)), None) => {
                let mut outcome = outcome_of(
                    error,
                    raised,
                    T::DEFAULTS.retry_for_unexpected == Some(true),
                );
                if let Outcome::Retry { next, .. } = &mut outcome {
                    carry_arguments(T::ARGS, request, next);
                }
                outcome
            }
            (Err(panic), _) => Outcome::Panicked(format!(
                "{}() panicked: {}",
                T::NAME,
                panic_message(&*panic)
            )),
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

/// Whether Celery calls `errback`, a task with these `parameters`, with the failed request, its
/// exception and traceback ("new style") rather than sending it the failed task's id: when it
/// takes more than one argument besides those it stores (a stored keyword argument makes it and
/// the parameters after it keyword-only), or any number (`*args`).
pub fn takes_the_failed_request(errback: &Signature, parameters: &[&str]) -> bool {
    if parameters.contains(&VAR_ARGS) {
        return true;
    }
    let positional = parameters.iter().filter(|name| **name != VAR_KWARGS);
    let open = if errback.immutable {
        positional.count()
    } else {
        positional
            .skip(errback.args.len())
            .take_while(|name| !errback.kwargs.contains_key(**name))
            .count()
    };
    open > 1
}

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

/// Completes a retry that gave only new positional or only new keyword arguments, as Celery
/// does: the other kind is kept where it does not clash with the new calling convention (new
/// positionals drop the keywords naming the same parameters; new keywords for parameters passed
/// positionally take their places).
fn carry_arguments(arg_names: &[&str], request: &TaskRequest, next: &mut NextRun) {
    let positional: Vec<&str> = arg_names
        .iter()
        .copied()
        .take_while(|arg| *arg != VAR_ARGS && *arg != VAR_KWARGS)
        .collect();
    match (&next.args, &mut next.kwargs) {
        (Some(args), None) => {
            let mut kwargs = request.kwargs.clone();
            for name in positional.iter().take(args.len()) {
                kwargs.remove(*name);
            }
            next.kwargs = Some(kwargs);
        }
        (None, Some(kwargs)) => {
            let mut args = request.args.clone();
            for (name, slot) in positional.iter().zip(args.iter_mut()) {
                if let Some(value) = kwargs.remove(*name) {
                    *slot = value;
                }
            }
            next.args = Some(args);
        }
        _ => {}
    }
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
/// one the task named with [`raise::raise`] or [`raise::retry`], else a `RuntimeError` with its
/// message (or Celery's `Retry` for a bare retry).
fn outcome_of(error: TaskError, raised: Option<Raised>, retry_for_unexpected: bool) -> Outcome {
    let (named, next) = match raised {
        Some(Raised::Reject { exc, requeue }) => return Outcome::Rejected { exc, requeue },
        Some(Raised::Exception(exc)) => (Some(exc), NextRun::default()),
        Some(Raised::Retry(asked)) => (
            asked.exc,
            NextRun {
                max_retries: asked.max_retries,
                args: asked.args,
                kwargs: asked.kwargs,
                expires: asked.expires,
            },
        ),
        None => (None, NextRun::default()),
    };
    let runtime_error = |message: String| ExceptionInfo::builtin("RuntimeError", message);
    match error {
        TaskError::Retry(eta) => Outcome::Retry {
            eta,
            exc: named.unwrap_or_else(|| ExceptionInfo::celery("Retry", "Retry requested")),
            next,
        },
        TaskError::ExpectedError(message) => Outcome::Retry {
            eta: None,
            exc: named.unwrap_or_else(|| runtime_error(message)),
            next,
        },
        TaskError::UnexpectedError(message) if retry_for_unexpected => Outcome::Retry {
            eta: None,
            exc: named.unwrap_or_else(|| runtime_error(message)),
            next,
        },
        TaskError::UnexpectedError(message) => {
            Outcome::Failure(named.unwrap_or_else(|| runtime_error(message)))
        }
        TaskError::TimeoutError => {
            Outcome::Failure(ExceptionInfo::celery("TimeLimitExceeded", "task timed out"))
        }
    }
}

/// What a panic said, from its payload.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
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
        let raised = || Some(Raised::Exception(named.clone()));
        let error = || TaskError::UnexpectedError("boom".into());
        assert_eq!(
            outcome_of(error(), raised(), false),
            Outcome::Failure(named.clone())
        );
        assert_eq!(
            outcome_of(error(), None, false),
            Outcome::Failure(ExceptionInfo::builtin("RuntimeError", "boom"))
        );
        assert_eq!(
            outcome_of(error(), raised(), true),
            Outcome::Retry {
                eta: None,
                exc: named.clone(),
                next: NextRun::default(),
            }
        );
    }

    #[test]
    fn a_reject_ends_the_run_whatever_the_task_retries_for() {
        let exc = ExceptionInfo::with_args("celery.exceptions", "Reject", vec![]);
        let raised = Some(Raised::Reject {
            exc: exc.clone(),
            requeue: true,
        });
        assert_eq!(
            outcome_of(TaskError::UnexpectedError("r".into()), raised, true),
            Outcome::Rejected { exc, requeue: true }
        );
    }

    #[test]
    fn a_retry_carries_its_exception_and_what_the_next_run_changes() {
        let named = ExceptionInfo::with_args("t.integration.tasks", "ExpectedException", vec![]);
        let asked = raise::Retry {
            exc: Some(named.clone()),
            max_retries: Some(1),
            kwargs: Some(Map::new()),
            ..raise::Retry::default()
        };
        assert_eq!(
            outcome_of(TaskError::Retry(None), Some(Raised::Retry(asked)), false),
            Outcome::Retry {
                eta: None,
                exc: named,
                next: NextRun {
                    max_retries: Some(1),
                    kwargs: Some(Map::new()),
                    ..NextRun::default()
                },
            }
        );
        let bare = outcome_of(TaskError::Retry(None), None, false);
        assert!(
            matches!(&bare, Outcome::Retry { exc, next, .. } if exc.exc_type == "Retry" && *next == NextRun::default()),
            "{bare:?}"
        );
    }

    #[test]
    fn a_retry_with_one_kind_of_arguments_keeps_the_other_where_it_does_not_clash() {
        let names = &["foo", "bar", "label"];
        let mut request = TaskRequest::new("t", vec![], Map::new());
        request.kwargs = json!({"foo": 1, "bar": 2, "label": "kept"})
            .as_object()
            .unwrap()
            .clone();
        let mut next = NextRun {
            args: Some(vec![json!(2), json!(3)]),
            ..NextRun::default()
        };
        carry_arguments(names, &request, &mut next);
        assert_eq!(next.kwargs, json!({"label": "kept"}).as_object().cloned());

        let mut request = TaskRequest::new("t", vec![json!(1), json!(2)], Map::new());
        request.kwargs = Map::new();
        let mut next = NextRun {
            kwargs: json!({"foo": 2}).as_object().cloned(),
            ..NextRun::default()
        };
        carry_arguments(names, &request, &mut next);
        assert_eq!(next.args, Some(vec![json!(2), json!(2)]));
        assert_eq!(next.kwargs, Some(Map::new()));
    }

    #[test]
    fn errbacks_taking_more_than_the_failed_id_are_called_with_the_failed_request() {
        let errback = |args: Value, kwargs: Value, immutable: bool| {
            Signature::from_value(&json!({"task": "e", "args": args, "kwargs": kwargs,
                "options": {}, "subtask_type": null, "immutable": immutable}))
            .unwrap()
        };
        let takes = |e: &Signature, parameters: &[&str]| takes_the_failed_request(e, parameters);
        // Celery's errback_old_style(request_id) and errback_new_style(request, exc, tb).
        assert!(!takes(
            &errback(json!([]), json!({}), false),
            &["request_id"]
        ));
        assert!(takes(
            &errback(json!([]), json!({}), false),
            &["request", "exc", "tb"]
        ));
        // Stored arguments do not count: (request_id, label) with a label stored either way.
        let with_label = ["request_id", "label"];
        assert!(!takes(
            &errback(json!(["l"]), json!({}), false),
            &with_label
        ));
        assert!(!takes(
            &errback(json!([]), json!({"label": "l"}), false),
            &with_label
        ));
        assert!(takes(
            &errback(json!(["l"]), json!({}), false),
            &["request", "exc", "tb", "label"]
        ));
        // An immutable errback counts all it takes; *args takes any number.
        assert!(takes(
            &errback(json!(["m"]), json!({}), true),
            &["message", "redis_key"]
        ));
        assert!(takes(&errback(json!([]), json!({}), false), &["var_args"]));
    }
}
