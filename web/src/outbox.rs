//! The outbox: a job is durable once its row commits, and is published from its row. Jobs the
//! broker did not take at once (it was down, or the web process died between commit and
//! publish) are published by a loop in every web process, under a lease in the row so that
//! replicas never publish the same job at the same time.

use std::time::Duration;

use diesel_async::AsyncPgConnection;
use runtime::client::{Client, SendOptions};
use serde_json::Value;

use crate::db::Pool;
use crate::error::Error;
use crate::store::{self, NewJob};

/// Jobs one round publishes at most.
const BATCH: i64 = 100;
/// Pause between rounds.
const INTERVAL: Duration = Duration::from_secs(1);

/// Publishes `job` and records the outcome in its row: published, or why not (then the outbox
/// takes it). Errors only when the database fails; a broker failure is recorded, not raised.
pub async fn publish_one(
    connection: &mut AsyncPgConnection,
    client: &Client,
    job: &NewJob,
) -> Result<bool, Error> {
    let options = SendOptions {
        task_id: Some(job.task_id.to_string()),
        queue: Some(job.queue.clone()),
        eta: job.eta,
        expires_at: job.expires,
        ..SendOptions::default()
    };
    let args = match &job.args {
        Value::Array(args) => args.clone(),
        _ => Vec::new(),
    };
    let kwargs = match &job.kwargs {
        Value::Object(kwargs) => kwargs.clone(),
        _ => Default::default(),
    };
    match client
        .send_task(&job.task_name, args, kwargs, options)
        .await
    {
        Ok(_) => {
            store::mark_published(connection, job.task_id).await?;
            Ok(true)
        }
        Err(error) => {
            tracing::warn!(id = %job.task_id, %error, "job not published yet; the outbox will retry");
            store::mark_publish_failed(connection, job.task_id, &error.to_string()).await?;
            Ok(false)
        }
    }
}

/// One round: publishes what is waiting, oldest first, until the broker refuses one; the jobs
/// claimed after that one are freed at once rather than held for the lease.
pub async fn publish_waiting(pool: &Pool, client: &Client) -> Result<usize, Error> {
    let mut connection = pool.get().await?;
    let claimed = store::claim_unpublished(&mut connection, BATCH).await?;
    for (published, job) in claimed.iter().enumerate() {
        if !publish_one(&mut connection, client, job).await? {
            let rest: Vec<_> = claimed[published + 1..].iter().map(|j| j.task_id).collect();
            store::release(&mut connection, &rest).await?;
            return Ok(published);
        }
    }
    Ok(claimed.len())
}

/// Runs rounds until the process ends.
pub async fn run(pool: Pool, client: Client) {
    let mut ticks = tokio::time::interval(INTERVAL);
    loop {
        ticks.tick().await;
        match publish_waiting(&pool, &client).await {
            Ok(0) => {}
            Ok(published) => tracing::info!(published, "outbox published waiting jobs"),
            Err(error) => tracing::warn!(%error, "outbox round failed"),
        }
    }
}
