//! A chord header member adding work to its own chord while it runs (Celery's
//! `Task.add_to_chord`): the chord's body then waits for the added signatures too, and gets
//! their results after the header's.
//!
//! The task calls [`add_to_chord`], which records the signature in its context; once the task's
//! code has ended, and before the task counts in its chord, the worker counts the additions in
//! the chord ([`crate::chord::extend`]) and sends what [`plan`] works out (pure).

use crate::canvas::{self, CanvasError, Next, Signature};
use crate::error::Result;
use crate::progress;
use crate::protocol::TaskRequest;
use crate::replace::{beside, map_final};

/// Adds `signature` to the chord the running task is a header member of. A task in no chord
/// fails with Celery's `ValueError` once its code has ended; outside a task this is an error.
pub fn add_to_chord(signature: Signature) -> Result<()> {
    progress::record_added_to_chord(signature)
}

/// Why `task` cannot add to a chord, in Celery's words; `None` when it can.
pub fn refusal(task: &TaskRequest) -> Option<&'static str> {
    let in_chord = task.group.is_some() && task.embed.get("chord").is_some_and(|c| !c.is_null());
    (!in_chord).then_some("Current task is not member of any chord")
}

/// The requests that run `added` as members of `task`'s chord, each ending in the chord at
/// `task`'s own index, sent by `task`.
pub fn plan(task: &TaskRequest, added: Vec<Signature>) -> Result<Vec<Next>, CanvasError> {
    let mut next = Vec::new();
    for signature in added {
        let member = map_final(signature, &mut |last| Ok(beside(last, task)))?;
        next.extend(canvas::sent_by(&member.frozen()?, task)?);
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Map};

    use super::*;

    #[test]
    fn what_is_added_ends_in_the_tasks_chord_at_its_index() {
        let mut task = TaskRequest::new("adder", vec![], Map::new());
        assert_eq!(
            refusal(&task),
            Some("Current task is not member of any chord")
        );
        task.group = Some("ch".into());
        task.group_index = Some(0);
        task.embed["chord"] = Signature::new("body", vec![]).to_value();
        assert_eq!(refusal(&task), None);
        let added = vec![
            Signature::new("add", vec![json!(1), json!(4)]),
            canvas::chord(
                vec![Signature::new("add", vec![json!(2), json!(4)])],
                Signature::new("tsum", vec![]),
            ),
        ];
        let next = plan(&task, added).unwrap();
        let first = &next[0].request;
        assert_eq!(
            (first.group.as_deref(), first.group_index),
            (Some("ch"), Some(0))
        );
        assert_eq!(first.embed["chord"]["task"], "body");
        assert_eq!(first.parent_id.as_deref(), Some(task.id.as_str()));
        // The added chord counts once, through its body.
        let inner = &next[1].request;
        assert_ne!(inner.group.as_deref(), Some("ch"));
        let body = &inner.embed["chord"];
        assert_eq!(body["task"], "tsum");
        assert_eq!(body["options"]["group_id"], "ch");
        assert_eq!(body["options"]["chord"]["task"], "body");
    }
}
