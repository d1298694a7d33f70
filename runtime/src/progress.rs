//! How a running task reports custom states such as `PROGRESS {current, total}`, reads the
//! request it runs for (Celery's `self.request`), and leaves the worker what to do once it ends:
//! a replacement (see [`crate::replace`]), signatures added to its chord (see
//! [`crate::add_to_chord`]), canvases it sends (see [`crate::delay`]).
//!
//! The dispatcher runs every task inside a [`TaskContext`] scope (a task-local, so task code needs
//! no extra parameter). Reports only replace the latest value of a watch channel: a task may call
//! [`report`] thousands of times a second, and the backend sees the newest state at the pace it
//! can write, never an old one after a newer one.

use std::future::Future;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::canvas::{Next, Signature};
use crate::error::{Error, Result};
use crate::protocol::result::state;
use crate::protocol::TaskRequest;

tokio::task_local! {
    static CURRENT: TaskContext;
}

/// A state a task asked to store while running.
#[derive(Debug, Clone, PartialEq)]
pub struct StateUpdate {
    /// State name, e.g. `PROGRESS`.
    pub state: String,
    /// The meta stored as the result while in that state.
    pub meta: Value,
}

/// The running task's identity and its channel to the dispatcher.
#[derive(Clone)]
pub struct TaskContext {
    request: Arc<TaskRequest>,
    updates: Arc<watch::Sender<Option<StateUpdate>>>,
    soft_limit: CancellationToken,
    /// The signature the task asked to be replaced with, the last one asked for.
    replacement: Arc<Mutex<Option<Signature>>>,
    /// The signatures the task added to its chord, in the order added.
    added_to_chord: Arc<Mutex<Vec<Signature>>>,
    /// The requests of the canvases the task sent, in the order sent.
    sent: Arc<Mutex<Vec<Next>>>,
}

/// What the dispatcher reads a task's reports from.
pub type Updates = watch::Receiver<Option<StateUpdate>>;

impl TaskContext {
    /// A context for running `request` and the receiver of its reports.
    pub fn new(request: &TaskRequest) -> (Self, Updates) {
        let (sender, receiver) = watch::channel(None);
        (
            Self {
                request: Arc::new(request.clone()),
                updates: Arc::new(sender),
                soft_limit: CancellationToken::new(),
                replacement: Arc::default(),
                added_to_chord: Arc::default(),
                sent: Arc::default(),
            },
            receiver,
        )
    }

    /// The signature the task asked to be replaced with, if it did (taken once).
    pub fn take_replacement(&self) -> Option<Signature> {
        self.replacement
            .lock()
            .ok()
            .and_then(|mut replacement| replacement.take())
    }

    /// The signatures the task added to its chord, in the order added (taken once).
    pub fn take_added_to_chord(&self) -> Vec<Signature> {
        self.added_to_chord
            .lock()
            .map(|mut added| std::mem::take(&mut *added))
            .unwrap_or_default()
    }

    /// The requests of the canvases the task sent, in the order sent (taken once).
    pub fn take_sent(&self) -> Vec<Next> {
        self.sent
            .lock()
            .map(|mut sent| std::mem::take(&mut *sent))
            .unwrap_or_default()
    }

    /// Tells the task its soft time limit has passed.
    pub fn exceed_soft_limit(&self) {
        self.soft_limit.cancel();
    }

    /// Runs `future` with this context as the current task's.
    pub async fn scope<F: Future>(self, future: F) -> F::Output {
        CURRENT.scope(self, future).await
    }
}

/// Stores custom `state` with `meta` for the calling task, as Celery's `update_state` does.
/// Fails only when called outside a task the dispatcher runs.
pub fn update_state(state: &str, meta: Value) -> Result<()> {
    CURRENT
        .try_with(|context| {
            context.updates.send_replace(Some(StateUpdate {
                state: state.to_string(),
                meta,
            }));
        })
        .map_err(|_| Error::NotInTask)
}

/// Reports `PROGRESS` with meta `{current, total}`.
pub fn report(current: u64, total: u64) -> Result<()> {
    update_state(state::PROGRESS, json!({"current": current, "total": total}))
}

/// Whether the running task's soft time limit has passed (Celery's `SoftTimeLimitExceeded`):
/// a task that checks it can wind down and return before the hard limit stops it.
pub fn soft_time_limit_exceeded() -> bool {
    CURRENT
        .try_with(|context| context.soft_limit.is_cancelled())
        .unwrap_or(false)
}

/// Resolves when the running task's soft time limit passes (never outside a task), for tasks
/// that `select!` on it.
pub async fn soft_time_limit() {
    match CURRENT.try_with(|context| context.soft_limit.clone()) {
        Ok(limit) => limit.cancelled_owned().await,
        Err(_) => std::future::pending().await,
    }
}

/// Records that the running task is to be replaced by `signature` when it ends. Fails only
/// outside a task the dispatcher runs.
pub(crate) fn record_replacement(signature: Signature) -> Result<()> {
    leave(
        |context| &context.replacement,
        |replacement| *replacement = Some(signature),
    )
}

/// Records that the running task adds `signature` to its chord. Fails only outside a task the
/// dispatcher runs.
pub(crate) fn record_added_to_chord(signature: Signature) -> Result<()> {
    leave(
        |context| &context.added_to_chord,
        |added| added.push(signature),
    )
}

/// Records that the running task sends `next`. Fails only outside a task the dispatcher runs.
pub(crate) fn record_sent(next: Vec<Next>) -> Result<()> {
    leave(|context| &context.sent, |sent| sent.extend(next))
}

/// Applies `edit` to one of the things the running task leaves the worker (`field` of its
/// context). Fails only outside a task the dispatcher runs.
fn leave<T>(
    field: impl FnOnce(&TaskContext) -> &Mutex<T>,
    edit: impl FnOnce(&mut T),
) -> Result<()> {
    CURRENT
        .try_with(|context| {
            if let Ok(mut left) = field(context).lock() {
                edit(&mut left);
            }
        })
        .map_err(|_| Error::NotInTask)
}

/// How many replacements led to the running task: 0 for a task sent as such, 1 for the
/// replacement of one, and so on (Celery's `request.replaced_task_nesting`). 0 outside a task.
pub fn replaced_task_nesting() -> u64 {
    request().map_or(0, |request| request.replaced_task_nesting())
}

/// The id of the task running on this task-local scope, if any.
pub fn task_id() -> Option<String> {
    CURRENT.try_with(|context| context.request.id.clone()).ok()
}

/// The request the running task was sent with (its headers, properties, retries, time limits),
/// as Celery's `self.request`; `None` outside a task.
pub fn request() -> Option<Arc<TaskRequest>> {
    CURRENT.try_with(|context| context.request.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    #[tokio::test]
    async fn reports_reach_the_receiver_newest_last() {
        let sent = TaskRequest::new("tasks.add", vec![json!(1)], Map::new());
        let (context, mut updates) = TaskContext::new(&sent);
        context
            .scope(async {
                assert_eq!(task_id(), Some(sent.id.clone()));
                assert_eq!(request().map(|r| r.args.clone()), Some(vec![json!(1)]));
                for i in 1..=1000 {
                    report(i, 1000).unwrap();
                }
            })
            .await;
        assert!(updates.has_changed().unwrap_or(true));
        let last = updates.borrow_and_update().clone().unwrap();
        assert_eq!(
            last,
            StateUpdate {
                state: "PROGRESS".into(),
                meta: json!({"current": 1000, "total": 1000})
            }
        );
    }

    #[tokio::test]
    async fn the_soft_limit_is_seen_inside_the_task() {
        let (context, _updates) =
            TaskContext::new(&TaskRequest::new("tasks.add", vec![], Map::new()));
        let limit = context.clone();
        context
            .scope(async move {
                assert!(!soft_time_limit_exceeded());
                limit.exceed_soft_limit();
                soft_time_limit().await;
                assert!(soft_time_limit_exceeded());
            })
            .await;
        assert!(!soft_time_limit_exceeded());
    }

    #[test]
    fn reporting_outside_a_task_is_an_error() {
        assert!(matches!(report(1, 2), Err(Error::NotInTask)));
        assert_eq!(task_id(), None);
        assert!(request().is_none());
    }
}
