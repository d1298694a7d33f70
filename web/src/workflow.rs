//! Workflows: a chain or a group of task calls accepted by one `POST /receive`. Each step is a
//! job row of its own, keyed by its task id and tracked like any job; the rows of a workflow
//! share its id and kind and keep their place in it.
//!
//! How a step is published follows Celery's canvas: a group member on its own, tagged with the
//! group's id and its index; a chain from its first step only, whose message carries the later
//! steps for the workers to send on. What a workflow amounts to (state, result, error) is read
//! from its steps' rows, so Rust and Python workers alike move it.

use chrono::{DateTime, Utc};
use runtime::canvas::{self, Signature};
use runtime::protocol::result::state;
use serde_json::Value;

use crate::store::NewJob;

/// Steps one workflow may have at most: each is a row written and a message sent at once.
pub const MAX_STEPS: usize = 1000;

/// What kind of canvas a workflow is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Steps run one after another, each given the result of the one before.
    Chain,
    /// Steps run in parallel; the result is the list of theirs, in order.
    Group,
}

impl Kind {
    /// Both kinds, as a request names them.
    pub const ALL: [Kind; 2] = [Kind::Chain, Kind::Group];

    /// The name a request and the table use.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Chain => "chain",
            Kind::Group => "group",
        }
    }

    /// The kind called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

/// The signature of one step as its row records it.
fn step(job: &NewJob) -> Signature {
    Signature::new(job.task_name.clone(), job.args_list())
        .with_kwargs(job.kwargs_map())
        .on_queue(job.queue.clone())
        .with_id(job.task_id.to_string())
}

/// What publishes workflow step `job`: a group member tagged with its group, or a chain with
/// `job` first and `rest`, the chain's later steps, after it. `None` for a job that is no
/// workflow's step.
pub fn signature(job: &NewJob, rest: &[NewJob]) -> Option<Signature> {
    let id = job.workflow_id?;
    let position = usize::try_from(job.workflow_position?).ok()?;
    match Kind::from_name(job.workflow_kind.as_deref()?)? {
        Kind::Group => Some(step(job).member_of(id.to_string(), position)),
        Kind::Chain => Some(canvas::chain(
            std::iter::once(job).chain(rest).map(step).collect(),
        )),
    }
}

/// What a workflow amounts to, read from its steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// PENDING until a step starts, STARTED while it runs, then SUCCESS, or the state of the
    /// step that failed (FAILURE, REVOKED).
    pub state: String,
    /// A chain's last result; a group's results in order.
    pub result: Option<Value>,
    /// The index of the step whose error is the workflow's.
    pub failed_step: Option<usize>,
    /// Steps in a final state.
    pub done: usize,
    /// When the workflow reached its final state.
    pub finished_at: Option<DateTime<Utc>>,
}

/// What a workflow's outcome reads of one of its steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub state: String,
    /// Its result, as far as the reader holds it.
    pub result: Option<Value>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// The steps whose results make a succeeded workflow's result: a chain's last, every member
/// of a group.
pub fn result_steps(kind: Kind, steps: usize) -> std::ops::Range<usize> {
    match kind {
        Kind::Chain => steps.saturating_sub(1)..steps,
        Kind::Group => 0..steps,
    }
}

/// The outcome of a workflow of `kind` whose steps, in order, are `steps`. A chain ends at its
/// first step that fails (the steps after it never run); a group ends when all its members
/// have, and fails if any failed.
pub fn outcome(kind: Kind, steps: &[Step]) -> Outcome {
    let is_final = |job: &&Step| state::is_ready(&job.state);
    let done = steps.iter().filter(is_final).count();
    let failed = steps
        .iter()
        .position(|job| state::is_ready(&job.state) && job.state != state::SUCCESS);
    let ended = match kind {
        Kind::Chain => failed.is_some() || done == steps.len(),
        Kind::Group => done == steps.len(),
    };
    let running = || {
        if steps.iter().any(|job| job.state != state::PENDING) {
            state::STARTED
        } else {
            state::PENDING
        }
    };
    let (state_name, result) = match (ended, failed) {
        (false, _) => (running().to_string(), None),
        (true, Some(index)) => (steps[index].state.clone(), None),
        (true, None) => (
            state::SUCCESS.to_string(),
            Some({
                let mut results = steps[result_steps(kind, steps.len())]
                    .iter()
                    .map(|job| job.result.clone().unwrap_or(Value::Null));
                match kind {
                    Kind::Chain => results.next().unwrap_or(Value::Null),
                    Kind::Group => Value::Array(results.collect()),
                }
            }),
        ),
    };
    Outcome {
        state: state_name,
        result,
        failed_step: failed.filter(|_| ended),
        done,
        finished_at: ended
            .then(|| steps.iter().filter_map(|job| job.finished_at).max())
            .flatten(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use uuid::Uuid;

    fn new_job(kind: Kind, workflow: Uuid, position: i32, task: &str, args: Value) -> NewJob {
        NewJob {
            workflow_id: Some(workflow),
            workflow_kind: Some(kind.name().into()),
            workflow_position: Some(position),
            ..NewJob::single(
                Uuid::new_v4(),
                task.into(),
                args,
                json!({"k": 1}),
                "q".into(),
            )
        }
    }

    fn row(state_name: &str, result: Option<Value>, finished_second: Option<i64>) -> Step {
        Step {
            state: state_name.into(),
            result,
            finished_at: finished_second.map(|second| DateTime::from_timestamp(second, 0).unwrap()),
        }
    }

    #[test]
    fn kinds_are_named_as_requests_name_them() {
        for kind in Kind::ALL {
            assert_eq!(Kind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(Kind::from_name("chord"), None);
    }

    #[test]
    fn a_group_member_is_sent_alone_tagged_with_its_group() {
        let id = Uuid::new_v4();
        let member = new_job(Kind::Group, id, 2, "tasks.add", json!([1, 2]));
        let signature = signature(&member, &[]).unwrap();
        assert_eq!(signature.subtask_type, None);
        assert_eq!(
            (signature.task.as_str(), &signature.args),
            ("tasks.add", &vec![json!(1), json!(2)])
        );
        assert_eq!(
            signature.option_str("task_id"),
            Some(member.task_id.to_string())
        );
        assert_eq!(signature.option_str("group_id"), Some(id.to_string()));
        assert_eq!(signature.options["group_index"], json!(2));
        assert_eq!(signature.option_str("queue").as_deref(), Some("q"));
        assert_eq!(signature.kwargs["k"], json!(1));
    }

    #[test]
    fn a_chain_is_sent_from_its_first_step_with_the_rest_in_order() {
        let id = Uuid::new_v4();
        let steps: Vec<NewJob> = (0..3)
            .map(|i| new_job(Kind::Chain, id, i, &format!("tasks.s{i}"), json!([i])))
            .collect();
        let chain = signature(&steps[0], &steps[1..]).unwrap();
        let sent = canvas::start(&chain).unwrap();
        assert_eq!(sent.len(), 1);
        let first = &sent[0].request;
        assert_eq!(
            (first.task.as_str(), first.id.clone()),
            ("tasks.s0", steps[0].task_id.to_string())
        );
        // The message carries the later steps, last first, each under its row's task id.
        let carried: Vec<(String, String)> = first.embed["chain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let s = Signature::from_value(s).unwrap();
                (s.task.clone(), s.option_str("task_id").unwrap())
            })
            .collect();
        assert_eq!(
            carried,
            vec![
                ("tasks.s2".to_string(), steps[2].task_id.to_string()),
                ("tasks.s1".to_string(), steps[1].task_id.to_string()),
            ]
        );
    }

    #[test]
    fn a_job_of_its_own_has_no_workflow_signature() {
        let job = NewJob::single(
            Uuid::new_v4(),
            "tasks.add".into(),
            json!([]),
            json!({}),
            "q".into(),
        );
        assert_eq!(signature(&job, &[]), None);
    }

    #[test]
    fn a_chain_runs_until_every_step_succeeds_and_answers_the_last_result() {
        let pending = [row("PENDING", None, None), row("PENDING", None, None)];
        assert_eq!(outcome(Kind::Chain, &pending).state, "PENDING");
        let midway = [
            row("SUCCESS", Some(json!(3)), Some(5)),
            row("PENDING", None, None),
        ];
        let between = outcome(Kind::Chain, &midway);
        assert_eq!(
            (between.state.as_str(), between.done, between.result),
            ("STARTED", 1, None)
        );
        let done = [
            row("SUCCESS", Some(json!(3)), Some(5)),
            row("SUCCESS", Some(json!(7)), Some(9)),
        ];
        let done = outcome(Kind::Chain, &done);
        assert_eq!(
            (done.state.as_str(), done.result, done.done),
            ("SUCCESS", Some(json!(7)), 2)
        );
        assert_eq!(done.finished_at, DateTime::from_timestamp(9, 0));
    }

    #[test]
    fn a_chain_fails_with_its_first_failed_step() {
        let steps = [
            row("SUCCESS", Some(json!(3)), Some(5)),
            row("FAILURE", None, Some(6)),
            row("PENDING", None, None),
        ];
        let failed = outcome(Kind::Chain, &steps);
        assert_eq!(
            (failed.state.as_str(), failed.failed_step, failed.result),
            ("FAILURE", Some(1), None)
        );
        assert_eq!(failed.finished_at, DateTime::from_timestamp(6, 0));
        // Celery's worker marks the steps that never run as failed too: the first one is still
        // the cause.
        let marked = [
            row("SUCCESS", Some(json!(3)), Some(5)),
            row("REVOKED", None, Some(6)),
            row("FAILURE", None, Some(6)),
        ];
        let revoked = outcome(Kind::Chain, &marked);
        assert_eq!(
            (revoked.state.as_str(), revoked.failed_step),
            ("REVOKED", Some(1))
        );
    }

    #[test]
    fn a_group_ends_when_every_member_has() {
        let running = [row("FAILURE", None, Some(2)), row("PROGRESS", None, None)];
        let running = outcome(Kind::Group, &running);
        assert_eq!(
            (running.state.as_str(), running.failed_step, running.done),
            ("STARTED", None, 1)
        );
        let failed = [
            row("SUCCESS", Some(json!(1)), Some(4)),
            row("FAILURE", None, Some(2)),
        ];
        let failed = outcome(Kind::Group, &failed);
        assert_eq!(
            (failed.state.as_str(), failed.failed_step),
            ("FAILURE", Some(1))
        );
        assert_eq!(failed.finished_at, DateTime::from_timestamp(4, 0));
        let done = [
            row("SUCCESS", Some(json!(1)), Some(4)),
            row("SUCCESS", Some(json!([2])), Some(3)),
        ];
        let done = outcome(Kind::Group, &done);
        assert_eq!(
            (done.state.as_str(), done.result),
            ("SUCCESS", Some(json!([1, [2]])))
        );
        assert_eq!(done.finished_at, DateTime::from_timestamp(4, 0));
    }
}
