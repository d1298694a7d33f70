//! A chord header member counted in its chord (Celery's Redis join, shared with Python
//! workers), the member that completes it starting the body, and tasks that add to their chord.

use serde_json::Value;
use tracing::{error, info, warn};

use super::outcome::failure_meta;
use super::Worker;
use crate::add_to_chord;
use crate::canvas::{self, Next, Signature};
use crate::chord;
use crate::protocol::result::ExceptionInfo;
use crate::protocol::TaskRequest;
use crate::registry::Outcome;

impl Worker {
    /// Counts a chord header member in its chord (Celery's Redis join, shared with Python
    /// workers). The member that completes the chord sends the body with every member's result,
    /// or, when one failed, fails the body with `ChordError`. `false` when the count or the body
    /// could not be recorded: the claim is given back, so the member's next delivery completes
    /// the chord.
    pub(super) async fn join_chord(
        &self,
        request: &TaskRequest,
        queue: &str,
        status: &str,
        result: &Value,
    ) -> bool {
        let (Some(backend), Some(chord_id)) = (&self.backend, &request.group) else {
            return true;
        };
        let body = match canvas::chord_of(request) {
            Ok(Some(body)) => body,
            Ok(None) => return true,
            Err(error) => {
                error!(task = %request.task, id = %request.id, %error, "cannot read the chord body");
                return true;
            }
        };
        let member = chord::Member {
            task_id: request.id.clone(),
            state: status.to_string(),
            result: result.clone(),
        };
        let (members, header, claim) = match chord::count(
            backend,
            chord_id,
            request.group_index,
            &member,
        )
        .await
        {
            Ok(chord::Join::Waiting) => return true,
            Ok(chord::Join::Complete {
                members,
                header,
                claim,
            }) => (members, header, claim),
            Err(error) => {
                error!(chord = %chord_id, id = %request.id, %error, "cannot count the chord member");
                return false;
            }
        };
        let failure = chord::failure(&members, body.subtask_type.as_deref() == Some("group"));
        let failed = failure.is_some();
        let recorded = match failure {
            None => chord::results(members, header.as_ref())
                .ok_or_else(|| {
                    canvas::CanvasError(
                        "the saved header names a task that is no member of the chord".into(),
                    )
                })
                .and_then(|results| canvas::chord_body(&body, request, results))
                .map(|next| (next, None)),
            Some(exc) => canvas::failed_chord_body(&body, request)
                .map(|(next, never)| (next, Some((exc, never)))),
        };
        let recorded = match recorded {
            Ok((next, None)) => {
                info!(chord = %chord_id, body = %body.task, "chord complete; sending its body");
                self.send_next(next).await
            }
            Ok((next, Some((exc, never)))) => {
                error!(chord = %chord_id, exception = %exc.repr(), "chord failed");
                let mut all = true;
                for Next {
                    request: body,
                    queue: body_queue,
                    ..
                } in next
                {
                    let queue = body_queue.unwrap_or_else(|| queue.to_string());
                    all &= Box::pin(self.fail_unrun(&body, &queue, exc.clone())).await;
                }
                all & Box::pin(self.fail_never_run(never, queue, &exc)).await
            }
            Err(error) => {
                error!(chord = %chord_id, %error, "cannot start the chord body");
                let exc = ExceptionInfo::celery("ChordError", format!("Join error: {error}"));
                let mut all = true;
                for id in body.final_ids() {
                    all &= self.store(failure_meta(&id, &exc)).await;
                }
                all
            }
        };
        let settled = match (recorded, failed) {
            (true, false) => chord::finish(backend, chord_id, &claim).await,
            (true, true) => chord::finish_failed(backend, chord_id, &claim).await,
            (false, _) => chord::release(backend, chord_id, &claim).await,
        };
        if let Err(error) = settled {
            warn!(chord = %chord_id, %error, "cannot settle the chord's claim; it expires by itself");
        }
        recorded
    }
    /// Counts in the task's chord what the task added to it, and sends it, before the task
    /// itself counts (see [`crate::add_to_chord`]); then the task ends with `outcome`. A task
    /// in no chord, or whose additions cannot be followed or counted, fails instead.
    pub(super) async fn add_to_chord(
        &self,
        request: &TaskRequest,
        added: Vec<Signature>,
        outcome: Outcome,
    ) -> Outcome {
        if added.is_empty() {
            return outcome;
        }
        if let Some(reason) = add_to_chord::refusal(request) {
            return Outcome::Failure(ExceptionInfo::builtin("ValueError", reason));
        }
        let (Some(backend), Some(chord_id)) = (&self.backend, &request.group) else {
            let reason = "adding to a chord needs a result backend";
            return Outcome::Failure(ExceptionInfo::builtin("ValueError", reason));
        };
        let count = added.len();
        let next = match add_to_chord::plan(request, added) {
            Ok(next) => next,
            Err(error) => {
                let message = format!("cannot follow the canvas: {error}");
                return Outcome::Failure(ExceptionInfo::builtin("ValueError", message));
            }
        };
        if let Err(error) = chord::extend(backend, chord_id, count).await {
            error!(chord = %chord_id, id = %request.id, %error, "cannot add to the chord");
            let message = format!("cannot add to the chord: {error}");
            return Outcome::Failure(ExceptionInfo::builtin("RuntimeError", message));
        }
        if !self.send_next(next).await {
            // Counted but not all sent: the chord waits for what is missing until it expires.
            error!(chord = %chord_id, id = %request.id, "cannot send all that was added to the chord");
        }
        outcome
    }
}
