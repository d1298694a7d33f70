//! Celery's built-in tasks that call the worker's own tasks: `celery.map` and `celery.starmap`
//! (what Python's `task.map(it)` and `task.starmap(it)` send). Each calls the task it names on
//! every item of `it`, in this worker and in order, as Python's `task(item)` / `task(*item)`,
//! and returns the list of results; the first failure fails it. And `celery.accumulate`, which
//! gathers the results of a group a task is replaced with (see [`crate::replace`]).

use std::sync::Arc;

use async_trait::async_trait;
use celery::task::TaskOptions;
use celery::Celery;
use serde_json::{Map, Value};

use crate::canvas::Signature;
use crate::progress::TaskContext;
use crate::protocol::result::ExceptionInfo;
use crate::protocol::TaskRequest;
use crate::registry::{Handler, Outcome, Registry};

/// Whether each item is the call's only argument, or the list of its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Items {
    One,
    Spread,
}

struct MapHandler {
    tasks: Registry,
    items: Items,
}

impl Registry {
    /// This registry with `celery.map` and `celery.starmap` added, calling its tasks, and
    /// `celery.accumulate`.
    pub fn with_builtins(self) -> Self {
        let tasks = self.clone();
        let map = |items| {
            Arc::new(MapHandler {
                tasks: tasks.clone(),
                items,
            })
        };
        self.handler("celery.map", map(Items::One))
            .handler("celery.starmap", map(Items::Spread))
            .task::<crate::replace::accumulate>()
    }
}

#[async_trait]
impl Handler for MapHandler {
    fn options(&self) -> TaskOptions {
        TaskOptions::default()
    }

    fn parameters(&self) -> &'static [&'static str] {
        &["task", "it"]
    }

    async fn run(
        &self,
        app: Arc<Celery>,
        request: &TaskRequest,
        hostname: &str,
        context: TaskContext,
    ) -> Outcome {
        let (task, items) = match self.calls(request) {
            Ok(calls) => calls,
            Err(exc) => return Outcome::Failure(exc),
        };
        let Some(handler) = self.tasks.get(&task) else {
            return Outcome::Failure(ExceptionInfo::celery("NotRegistered", task));
        };
        let mut results = Vec::with_capacity(items.len());
        for args in items {
            let mut call = TaskRequest::new(&task, args, Map::new());
            call.id = request.id.clone();
            call.root_id = request.root_id.clone();
            call.parent_id = request.parent_id.clone();
            match handler
                .run(app.clone(), &call, hostname, context.clone())
                .await
            {
                Outcome::Success(value) => results.push(value),
                other => return other,
            }
        }
        Outcome::Success(Value::Array(results))
    }
}

impl MapHandler {
    /// The task to call and the arguments of each call, from `(task, it)` given either way.
    fn calls(&self, request: &TaskRequest) -> Result<(String, Vec<Vec<Value>>), ExceptionInfo> {
        let type_error = |message: String| ExceptionInfo::builtin("TypeError", message);
        let mut args = request.args.iter();
        let mut argument = |name: &str| {
            request
                .kwargs
                .get(name)
                .or_else(|| args.next())
                .cloned()
                .ok_or_else(|| type_error(format!("missing required argument: '{name}'")))
        };
        let (task, it) = (argument("task")?, argument("it")?);
        let task = Signature::from_value(&task)
            .map_err(|error| type_error(error.to_string()))?
            .task;
        let Value::Array(it) = it else {
            return Err(type_error(format!("'it' must be a list, not {it}")));
        };
        let items = it
            .into_iter()
            .map(|item| match (self.items, item) {
                (Items::One, item) => Ok(vec![item]),
                (Items::Spread, Value::Array(args)) => Ok(args),
                (Items::Spread, other) => Err(type_error(format!(
                    "starmap items must be argument lists, not {other}"
                ))),
            })
            .collect::<Result<_, _>>()?;
        Ok((task, items))
    }
}

#[cfg(test)]
// The crate's macro implements `Task` inside a const block, which this lint flags.
#[allow(non_local_definitions)]
mod tests {
    use super::*;
    use celery::error::TaskError;
    use celery::task::TaskResult;
    use serde_json::json;

    #[celery::task(name = "tests.add")]
    fn add(x: i64, y: i64) -> TaskResult<i64> {
        x.checked_add(y)
            .ok_or_else(|| TaskError::UnexpectedError("overflow".into()))
    }

    #[celery::task(name = "tests.double")]
    fn double(x: i64) -> TaskResult<i64> {
        Ok(2 * x)
    }

    async fn run(name: &str, args: Vec<Value>, kwargs: Value) -> Outcome {
        let registry = Registry::new()
            .task::<add>()
            .task::<double>()
            .with_builtins();
        let request = TaskRequest::new(name, args, kwargs.as_object().unwrap().clone());
        // A TLS broker URL gives the crate's app handle a local placeholder: nothing is sent.
        let config = crate::CeleryConfig {
            broker_url: "rediss://localhost".into(),
            ..Default::default()
        };
        let app = crate::worker::app_handle(&config).await.unwrap();
        let (context, _updates) = TaskContext::new(&request);
        registry
            .get(name)
            .unwrap()
            .run(app, &request, "node", context)
            .await
    }

    #[tokio::test]
    async fn starmap_spreads_each_item_and_map_passes_it_whole() {
        let add = json!({"task": "tests.add", "args": [], "kwargs": {}, "options": {}});
        let double = json!({"task": "tests.double", "args": [], "kwargs": {}, "options": {}});
        assert_eq!(
            run(
                "celery.starmap",
                vec![],
                json!({"task": add, "it": [[1, 1], [2, 2]]})
            )
            .await,
            Outcome::Success(json!([2, 4]))
        );
        assert_eq!(
            run("celery.map", vec![double, json!([1, 5])], json!({})).await,
            Outcome::Success(json!([2, 10]))
        );
        let failed = run("celery.starmap", vec![], json!({"task": add, "it": [[1]]})).await;
        assert!(
            matches!(&failed, Outcome::Failure(exc) if exc.exc_type == "TypeError"),
            "{failed:?}"
        );
    }

    #[test]
    fn built_ins_are_listed_only_when_asked_for() {
        let registry = Registry::new().with_builtins();
        assert!(registry.names(true).any(|name| name == "celery.map"));
        assert!(registry
            .names(false)
            .all(|name| !name.starts_with("celery.")));
    }
}
