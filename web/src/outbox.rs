//! The outbox: a job is durable once its row commits, and is published from its row. Jobs the
//! broker did not take at once (it was down, or the web process died between commit and
//! publish) are published by a loop in every web process, under a lease in the row so that
//! replicas never publish the same job at the same time. A job whose publish fails waits out a
//! backoff of its own, so a job the broker keeps refusing delays no other, and ends FAILURE after
//! `web_publish_max_attempts` failures.
//!
//! `POST /receive` answers once the row commits, which is the promise, and publishes after its
//! answer ([`Outbox::publish_after_answer`]): the client does not wait out the broker's confirm.

use std::sync::Arc;
use std::time::Duration;

use runtime::client::{ApplyOptions, Client, SendOptions};
use runtime::telemetry::{propagation, spans};
use tokio::sync::Semaphore;
use tracing::Instrument;
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
/// Publishes running after their answer at most: past this, an answer waits for a place, so
/// a broker slower than the requests slows the answers rather than piling up work.
const AFTER_ANSWER: u32 = 1024;
/// How long a shutting-down process lets its publishes after answers finish; what is cut off
/// the outbox publishes once the rows' lease ends.
const FINISH_WITHIN: Duration = Duration::from_secs(10);
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

/// What publishing needs: where jobs and their publishes are recorded, and the broker.
pub struct Outbox {
    pool: Pool,
    journal: Journal,
    client: Client,
    /// Places for publishes running after their answer ([`AFTER_ANSWER`]).
    after_answer: Arc<Semaphore>,
}

/// Jobs just recorded, to publish.
pub enum Recorded {
    /// One message: a job, or a chain's steps (the first sent, carrying the later ones).
    Message(Vec<NewJob>),
    /// A group's jobs, each a message of its own, in turn.
    InTurn(Vec<NewJob>),
}

impl Outbox {
    /// Publishes through `client`, recording on connections of `pool`; a job ends FAILURE after
    /// `max_attempts` failed publishes.
    pub fn new(pool: Pool, client: Client, max_attempts: u32) -> Self {
        Self {
            journal: Journal::start(&pool, max_attempts),
            pool,
            client,
            after_answer: Arc::new(Semaphore::new(AFTER_ANSWER as usize)),
        }
    }

    /// Where new jobs' rows are written.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Publishes `recorded`, committed and so durable, after the answer that accepted it: this
    /// waits only for a place among the publishes under way. Whatever is not published now (the
    /// broker refused, or the process ended first) the outbox publishes once the rows' lease
    /// ends, so a failure here is logged, never answered.
    pub async fn publish_after_answer(self: &Arc<Self>, recorded: Recorded) {
        let Ok(place) = self.after_answer.clone().acquire_owned().await else {
            return;
        };
        let outbox = self.clone();
        tokio::spawn(async move {
            let published = match &recorded {
                Recorded::Message(steps) => match steps.split_first() {
                    Some((job, rest)) => outbox.publish(job, rest).await.map(drop),
                    None => Ok(()),
                },
                Recorded::InTurn(jobs) => outbox.publish_in_turn(jobs).await.map(drop),
            };
            if let Err(error) = published {
                let (Recorded::Message(jobs) | Recorded::InTurn(jobs)) = &recorded;
                let id = jobs.first().map(|job| job.task_id.to_string());
                tracing::warn!(?id, %error, "job accepted; its publish is not on record, the outbox will send it");
            }
            drop(place);
        });
    }

    /// Waits, at shutdown, for the publishes running after their answers, so that jobs accepted
    /// just before a restart reach the broker at once rather than after their lease.
    pub async fn finish(&self) {
        let finished = self.after_answer.acquire_many(AFTER_ANSWER);
        match tokio::time::timeout(FINISH_WITHIN, finished).await {
            Ok(_) => {}
            Err(_) => tracing::warn!(
                "publishes after answers still under way at shutdown; the outbox sends them later"
            ),
        }
    }

    /// Publishes `job` (and `rest`, the later steps of the chain it starts, if any), then records
    /// the outcome: published (queued for the journal, the later steps too since the message
    /// carries them; the answer tells when `job`'s mark is on record), or why not (in `job`'s row at
    /// once, which frees it for the outbox after its backoff, or ends it after too many attempts;
    /// then `None`). Errors only when the database fails; a
    /// broker failure is recorded, not raised.
    async fn publish(&self, job: &NewJob, rest: &[NewJob]) -> Result<Option<Written>, Error> {
        let (pool, journal, client) = (&self.pool, &self.journal, &self.client);
        // Whenever it is published, a job continues the trace of the request that recorded it.
        let recorded_in =
            propagation::from_pair(job.traceparent.as_deref(), job.tracestate.as_deref());
        let span = spans::named("publish", "internal", recorded_in);
        match send(client, job, rest).instrument(span).await {
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
    async fn publish_waiting(&self) -> Result<usize, Error> {
        let claimed = store::claim_unpublished(&mut *self.pool.get().await?, BATCH).await?;
        let recorded = self.publish_in_turn(&claimed).await?;
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
    async fn publish_in_turn(&self, jobs: &[NewJob]) -> Result<Vec<Written>, Error> {
        let pool = &self.pool;
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
            match self.publish(job, &rest).await? {
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
    pub async fn run(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(INTERVAL);
        loop {
            ticks.tick().await;
            match self.publish_waiting().await {
                Ok(0) => {}
                Ok(published) => tracing::info!(published, "outbox published waiting jobs"),
                Err(error) => tracing::warn!(%error, "outbox round failed"),
            }
        }
    }
}

/// Sends `job`'s message: a job of its own as a task, a workflow's step as its canvas
/// ([`workflow::signature`]), with `rest` after it when it starts a chain. A job holding a unique
/// lock names it in its message, every time it is sent: the lock its task id already holds is
/// taken again at once; one that expired is taken anew, unless another task took it meanwhile,
/// which fails the publish ([`runtime::Error::NotUnique`]) as a refusal would.
async fn send(client: &Client, job: &NewJob, rest: &[NewJob]) -> runtime::Result<()> {
    let lock = job.lock();
    let unique_for = lock.as_ref().map(|l| Duration::from_secs(l.seconds));
    let unique_key = lock.map(|l| l.name);
    if let Some(signature) = workflow::signature(job, rest) {
        let options = ApplyOptions {
            unique_for,
            unique_key,
        };
        return client.apply_with(&signature, options).await.map(drop);
    }
    let options = SendOptions {
        task_id: Some(job.task_id.to_string()),
        queue: Some(job.queue.clone()),
        eta: job.eta,
        expires_at: job.expires,
        unique_for,
        unique_key,
        ..SendOptions::default()
    };
    client
        .send_task(&job.task_name, job.args_list(), job.kwargs_map(), options)
        .await
        .map(drop)
}
