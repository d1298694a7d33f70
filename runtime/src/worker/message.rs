//! One message's life: decoded, looked up, held until due and a slot is free, acked early or
//! late, run within its time limits, and settled once its end is on record.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use super::outcome::failure_meta;
use super::{fields, Worker};
use crate::broker::{Delivery, Settle};
use crate::error::Result;
use crate::metrics::Rejected;
use crate::progress::TaskContext;
use crate::protocol::repr::{repr, repr_args};
use crate::protocol::result::{state, ExceptionInfo};
use crate::protocol::TaskRequest;
use crate::registry::{Handler, Outcome};
use crate::telemetry::spans;

/// How a run ended, beyond the task's own outcome.
enum Ending {
    Ran(Outcome),
    Terminated,
    TimedOut(f64),
}

impl Ending {
    /// The state the run ended in, as Celery's instrumentation names it in a run's span: a
    /// retry that has none left ends in FAILURE, told when that is known.
    fn state(&self) -> &'static str {
        match self {
            Ending::Ran(Outcome::Success(_)) => state::SUCCESS,
            Ending::Ran(Outcome::Retry { .. }) => state::RETRY,
            Ending::Ran(Outcome::Rejected { .. }) => "REJECTED",
            // Celery's Task.replace ends the run with Ignore.
            Ending::Ran(Outcome::Replaced(_)) => "IGNORED",
            Ending::Terminated => state::REVOKED,
            Ending::Ran(Outcome::Failure(_) | Outcome::Panicked(_)) | Ending::TimedOut(_) => {
                state::FAILURE
            }
        }
    }
}

/// A time limit in seconds, as a message, a canvas option or a setting gives it: none unless
/// it is a positive number of seconds a clock can count (`1e20` or infinity is no limit, not a
/// panic).
fn time_limit(seconds: Option<f64>) -> Option<Duration> {
    seconds
        .filter(|s| *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
}

/// Retries a task gets when it declares no `max_retries`, as Celery's `Task.max_retries`.
const DEFAULT_MAX_RETRIES: u32 = 3;

impl Worker {
    /// Takes one delivery through its whole life. It never fails: whatever the message holds
    /// ends logged, stored where a task id is known, and settled with the broker.
    pub(super) async fn handle(self: Arc<Self>, delivery: Delivery) {
        let Delivery {
            message,
            queue,
            redelivered,
            tag,
            settle,
            arrival,
        } = delivery;
        let mut request = match message.and_then(|message| TaskRequest::decode(&message)) {
            Ok(request) => request,
            Err(error) => {
                error!(delivery_tag = %tag, %queue, task_id = ?error.task_id, reason = %error.reason, "rejecting undecodable message");
                self.metrics.rejected(Rejected::Undecodable);
                if let Some(id) = &error.task_id {
                    let exc =
                        ExceptionInfo::new("kombu.exceptions", "DecodeError", error.reason.clone());
                    self.store(failure_meta(id, &exc)).await;
                }
                settle_with(settle.reject(false), &tag).await;
                return;
            }
        };
        let Some(handler) = self.registry.get(&request.task) else {
            error!(task = %request.task, id = %request.id, "received unregistered task");
            self.metrics.rejected(Rejected::Unregistered);
            let exc = ExceptionInfo::celery("NotRegistered", request.task.clone());
            self.events.task(
                "task-failed",
                &request.id,
                fields(json!({"exception": exc.repr(), "traceback": null})),
            );
            self.finish(&request, &queue, state::FAILURE, exc.to_value(), None)
                .await;
            settle_with(settle.ack(), &tag).await;
            return;
        };
        request.redelivered = redelivered;
        self.metrics.received(&request.task);
        if self.discard_if_dead(&request, &queue).await {
            settle_with(settle.ack(), &tag).await;
            return;
        }
        let terminate = self.state.hold(&request, &queue);
        // Held: control requests that came in after it may be answered now.
        drop(arrival);
        self.events
            .task("task-received", &request.id, received_fields(&request));
        // Held unacked until due and until a slot is free: a crash before then gives the message
        // back to the broker, and so does a shutdown. Until due it is held outside the prefetch
        // window, so that messages with far ETAs cannot stop the queue.
        let mut settle = settle;
        let eta_wait = request
            .eta
            .and_then(|eta| (eta - Utc::now()).to_std().ok())
            .filter(|wait| !wait.is_zero());
        if eta_wait.is_some() {
            settle.hold(self.eta_window()).await;
        }
        let due_and_free = async {
            if let Some(wait) = eta_wait {
                tokio::time::sleep(wait).await;
                settle.unhold().await;
            }
            let rate_wait = self.rate_wait(&request.task).await;
            if !rate_wait.is_zero() {
                tokio::time::sleep(rate_wait).await;
            }
            self.slots.acquire().await
        };
        let slot = tokio::select! {
            slot = due_and_free => slot.ok(),
            () = self.stopping.cancelled() => None,
            () = terminate.cancelled() => None,
        };
        let Some(_slot) = slot else {
            if self.discard_if_dead(&request, &queue).await {
                self.state.release(&request.id);
                settle_with(settle.ack(), &tag).await;
                return;
            }
            info!(task = %request.task, id = %request.id, "giving back a task not started");
            self.state.release(&request.id);
            settle_with(settle.reject(true), &tag).await;
            return;
        };
        if self.discard_if_dead(&request, &queue).await {
            self.state.release(&request.id);
            settle_with(settle.ack(), &tag).await;
            return;
        }
        let span = spans::run(&request, &self.hostname, &queue);
        self.run_to_end(&request, &queue, &tag, settle, handler, terminate)
            .instrument(span)
            .await;
    }

    /// Runs `request`, whose slot is held, within its time limits; stores and announces its
    /// end, sends what follows it, and settles its message.
    async fn run_to_end(
        &self,
        request: &TaskRequest,
        queue: &str,
        tag: &str,
        settle: Settle,
        handler: Arc<dyn Handler>,
        terminate: CancellationToken,
    ) {
        let options = handler.options();
        let settle = self.ack_early(settle, tag, &options).await;
        self.state.activate(&request.id, settle.is_none());
        self.events.task("task-started", &request.id, Map::new());
        let stores = self.stores(request);
        if stores && self.config.task_track_started {
            let started = json!({"pid": std::process::id(), "hostname": self.hostname});
            self.store(self.meta(request, queue, state::STARTED, started))
                .await;
        }
        let (context, updates) = TaskContext::new(request);
        let asked = context.clone();
        let (hard, soft) = self.time_limits(request, &options);
        let soft_timer = soft.map(|soft| {
            let context = context.clone();
            tokio::spawn(async move {
                tokio::time::sleep(soft).await;
                context.exceed_soft_limit();
            })
        });
        let hard_deadline = async {
            match hard {
                Some(hard) => tokio::time::sleep(hard).await,
                None => std::future::pending().await,
            }
        };
        let began = Instant::now();
        // The states the task reports are written beside its run, in this same future: an
        // async task's report goes out at its next await.
        let reporting = self.report_states(request, queue, updates, stores);
        tokio::pin!(reporting);
        let mut reported = false;
        // Losing a race drops the task's future, which aborts async task code; blocking code
        // cannot be stopped from outside, so its thread is abandoned and its slot freed.
        let run = async {
            tokio::select! {
                outcome = handler.run(self.app.clone(), request, &self.hostname, context) => Ending::Ran(outcome),
                () = terminate.cancelled() => Ending::Terminated,
                () = hard_deadline => Ending::TimedOut(hard.unwrap_or_default().as_secs_f64()),
            }
        };
        tokio::pin!(run);
        let ending = loop {
            tokio::select! {
                ending = &mut run => break ending,
                () = &mut reporting, if !reported => reported = true,
            }
        };
        if let Some(timer) = soft_timer {
            timer.abort();
        }
        // Taken now and the context let go: it holds the sender the reporting waits on.
        let added = asked.take_added_to_chord();
        let sent = asked.take_sent();
        drop(asked);
        let runtime = began.elapsed().as_secs_f64();
        self.metrics.ran(&request.task, runtime);
        // A finished task's reporting ends once its last write is sent, so the final state is
        // what stays. A stopped task's code may live on (blocking code cannot be interrupted)
        // holding the reporting open: it is cut off instead; a write it already sent is still
        // ahead of the final one on the connection.
        if matches!(ending, Ending::Ran(_)) && !reported {
            reporting.await;
        }
        self.state.release(&request.id);
        // What the task sent is on its way before its own end is stored, as in Celery, where
        // the task sends it while it runs (a send that fails is logged).
        self.send_next(sent).await;
        let ending = match ending {
            Ending::Ran(outcome) => Ending::Ran(self.add_to_chord(request, added, outcome).await),
            stopped => stopped,
        };
        spans::ended(ending.state());
        // Set when the task rejected its message: settled so instead of acked.
        let mut rejected = None;
        // Whether the final state is on record (or none is wanted).
        let ended = match ending {
            Ending::Ran(Outcome::Success(value)) => {
                info!(task = %request.task, id = %request.id, runtime, result = %value, "task succeeded");
                self.events.task(
                    "task-succeeded",
                    &request.id,
                    fields(json!({"result": repr(&value), "runtime": runtime})),
                );
                self.succeed(request, queue, value).await
            }
            Ending::Ran(Outcome::Failure(exc)) => {
                error!(task = %request.task, id = %request.id, runtime, exception = %exc.repr(), "task failed");
                self.fail(request, queue, exc).await
            }
            Ending::Ran(Outcome::Rejected { exc, requeue }) => {
                warn!(task = %request.task, id = %request.id, requeue, exception = %exc.repr(), "task rejected its message");
                rejected = Some(requeue);
                // A requeued message runs again and stores its state then; one dropped never
                // runs again, so its end is stored now, as Celery's worker does.
                let stored = requeue || self.fail(request, queue, exc).await;
                self.events.task(
                    "task-rejected",
                    &request.id,
                    fields(json!({"requeue": requeue})),
                );
                stored
            }
            Ending::Ran(Outcome::Panicked(message))
                if settle.is_some() && self.config.task_reject_on_worker_lost =>
            {
                // No state is stored: the task runs again, as Celery requeues a task whose pool
                // process died. A task that always panics comes back for ever, as in Celery.
                error!(task = %request.task, id = %request.id, %message, "task run lost; giving it back to the broker (task_reject_on_worker_lost)");
                false
            }
            Ending::Ran(Outcome::Panicked(message)) => {
                error!(task = %request.task, id = %request.id, %message, "task run lost");
                let exc = ExceptionInfo::new("billiard.exceptions", "WorkerLostError", message);
                self.fail(request, queue, exc).await
            }
            Ending::Ran(Outcome::Replaced(replacement)) => {
                self.replace(request, queue, replacement).await
            }
            Ending::Ran(Outcome::Retry { eta, exc, next }) => {
                let max_retries = next
                    .max_retries
                    .or(options.max_retries)
                    .unwrap_or(DEFAULT_MAX_RETRIES);
                if request.retries >= max_retries {
                    spans::ended(state::FAILURE);
                    error!(task = %request.task, id = %request.id, retries = request.retries, exception = %exc.repr(), "task failed after its last retry");
                    self.fail(request, queue, exc).await
                } else {
                    let eta = eta.unwrap_or_else(|| backoff(request.retries, &options));
                    self.retry(request, queue, eta, exc, next).await
                }
            }
            Ending::TimedOut(limit) => {
                error!(task = %request.task, id = %request.id, limit, "task stopped at its hard time limit");
                self.fail(
                    request,
                    queue,
                    ExceptionInfo::new("celery.exceptions", "TimeLimitExceeded", limit.to_string()),
                )
                .await
            }
            Ending::Terminated => {
                warn!(task = %request.task, id = %request.id, runtime, "task terminated by revoke");
                self.events.task(
                    "task-revoked",
                    &request.id,
                    fields(json!({"terminated": true, "signum": 15, "expired": false})),
                );
                let exc = ExceptionInfo::celery("TaskRevokedError", "terminated");
                self.revoke(request, queue, exc).await
            }
        };
        match (settle, rejected) {
            (Some(settle), Some(requeue)) => settle_with(settle.reject(requeue), tag).await,
            (Some(settle), None) if ended => settle_with(settle.ack(), tag).await,
            // With acks_late, a run whose end is not on record goes back to the broker and runs
            // again: a duplicate run is better than a caller waiting for ever.
            (Some(settle), None) => {
                warn!(task = %request.task, id = %request.id, "giving the message back: its run did not end on record");
                settle_with(settle.reject(true), tag).await;
            }
            (None, _) => {}
        }
    }
    /// `(hard, soft)` seconds: the message's `timelimit`, else the task's options, else config.
    pub(super) fn time_limits(
        &self,
        request: &TaskRequest,
        options: &celery::task::TaskOptions,
    ) -> (Option<Duration>, Option<Duration>) {
        let hard = request
            .timelimit
            .0
            .or(options.hard_time_limit.map(f64::from))
            .or(self.config.task_time_limit);
        let soft = request
            .timelimit
            .1
            .or(options.time_limit.map(f64::from))
            .or(self.config.task_soft_time_limit);
        (time_limit(hard), time_limit(soft))
    }

    /// Acks now unless the task acks late (its own `acks_late`, else `task_acks_late`); returns
    /// the settlement still owed.
    pub(super) async fn ack_early(
        &self,
        settle: Settle,
        tag: &str,
        options: &celery::task::TaskOptions,
    ) -> Option<Settle> {
        if options.acks_late.unwrap_or(self.config.task_acks_late) {
            return Some(settle);
        }
        settle_with(settle.ack(), tag).await;
        None
    }

    /// Stores REVOKED (and tells Flower) for a request revoked (by id or by one of its stamps) or
    /// expired before it ran.
    pub(super) async fn discard_if_dead(&self, request: &TaskRequest, queue: &str) -> bool {
        let expired = request.expires.is_some_and(|expires| expires <= Utc::now());
        let by_id = self.state.is_revoked(&request.id);
        let by_stamp = match expired || by_id {
            true => None,
            false => self.state.revoked_stamp(request),
        };
        if !expired && !by_id && by_stamp.is_none() {
            return false;
        }
        let reason = if expired { "expired" } else { "revoked" };
        warn!(task = %request.task, id = %request.id, reason, ?by_stamp, "discarding task");
        self.events.task(
            "task-revoked",
            &request.id,
            fields(json!({"terminated": false, "signum": null, "expired": expired})),
        );
        let exc = ExceptionInfo::celery("TaskRevokedError", reason);
        self.revoke(request, queue, exc).await;
        true
    }
}

/// When a retry without its own ETA runs: 2^retries seconds within the task's
/// `[min_retry_delay, max_retry_delay]`, plus up to a second of jitter so retries spread out.
fn backoff(retries: u32, options: &celery::task::TaskOptions) -> chrono::DateTime<Utc> {
    let max = options.max_retry_delay.unwrap_or(3600);
    let min = options.min_retry_delay.unwrap_or(0).min(max);
    let seconds = 2u32.checked_pow(retries).unwrap_or(max).clamp(min, max);
    let jitter_ms = (uuid::Uuid::new_v4().as_u128() % 1000) as i64;
    Utc::now()
        + chrono::Duration::seconds(i64::from(seconds))
        + chrono::Duration::milliseconds(jitter_ms)
}

/// The fields of `task-received`, as Flower reads them.
fn received_fields(request: &TaskRequest) -> Map<String, Value> {
    let iso = |t: Option<chrono::DateTime<Utc>>| t.map(|t| t.to_rfc3339());
    fields(json!({
        "name": request.task,
        "args": repr_args(&request.args),
        "kwargs": repr(&Value::Object(request.kwargs.clone())),
        "root_id": request.root_id,
        "parent_id": request.parent_id,
        "retries": request.retries,
        "eta": iso(request.eta),
        "expires": iso(request.expires),
    }))
}

async fn settle_with(settlement: impl std::future::Future<Output = Result<()>>, tag: &str) {
    if let Err(error) = settlement.await {
        error!(delivery_tag = %tag, %error, "cannot settle message with the broker");
    }
}
