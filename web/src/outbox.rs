//! The outbox: a job is durable once its row commits, and is published from its row. Jobs the
//! broker did not take at once (it was down, or the web process died between commit and
//! publish) are published by a loop in every web process, under a lease in the row so that
//! replicas never publish the same job at the same time. A job whose publish fails waits out a
//! backoff of its own, so a job the broker keeps refusing delays no other, and ends FAILURE after
//! `web_publish_max_attempts` failures.

use std::sync::Arc;
use std::time::Duration;

use runtime::client::{Client, SendOptions};
use uuid::Uuid;

use crate::batch::{Batcher, Written};
use crate::db::Pool;
use crate::error::Error;
use crate::store::{self, NewJob};
use crate::workflow::{self, Kind};

/// Jobs one round publishes at most.
const BATCH: i64 = 100;
/// Pause between rounds.
const INTERVAL: Duration = Duration::from_secs(1);
/// Rows one group commit writes at most, and group commits under way at once (each holds a
/// pooled connection while it runs).
const GROUP_COMMIT: (usize, usize) = (256, 4);

/// Where jobs and their publishes are recorded, in group commits.
pub struct Journal {
    /// New jobs' rows.
    pub jobs: Batcher<NewJob>,
    /// Jobs whose message the broker confirmed.
    pub published: Batcher<Uuid>,
    /// Failed publishes after which a job the broker refuses while it answers ends FAILURE.
    pub max_attempts: u32,
}

impl Journal {
    /// Starts the writers, on connections of `pool`; a job ends FAILURE after `max_attempts`
    /// failed publishes.
    pub fn start(pool: &Pool, max_attempts: u32) -> Self {
        let (max, parallel) = GROUP_COMMIT;
        let rows_pool = pool.clone();
        let marks_pool = pool.clone();
        Self {
            jobs: Batcher::start(max, parallel, move |jobs: Vec<NewJob>| {
                let pool = rows_pool.clone();
                async move { Ok(store::insert(&mut *pool.get().await?, &jobs).await?) }
            }),
            published: Batcher::start(max, parallel, move |ids: Vec<Uuid>| {
                let pool = marks_pool.clone();
                async move { Ok(store::mark_published(&mut *pool.get().await?, &ids).await?) }
            }),
            max_attempts,
        }
    }
}

/// Sends `job`'s message: a job of its own as a task, a workflow's step as its canvas
/// ([`workflow::signature`]), with `rest` after it when it starts a chain.
async fn send(client: &Client, job: &NewJob, rest: &[NewJob]) -> runtime::Result<()> {
    if let Some(signature) = workflow::signature(job, rest) {
        return client.apply(&signature).await.map(drop);
    }
    let options = SendOptions {
        task_id: Some(job.task_id.to_string()),
        queue: Some(job.queue.clone()),
        eta: job.eta,
        expires_at: job.expires,
        ..SendOptions::default()
    };
    client
        .send_task(&job.task_name, job.args_list(), job.kwargs_map(), options)
        .await
        .map(drop)
}

/// Publishes `job` (and `rest`, the later steps of the chain it starts, if any), then records
/// the outcome: published (queued for the journal, the later steps too since the message
/// carries them; the answer tells when `job`'s mark is on record), or why not (in `job`'s row at
/// once, which frees it for the outbox after its backoff, or ends it after too many attempts;
/// then `None`). Errors only when the database fails; a
/// broker failure is recorded, not raised.
pub async fn publish(
    pool: &Pool,
    journal: &Journal,
    client: &Client,
    job: &NewJob,
    rest: &[NewJob],
) -> Result<Option<Written>, Error> {
    match send(client, job, rest).await {
        Ok(()) => {
            for step in rest {
                journal.published.queue(step.task_id).await?;
            }
            Ok(Some(journal.published.queue(job.task_id).await?))
        }
        Err(error) => {
            let reason = error.to_string();
            let mut connection = pool.get().await?;
            let attempts =
                store::mark_publish_failed(&mut connection, job.task_id, &reason).await?;
            // A broker that is down refuses every job: only one it refuses while it answers is
            // given up on, so an outage, however long, loses nothing.
            if attempts >= journal.max_attempts as i32 && client.check().await.is_ok() {
                tracing::error!(id = %job.task_id, %error, attempts, "the broker keeps refusing the job; it failed");
                let reason = format!("not published after {attempts} attempts: {reason}");
                store::give_up_publishing(&mut connection, job.task_id, &reason).await?;
            } else {
                tracing::warn!(id = %job.task_id, %error, attempts, "job not published yet; the outbox will retry");
            }
            Ok(None)
        }
    }
}

/// One round: publishes what is waiting, oldest first, until the broker refuses one; the jobs
/// claimed after that one are freed at once rather than held for the lease. Ends once the
/// publishes it made are on record.
pub async fn publish_waiting(
    pool: &Pool,
    journal: &Journal,
    client: &Client,
) -> Result<usize, Error> {
    let claimed = store::claim_unpublished(&mut *pool.get().await?, BATCH).await?;
    let recorded = publish_in_turn(pool, journal, client, &claimed).await?;
    let published = recorded.len();
    for written in recorded {
        written.wait().await?;
    }
    Ok(published)
}

/// Publishes `jobs`, leased to the caller, in turn until the broker refuses one: the jobs after
/// it are freed at once for the outbox rather than tried one by one against a broker that is
/// down, or held for the lease. A chain's first step is sent with its later steps. Returns the
/// publishes made, to wait for their marks if need be.
pub async fn publish_in_turn(
    pool: &Pool,
    journal: &Journal,
    client: &Client,
    jobs: &[NewJob],
) -> Result<Vec<Written>, Error> {
    let mut recorded = Vec::with_capacity(jobs.len());
    for (sent, job) in jobs.iter().enumerate() {
        let kind = job.workflow_kind.as_deref().and_then(Kind::from_name);
        let rest = match (job.workflow_id, kind) {
            (Some(id), Some(Kind::Chain)) => {
                let position = job.workflow_position.unwrap_or_default();
                store::steps_after(&mut *pool.get().await?, id, position).await?
            }
            _ => Vec::new(),
        };
        match publish(pool, journal, client, job, &rest).await? {
            Some(written) => recorded.push(written),
            None => {
                let rest: Vec<_> = jobs[sent + 1..].iter().map(|j| j.task_id).collect();
                store::release(&mut *pool.get().await?, &rest).await?;
                break;
            }
        }
    }
    Ok(recorded)
}

/// Runs rounds until the process ends.
pub async fn run(pool: Pool, journal: Arc<Journal>, client: Client) {
    let mut ticks = tokio::time::interval(INTERVAL);
    loop {
        ticks.tick().await;
        match publish_waiting(&pool, &journal, &client).await {
            Ok(0) => {}
            Ok(published) => tracing::info!(published, "outbox published waiting jobs"),
            Err(error) => tracing::warn!(%error, "outbox round failed"),
        }
    }
}
