//! Sending what follows a task: the steps the canvas planner returns, and a task's replacement.

use tracing::{error, info, Instrument};

use super::Worker;
use crate::canvas::{Next, Signature};
use crate::error::Result;
use crate::protocol::result::ExceptionInfo;
use crate::protocol::TaskRequest;
use crate::replace;
use crate::sending::{self, OnError, PublishStep};
use crate::telemetry::spans;

impl Worker {
    /// Publishes the tasks a finished task sends (see [`sending::send_steps`]); `false` when
    /// one could not be sent, each failure logged.
    pub(super) async fn send_next(&self, next: Vec<Next>) -> bool {
        sending::send_steps(
            next,
            self.backend.as_ref(),
            &self.config,
            &self.hostname,
            OnError::CarryOn,
            self,
        )
        .await
        .is_ok()
    }

    /// Sends `replacement` in place of the task (see [`crate::replace`]), storing nothing for
    /// the task itself: its id's result is the replacement's. A replacement Celery refuses
    /// fails the task with `ImproperlyConfigured`, as the task would have raised it; one that
    /// cannot be followed fails it as any canvas does. `false` when the replacement (or the
    /// failure) is not on its way.
    pub(super) async fn replace(
        &self,
        request: &TaskRequest,
        queue: &str,
        replacement: Signature,
    ) -> bool {
        if let Some(reason) = replace::refusal(&replacement) {
            error!(task = %request.task, id = %request.id, reason, "task cannot be replaced");
            let exc = ExceptionInfo::celery("ImproperlyConfigured", reason);
            return self.fail(request, queue, exc).await;
        }
        match replace::plan(request, replacement) {
            Ok(next) => {
                info!(task = %request.task, id = %request.id, by = %next.first().map_or("", |n| n.request.task.as_str()), "task replaced");
                self.send_next(next).await
            }
            Err(error) => {
                error!(task = %request.task, id = %request.id, %error, "cannot follow the task's replacement");
                let exc = ExceptionInfo::builtin(
                    "ValueError",
                    format!("cannot follow the canvas: {error}"),
                );
                self.fail(request, queue, exc).await
            }
        }
    }
}

impl PublishStep for Worker {
    async fn publish_step(&self, request: &TaskRequest, queue: &str) -> Result<()> {
        let (message, span) = spans::publishing(request);
        self.broker.publish(queue, &message).instrument(span).await
    }
}
