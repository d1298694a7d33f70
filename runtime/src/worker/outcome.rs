//! Recording how a run ended: SUCCESS (after sending what follows), FAILURE (with the steps
//! that will never run and the errbacks), RETRY (sending the task again), REVOKED, and the
//! states a task reports while it runs. Every write is retried through a short backend outage.

use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};
use tracing::{error, info, warn, Instrument};

use super::{fields, Worker};
use crate::canvas;
use crate::metrics::Ended;
use crate::progress::{TaskContext, Updates};
use crate::protocol::result::{state, ExceptionInfo, Extended, ResultMeta};
use crate::protocol::TaskRequest;
use crate::registry::{self, NextRun, Outcome};
use crate::telemetry::spans;
use crate::unique;

/// Tries of one result write, 0.1 s apart and doubling: about 6 s in all.
const STORE_ATTEMPTS: u32 = 7;

impl Worker {
    /// Sends what follows a success (link callbacks, the next chain step), then stores SUCCESS
    /// with them as its children, as Celery does: a redelivered message whose result has
    /// children is known to have sent them. Then counts the task in its chord, if any. `false`
    /// when any of the three failed (all are tried).
    pub(super) async fn succeed(&self, request: &TaskRequest, queue: &str, value: Value) -> bool {
        // Checked before the canvas: a result too large to store is not passed on either.
        if let Some(exc) = oversized(&value, self.config.result_max_bytes) {
            error!(task = %request.task, id = %request.id, "task result over result_max_bytes; stored as FAILURE");
            return Box::pin(self.fail(request, queue, exc)).await;
        }
        let sent = match canvas::after_success(request, &value) {
            Ok(sent) => sent,
            Err(error) => {
                // As in Celery, a canvas that cannot be followed fails the task that carries it.
                error!(task = %request.task, id = %request.id, %error, "cannot follow the task's links or chain");
                let exc = ExceptionInfo::builtin(
                    "ValueError",
                    format!("cannot follow the canvas: {error}"),
                );
                return Box::pin(self.fail(request, queue, exc)).await;
            }
        };
        self.metrics.ended(&request.task, Ended::Succeeded);
        let dispatched = self.send_next(sent.next).await;
        let stored = !self.stores(request) || {
            let mut meta = self.meta(request, queue, state::SUCCESS, value.clone());
            meta.children = sent.children;
            self.store(meta).await
        };
        if stored {
            self.give_back_lock(request).await;
        }
        let joined = self
            .join_chord(request, queue, state::SUCCESS, &value)
            .await;
        dispatched && stored && joined
    }
    /// Stores FAILURE with `exc` and tells Flower; then fails the chain steps that will now never
    /// run (counting them in their chord, if any), and sends the errbacks. `false` when any of it
    /// could not be done.
    pub(super) async fn fail(
        &self,
        request: &TaskRequest,
        queue: &str,
        exc: ExceptionInfo,
    ) -> bool {
        // A chord body that cannot start fails here too, and it may be any task, of any
        // language: only this worker's own tasks are labels.
        if self.registry.get(&request.task).is_some() {
            self.metrics.ended(&request.task, Ended::Failed);
        }
        let tb = traceback(&exc);
        self.events.task(
            "task-failed",
            &request.id,
            fields(json!({"exception": exc.repr(), "traceback": tb})),
        );
        let mut done = self
            .finish(
                request,
                queue,
                state::FAILURE,
                exc.to_value(),
                Some(tb.clone()),
            )
            .await;
        done &= self
            .join_chord(request, queue, state::FAILURE, &exc.to_value())
            .await;
        let failed = self.after_failure(request);
        done & self.follow_failure(request, queue, &exc, &tb, failed).await
    }

    /// Fails a result that never ran because the chord it follows failed, as Celery's chord
    /// error handling does: its errbacks are called or sent, the chain steps after it fail, and
    /// it is stored FAILURE with the errbacks sent as its children. It counts in no chord, and no
    /// event tells of it: no worker received it.
    pub(super) async fn fail_unrun(
        &self,
        request: &TaskRequest,
        queue: &str,
        exc: ExceptionInfo,
    ) -> bool {
        let tb = traceback(&exc);
        let failed = self.after_failure(request);
        let children = failed.sent.children.clone();
        let done = self.follow_failure(request, queue, &exc, &tb, failed).await;
        done & (!self.stores(request) || {
            let mut meta = self.meta(request, queue, state::FAILURE, exc.to_value());
            meta.traceback = Some(tb);
            meta.children = children;
            self.store(meta).await
        })
    }

    /// What follows the failure of `request`: which of its errbacks this worker calls itself
    /// (its own tasks that take the failed request), which it sends, and the chain steps that
    /// will never run.
    fn after_failure(&self, request: &TaskRequest) -> canvas::Failed {
        let takes_the_failed_request = |errback: &canvas::Signature| {
            self.registry.get(&errback.task).is_some_and(|handler| {
                registry::takes_the_failed_request(errback, handler.parameters())
            })
        };
        canvas::after_failure(request, takes_the_failed_request).unwrap_or_else(|error| {
            error!(task = %request.task, id = %request.id, %error, "cannot follow the task's errbacks or chain");
            canvas::Failed { sent: canvas::Sent::default(), called: Vec::new(), never: Vec::new() }
        })
    }

    /// Fails the chain steps that will never run after `request` failed with `exc`, calls the
    /// errbacks called here and sends the others; `false` when any of it could not be done.
    async fn follow_failure(
        &self,
        request: &TaskRequest,
        queue: &str,
        exc: &ExceptionInfo,
        tb: &str,
        failed: canvas::Failed,
    ) -> bool {
        let done = self.fail_never_run(failed.never, queue, exc).await;
        for errback in &failed.called {
            let call = canvas::called_errback(errback, request, exc.to_value(), Value::from(tb));
            Box::pin(self.call_errback(call)).await;
        }
        done & self.send_next(failed.sent.next).await
    }

    /// Runs an errback of this worker's own here and now, as Celery's worker calls a "new style"
    /// errback: no result is stored and nothing follows it; a failure is only logged.
    pub(super) async fn call_errback(&self, call: TaskRequest) {
        let Some(handler) = self.registry.get(&call.task) else {
            return;
        };
        let (context, _updates) = TaskContext::new(&call);
        match handler
            .run(self.app.clone(), &call, &self.hostname, context)
            .await
        {
            Outcome::Success(_) => {
                info!(errback = %call.task, failed = ?call.parent_id, "errback called")
            }
            outcome => {
                warn!(errback = %call.task, failed = ?call.parent_id, ?outcome, "errback raised an exception")
            }
        }
    }

    /// Stores FAILURE with `exc` for chain steps that will never run, counting each in its
    /// chord, if any. `false` when any of it could not be done.
    pub(super) async fn fail_never_run(
        &self,
        never: Vec<TaskRequest>,
        queue: &str,
        exc: &ExceptionInfo,
    ) -> bool {
        let mut done = true;
        for step in never {
            let mut meta = failure_meta(&step.id, exc);
            meta.parent_id = step.parent_id.clone();
            meta.group_id = step.group.clone();
            done &= self.store(meta).await;
            done &= self
                .join_chord(&step, queue, state::FAILURE, &exc.to_value())
                .await;
        }
        done
    }
    /// Stores RETRY, then sends the task again as Celery does: same id, one more retry, due at
    /// `eta`, with itself as parent. Only then is the original acked (by the caller), so a crash
    /// in between runs it twice rather than never. `false` when the retry is not on its way.
    pub(super) async fn retry(
        &self,
        request: &TaskRequest,
        queue: &str,
        eta: chrono::DateTime<Utc>,
        exc: ExceptionInfo,
        next: NextRun,
    ) -> bool {
        let tb = traceback(&exc);
        info!(task = %request.task, id = %request.id, retries = request.retries + 1, %eta, exception = %exc.repr(), "task will retry");
        self.events.task(
            "task-retried",
            &request.id,
            fields(json!({"exception": exc.repr(), "traceback": tb})),
        );
        if self.stores(request) {
            let mut meta = self.meta(request, queue, state::RETRY, exc.to_value());
            meta.traceback = Some(tb);
            self.store(meta).await;
        }
        let mut again = request.clone();
        again.retries += 1;
        again.eta = Some(eta);
        again.parent_id = Some(request.id.clone());
        if let Some(args) = next.args {
            again.args = args;
        }
        if let Some(kwargs) = next.kwargs {
            again.kwargs = kwargs;
        }
        if let Some(expires) = next.expires {
            again.expires = Some(Utc::now() + crate::raise::seconds_from_now(expires));
        }
        let (message, span) = spans::publishing(&again);
        match self.broker.publish(queue, &message).instrument(span).await {
            Ok(()) => {
                self.metrics.ended(&request.task, Ended::Retried);
                true
            }
            Err(error) => {
                error!(id = %request.id, %error, "cannot send the retry");
                self.fail(
                    request,
                    queue,
                    ExceptionInfo::builtin(
                        "RuntimeError",
                        format!("retry could not be sent: {error}"),
                    ),
                )
                .await
            }
        }
    }
    /// Stores REVOKED with `exc` and counts the task in its chord, if any (a revoked member
    /// fails the chord, as in Celery); `false` when either could not be recorded.
    pub(super) async fn revoke(
        &self,
        request: &TaskRequest,
        queue: &str,
        exc: ExceptionInfo,
    ) -> bool {
        self.metrics.ended(&request.task, Ended::Revoked);
        let stored = self
            .finish(request, queue, state::REVOKED, exc.to_value(), None)
            .await;
        let joined = self
            .join_chord(request, queue, state::REVOKED, &exc.to_value())
            .await;
        stored && joined
    }

    /// Stores REVOKED for revoked `ids` that no worker has begun, as Celery's worker does on a
    /// revoke, so a caller waiting on a task revoked before any worker took it learns at once.
    /// A task running here, started elsewhere (STARTED or a custom state) or ended is left to
    /// whoever runs or ran it.
    pub(super) async fn store_revoked(&self, ids: &[String]) {
        let Some(backend) = &self.backend else {
            return;
        };
        for id in ids.iter().filter(|id| !self.state.is_active(id)) {
            let current = match backend.get(id).await {
                Ok(meta) => meta.map(|meta| meta.status),
                Err(error) => {
                    warn!(%id, %error, "cannot read the state of a revoked task; not storing REVOKED");
                    continue;
                }
            };
            if not_begun(current.as_deref()) {
                let exc = ExceptionInfo::celery("TaskRevokedError", "revoked");
                self.store(ResultMeta::new(
                    id,
                    state::REVOKED,
                    exc.to_value(),
                    Utc::now(),
                ))
                .await;
            }
        }
    }

    /// Writes each state the task reports, the newest one each time, until the task ends.
    pub(super) async fn report_states(
        &self,
        request: &TaskRequest,
        queue: &str,
        mut updates: Updates,
        stores: bool,
    ) {
        while updates.changed().await.is_ok() {
            let Some(update) = updates.borrow_and_update().clone() else {
                continue;
            };
            let event = format!("task-{}", update.state.to_ascii_lowercase());
            self.events.task(
                &event,
                &request.id,
                fields(json!({"state": update.state, "meta": update.meta})),
            );
            if stores {
                self.store(self.meta(request, queue, &update.state, update.meta))
                    .await;
            }
        }
    }

    pub(super) fn stores(&self, request: &TaskRequest) -> bool {
        self.backend.is_some() && !request.ignore_result && !self.config.task_ignore_result
    }

    /// Stores a final state unless the request asked for no result, then gives back the task's
    /// unique lock; `false` when it could not be stored (the lock is then left to expire).
    pub(super) async fn finish(
        &self,
        request: &TaskRequest,
        queue: &str,
        status: &str,
        result: Value,
        traceback: Option<String>,
    ) -> bool {
        let stored = !self.stores(request) || {
            let mut meta = self.meta(request, queue, status, result);
            meta.traceback = traceback;
            self.store(meta).await
        };
        if stored {
            self.give_back_lock(request).await;
        }
        stored
    }

    /// Gives back the unique lock the message names ([`unique::UNIQUE_KEY_HEADER`]), once the
    /// task's end is on record: the next send of it may go. Only while this task holds it: a
    /// lock that expired and was taken by another send stays that send's. Not done on RETRY,
    /// a rejection that requeues or a run given back: the task is still queued.
    async fn give_back_lock(&self, request: &TaskRequest) {
        let header = request.extra_headers.get(unique::UNIQUE_KEY_HEADER);
        let (Some(backend), Some(Value::String(name))) = (&self.backend, header) else {
            return;
        };
        backend.give_back_unique_lock(name, &request.id).await;
    }

    pub(super) fn meta(
        &self,
        request: &TaskRequest,
        queue: &str,
        status: &str,
        result: Value,
    ) -> ResultMeta {
        let mut meta = ResultMeta::new(&request.id, status, result, Utc::now());
        meta.group_id = request.group.clone();
        meta.parent_id = request.parent_id.clone();
        if self.config.result_extended {
            meta.extended = Some(Extended {
                name: request.task.clone(),
                args: request.args.clone(),
                kwargs: request.kwargs.clone(),
                worker: self.hostname.clone(),
                retries: request.retries,
                queue: queue.to_string(),
            });
        }
        meta
    }

    /// Writes `meta`, trying again through a short backend outage (the connection reconnects
    /// by itself); `false` when every try failed.
    pub(super) async fn store(&self, meta: ResultMeta) -> bool {
        let Some(backend) = &self.backend else {
            return true;
        };
        let mut pause = Duration::from_millis(100);
        for attempt in 1..=STORE_ATTEMPTS {
            match backend.store(&meta).await {
                Ok(_) => return true,
                Err(error) if attempt < STORE_ATTEMPTS => {
                    warn!(id = %meta.task_id, status = %meta.status, attempt, %error, "cannot store result yet; trying again");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(error) => {
                    error!(id = %meta.task_id, status = %meta.status, %error, "cannot store result");
                }
            }
        }
        false
    }
}

/// The error a result of more than `max` bytes of JSON is stored as (none when `max` is 0, no
/// cap). Counted as it is written, without making the text.
pub(super) fn oversized(value: &Value, max: u64) -> Option<ExceptionInfo> {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).ok()?;
    (max > 0 && count.0 > max).then(|| {
        ExceptionInfo::builtin(
            "ValueError",
            format!(
                "result of {} bytes is over result_max_bytes ({max}); not stored",
                count.0
            ),
        )
    })
}

/// The traceback text stored with an exception state.
pub(super) fn traceback(exc: &ExceptionInfo) -> String {
    format!("{}.{}: {}", exc.exc_module, exc.exc_type, exc.message())
}

/// The FAILURE meta of task `id` that ended with `exc`, for a task this worker did not run
/// itself (an undecodable message, a chain step that never ran, a chord body that cannot start).
pub(super) fn failure_meta(id: &str, exc: &ExceptionInfo) -> ResultMeta {
    let mut meta = ResultMeta::new(id, state::FAILURE, exc.to_value(), Utc::now());
    meta.traceback = Some(traceback(exc));
    meta
}

/// Whether a task in `status` (`None`: nothing stored) has not been begun by any worker: no
/// state yet, or only received, retrying or rejected.
pub(super) fn not_begun(status: Option<&str>) -> bool {
    matches!(
        status,
        None | Some(state::PENDING | state::RETRY | "RECEIVED" | "REJECTED")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn a_revoke_stores_revoked_only_for_tasks_no_worker_has_begun() {
        for status in [
            None,
            Some("PENDING"),
            Some("RETRY"),
            Some("RECEIVED"),
            Some("REJECTED"),
        ] {
            assert!(not_begun(status), "{status:?}");
        }
        for status in ["STARTED", "PROGRESS", "SUCCESS", "FAILURE", "REVOKED"] {
            assert!(!not_begun(Some(status)), "{status}");
        }
    }
}
