//! A running task sending a canvas of its own (Celery's `signature.delay()` or `chain()` inside a
//! task): the canvas is frozen, so the task gets the handle of its result at once, and what it
//! starts is sent by the worker as soon as the task's code has ended, before the task's own
//! state is stored. Its requests have the task as their parent, and its root as theirs.

use serde_json::Value;

use crate::canvas::{self, Signature};
use crate::error::{Error, Result};
use crate::progress;

/// Sends `signature` from the running task, and returns its result as Celery serializes a
/// result handle a task returns (see [`Signature::result_tuple`]). A canvas that cannot be
/// followed is an error, as is a call outside a task.
pub fn delay(signature: &Signature) -> Result<Value> {
    let task = progress::request().ok_or(Error::NotInTask)?;
    let invalid = |error: canvas::CanvasError| Error::InvalidOption(error.to_string());
    let frozen = signature.frozen().map_err(invalid)?;
    progress::record_sent(canvas::sent_by(&frozen, &task).map_err(invalid)?)?;
    Ok(frozen.result_tuple())
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Map};

    use super::*;
    use crate::progress::TaskContext;
    use crate::protocol::TaskRequest;

    #[tokio::test]
    async fn the_canvas_is_left_to_send_and_its_result_handle_returned() {
        let task = TaskRequest::new("builder", vec![], Map::new());
        let (context, _updates) = TaskContext::new(&task);
        let (a, b) = (
            Signature::new("a", vec![json!(1)]),
            Signature::new("b", vec![]),
        );
        let ids = [&a, &b].map(|s| s.option_str("task_id").unwrap());
        let canvas = crate::chain![a, b];
        let handle = context.clone().scope(async { delay(&canvas) }).await;
        assert_eq!(
            handle.unwrap(),
            json!([[ids[1], [[ids[0], null], null]], null])
        );
        let sent = context.take_sent();
        assert_eq!(sent.len(), 1);
        let first = &sent[0].request;
        assert_eq!(first.id, ids[0]);
        assert_eq!(first.parent_id.as_deref(), Some(task.id.as_str()));
        assert!(matches!(delay(&canvas), Err(Error::NotInTask)));
    }
}
