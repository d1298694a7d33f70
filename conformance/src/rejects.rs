//! Tasks that end by rejecting their message, as Celery's `Reject` does.

use celery::task::TaskResult;
use runtime::registry::Registry;
use runtime::{progress, raise};

pub(crate) fn register(registry: Registry) -> Registry {
    registry
        .task::<reject_then_succeed>()
        .task::<reject_without_requeue>()
}

/// Acks late; its first delivery rejects the message back to the queue, the redelivery
/// returns `"second-pass"`.
#[celery::task(name = "t.integration.tasks.reject_then_succeed", acks_late = true)]
pub fn reject_then_succeed() -> TaskResult<String> {
    if !progress::request().is_some_and(|request| request.redelivered) {
        return Err(raise::reject("first delivery", true));
    }
    Ok("second-pass".into())
}

/// Rejects its message for good, so FAILURE `Reject` is stored.
#[celery::task(name = "t.integration.tasks.reject_without_requeue")]
pub fn reject_without_requeue() -> TaskResult<()> {
    Err(raise::reject("rejected", false))
}
