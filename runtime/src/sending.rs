//! Sending what the canvas planner returns ([`Next`] steps), for the worker (what follows a
//! task) and the client (a canvas applied) alike: each chord a step opens is recorded in the
//! result backend before the step is published, so no header member can count in a chord not
//! yet open, and each step goes to the queue its options name, else its route.
//!
//! The two callers differ only in what a failure means: the client stops and reports it to
//! its caller; the worker has already run the task, so it logs each failure and sends the rest.

use tracing::error;

use crate::backend::RedisBackend;
use crate::canvas::{self, Next};
use crate::chord;
use crate::config::CeleryConfig;
use crate::error::Result;
use crate::protocol::TaskRequest;

/// Where the steps go: the broker connection of the worker or of the client.
pub trait PublishStep {
    /// Publishes one step to `queue`.
    fn publish_step(
        &self,
        request: &TaskRequest,
        queue: &str,
    ) -> impl std::future::Future<Output = Result<()>> + Send;
}

/// What to do after a step cannot be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Send nothing more; the error is the answer.
    Stop,
    /// Log it and send the rest (except the members of a chord that could not be opened); the
    /// first error is the answer once all is tried.
    CarryOn,
}

/// Opens the chords of each of `steps` and publishes it with `to`, stamped with `origin`.
/// When a chord cannot be opened, none of its members is sent.
pub async fn send_steps(
    steps: Vec<Next>,
    backend: Option<&RedisBackend>,
    config: &CeleryConfig,
    origin: &str,
    on_error: OnError,
    to: &impl PublishStep,
) -> Result<()> {
    let mut first_error = None;
    let mut unopened: Vec<String> = Vec::new();
    for Next {
        mut request,
        queue,
        opens_chords,
        saves_headers,
    } in steps
    {
        let mut opened = true;
        for (chord_id, size) in opens_chords {
            let header = canvas::saved_header(&saves_headers, &chord_id);
            if let Err(error) = chord::open(backend, &chord_id, size, header).await {
                if on_error == OnError::Stop {
                    return Err(error);
                }
                error!(chord = %chord_id, %error, "cannot start the chord");
                first_error.get_or_insert(error);
                opened = false;
                unopened.push(chord_id);
            }
        }
        if !opened || request.group.as_ref().is_some_and(|g| unopened.contains(g)) {
            continue;
        }
        request.origin = Some(origin.to_string());
        let queue = queue.unwrap_or_else(|| config.queue_for(&request.task).to_string());
        if let Err(error) = to.publish_step(&request, &queue).await {
            if on_error == OnError::Stop {
                return Err(error);
            }
            error!(task = %request.task, id = %request.id, %queue, %error, "cannot send the next task");
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::error::Error;

    /// Records what it is given; refuses the tasks named in `refused`.
    #[derive(Default)]
    struct Recorder {
        refused: Vec<&'static str>,
        sent: Mutex<Vec<(String, String, Option<String>)>>,
    }

    impl PublishStep for Recorder {
        async fn publish_step(&self, request: &TaskRequest, queue: &str) -> Result<()> {
            if self.refused.contains(&request.task.as_str()) {
                return Err(Error::MissingQueue(queue.to_string()));
            }
            let sent = (
                request.task.clone(),
                queue.to_string(),
                request.origin.clone(),
            );
            self.sent.lock().unwrap().push(sent);
            Ok(())
        }
    }

    fn step(task: &str, queue: Option<&str>, group: Option<&str>, opens: &[&str]) -> Next {
        let mut request = TaskRequest::new(task, Vec::new(), Default::default());
        request.group = group.map(str::to_string);
        Next {
            request,
            queue: queue.map(str::to_string),
            opens_chords: opens.iter().map(|c| (c.to_string(), 2)).collect(),
            saves_headers: Vec::new(),
        }
    }

    fn sent(to: &Recorder) -> Vec<(String, String, Option<String>)> {
        to.sent.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn steps_go_to_their_own_queue_else_their_route_stamped_with_the_origin() {
        let to = Recorder::default();
        let steps = vec![step("a", Some("q1"), None, &[]), step("b", None, None, &[])];
        let config = CeleryConfig::default();
        send_steps(steps, None, &config, "me@host", OnError::Stop, &to)
            .await
            .unwrap();
        let origin = Some("me@host".to_string());
        let default_queue = config.task_default_queue.clone();
        assert_eq!(
            sent(&to),
            vec![
                ("a".into(), "q1".into(), origin.clone()),
                ("b".into(), default_queue, origin),
            ]
        );
    }

    #[tokio::test]
    async fn stopping_sends_nothing_after_the_first_failure() {
        let to = Recorder {
            refused: vec!["b"],
            ..Default::default()
        };
        let steps = ["a", "b", "c"].map(|t| step(t, Some("q"), None, &[]));
        let config = CeleryConfig::default();
        let result = send_steps(steps.into(), None, &config, "me", OnError::Stop, &to).await;
        assert!(result.is_err());
        assert_eq!(sent(&to).len(), 1);
    }

    #[tokio::test]
    async fn carrying_on_sends_the_rest_but_no_member_of_a_chord_not_opened() {
        let to = Recorder {
            refused: vec!["a"],
            ..Default::default()
        };
        // No backend: the chord cannot be opened, so neither of its members is sent.
        let steps = vec![
            step("a", Some("q"), None, &[]),
            step("member1", Some("q"), Some("c1"), &["c1"]),
            step("member2", Some("q"), Some("c1"), &[]),
            step("free", Some("q"), None, &[]),
        ];
        let config = CeleryConfig::default();
        let result = send_steps(steps, None, &config, "me", OnError::CarryOn, &to).await;
        assert!(matches!(result, Err(Error::MissingQueue(_))), "{result:?}");
        let tasks: Vec<String> = sent(&to).into_iter().map(|(task, ..)| task).collect();
        assert_eq!(tasks, ["free"]);
    }
}
