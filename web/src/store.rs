//! The queries of the web app: the jobs table (one row per task id, moved forward through
//! Celery's states), the idempotency keys, and the monitor's task history and workers.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::scoped_futures::ScopedFutureExt;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use runtime::protocol::result::{state, ResultMeta};
use runtime::unique::Lock;
use serde_json::Value;
use uuid::Uuid;

use crate::schema::{idempotency_keys, task_history, tasks, workers};

/// A row of the table.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = tasks, check_for_backend(diesel::pg::Pg))]
pub struct Job {
    pub task_id: Uuid,
    pub task_name: String,
    pub args: Value,
    pub kwargs: Value,
    pub queue: String,
    pub state: String,
    pub state_rank: i16,
    pub progress_current: Option<i64>,
    pub progress_total: Option<i64>,
    pub meta: Option<Value>,
    pub result: Option<Value>,
    pub error_type: Option<String>,
    pub error_message: Option<String>,
    pub traceback: Option<String>,
    pub worker: Option<String>,
    pub retries: i32,
    pub published_at: Option<DateTime<Utc>>,
    pub publish_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    pub publish_lease_until: Option<DateTime<Utc>>,
    pub workflow_id: Option<Uuid>,
    pub workflow_kind: Option<String>,
    pub workflow_position: Option<i32>,
}

/// The longest error message a view shows, in characters: an exception's message is the
/// task's to choose, and one view may show a thousand of them.
pub const SHOWN_ERROR_CHARS: i32 = 4096;

/// What a job's view shows of its row, and no more: not its arguments, meta or traceback, an
/// error message cut at [`SHOWN_ERROR_CHARS`], and the size of its result in place of the
/// result, which [`results`] reads for the rows an answer has room for.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = tasks, check_for_backend(diesel::pg::Pg))]
pub struct Shown {
    pub task_id: Uuid,
    pub task_name: String,
    pub state: String,
    pub progress_current: Option<i64>,
    pub progress_total: Option<i64>,
    /// Bytes of the result's JSON text; none without a result.
    #[diesel(
        select_expression = diesel::dsl::sql::<diesel::sql_types::Nullable<diesel::sql_types::Integer>>("octet_length(tasks.result::text)"),
        select_expression_type = diesel::expression::SqlLiteral<diesel::sql_types::Nullable<diesel::sql_types::Integer>>
    )]
    pub result_bytes: Option<i32>,
    pub error_type: Option<String>,
    #[diesel(
        select_expression = left(tasks::error_message, SHOWN_ERROR_CHARS),
        select_expression_type = left<tasks::error_message, i32>
    )]
    pub error_message: Option<String>,
    pub publish_error: Option<String>,
    pub worker: Option<String>,
    pub retries: i32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub workflow_id: Option<Uuid>,
    pub workflow_kind: Option<String>,
    pub traceparent: Option<String>,
}

diesel::define_sql_function! {
    /// PostgreSQL's `left(text, n)`: the first `n` characters.
    fn left(text: diesel::sql_types::Nullable<diesel::sql_types::Text>, n: diesel::sql_types::Integer) -> diesel::sql_types::Nullable<diesel::sql_types::Text>;
}

/// A job as `POST /receive` records it, and as the outbox publishes it.
#[derive(Debug, Clone, PartialEq, Insertable, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = tasks, check_for_backend(diesel::pg::Pg))]
pub struct NewJob {
    pub task_id: Uuid,
    pub task_name: String,
    pub args: Value,
    pub kwargs: Value,
    pub queue: String,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    /// The workflow this job is a step of, its kind and the step's place in it; all three are
    /// set or none.
    pub workflow_id: Option<Uuid>,
    pub workflow_kind: Option<String>,
    pub workflow_position: Option<i32>,
    /// The unique lock the job holds (its name, as the message's header carries it) and the
    /// lock's life in seconds; both set or none.
    pub unique_key: Option<String>,
    pub unique_for: Option<i64>,
    /// The trace the job's publish continues (W3C), when tracing is on.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl NewJob {
    /// The unique lock the job holds, if any.
    pub fn lock(&self) -> Option<Lock> {
        Some(Lock {
            name: self.unique_key.clone()?,
            seconds: u64::try_from(self.unique_for?).ok()?,
        })
    }

    /// This job holding `lock` (none: not unique).
    pub fn holding(self, lock: Option<Lock>) -> Self {
        let (unique_key, unique_for) = match lock {
            Some(lock) => (Some(lock.name), i64::try_from(lock.seconds).ok()),
            None => (None, None),
        };
        Self {
            unique_key,
            unique_for,
            ..self
        }
    }

    /// The positional arguments as a list (a row holds a JSON array).
    pub fn args_list(&self) -> Vec<Value> {
        match &self.args {
            Value::Array(args) => args.clone(),
            _ => Vec::new(),
        }
    }

    /// The keyword arguments as a map (a row holds a JSON object).
    pub fn kwargs_map(&self) -> serde_json::Map<String, Value> {
        match &self.kwargs {
            Value::Object(kwargs) => kwargs.clone(),
            _ => Default::default(),
        }
    }

    /// A job of its own, not a workflow's step.
    pub fn single(
        task_id: Uuid,
        task_name: String,
        args: Value,
        kwargs: Value,
        queue: String,
    ) -> Self {
        Self {
            task_id,
            task_name,
            args,
            kwargs,
            queue,
            eta: None,
            expires: None,
            workflow_id: None,
            workflow_kind: None,
            workflow_position: None,
            unique_key: None,
            unique_for: None,
            traceparent: None,
            tracestate: None,
        }
    }
}

/// How long a publisher owns a job it is publishing before another may take it over.
pub const PUBLISH_LEASE_SECONDS: f64 = 30.0;

/// Order of states; a row only moves to a state of equal or higher rank, and never leaves a
/// final one. Custom states (PROGRESS...) rank between running and final.
pub fn rank(state_name: &str) -> i16 {
    match state_name {
        state::PENDING => 0,
        state::STARTED | state::RETRY => 1,
        name if state::is_ready(name) => 3,
        _ => 2,
    }
}

/// The columns a result meta changes; `None` leaves a column as it is.
#[derive(Debug, Clone, PartialEq, AsChangeset)]
#[diesel(table_name = tasks)]
pub struct StateChange {
    pub state: String,
    pub state_rank: i16,
    pub progress_current: Option<i64>,
    pub progress_total: Option<i64>,
    pub meta: Option<Value>,
    pub result: Option<Value>,
    pub error_type: Option<String>,
    pub error_message: Option<String>,
    pub traceback: Option<String>,
    pub worker: Option<String>,
    pub retries: Option<i32>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

impl StateChange {
    /// The row change a stored result meta means.
    pub fn from_meta(meta: &ResultMeta, now: DateTime<Utc>) -> Self {
        let status = meta.status.as_str();
        let exception = meta.exception();
        let count = |key: &str| meta.result.get(key).and_then(Value::as_i64);
        let custom = rank(status) == 2;
        let finished_at = meta
            .date_done
            .as_deref()
            .and_then(|d| DateTime::parse_from_rfc3339(d).ok())
            .map(|d| d.to_utc())
            .or_else(|| state::is_ready(status).then_some(now));
        let worker = meta
            .extended
            .as_ref()
            .map(|e| e.worker.clone())
            .or_else(|| match status {
                state::STARTED => meta
                    .result
                    .get("hostname")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                _ => None,
            });
        Self {
            state: meta.status.clone(),
            state_rank: rank(status),
            progress_current: custom.then(|| count("current")).flatten(),
            progress_total: custom.then(|| count("total")).flatten(),
            meta: custom.then(|| meta.result.clone()),
            result: (status == state::SUCCESS).then(|| meta.result.clone()),
            error_type: exception.as_ref().map(|e| e.exc_type.clone()),
            error_message: exception.as_ref().map(|e| e.message()),
            traceback: meta.traceback.clone(),
            worker,
            retries: meta.extended.as_ref().map(|e| e.retries as i32),
            finished_at,
            updated_at: now,
        }
    }
}

/// Records new jobs as PENDING, in one statement, leased to the caller who is about to publish
/// them.
pub async fn insert(connection: &mut AsyncPgConnection, jobs: &[NewJob]) -> QueryResult<()> {
    let lease = Utc::now() + chrono::Duration::milliseconds((PUBLISH_LEASE_SECONDS * 1e3) as i64);
    let rows: Vec<_> = jobs
        .iter()
        .map(|job| (job, tasks::publish_lease_until.eq(lease)))
        .collect();
    diesel::insert_into(tasks::table)
        .values(rows)
        .execute(connection)
        .await
        .map(drop)
}

/// An idempotency key as recorded: whose it is, the digest of the body it came with, and what
/// it made.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = idempotency_keys, check_for_backend(diesel::pg::Pg))]
pub struct KeyUse {
    pub scope: String,
    pub key: String,
    pub body_sha256: Vec<u8>,
    /// The job's task id, or the workflow's id.
    pub task_id: Uuid,
    /// The workflow's kind; none for a job.
    pub workflow_kind: Option<String>,
}

/// What recording jobs under an idempotency key came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Keyed {
    /// The key was free (or expired): it and the jobs are recorded.
    Recorded,
    /// The key is held, not expired: nothing was written; this is what holds it.
    Held(KeyUse),
}

/// Records `jobs` (as [`insert`] does) and `key` in one transaction, unless the key (its scope
/// and name) is held by a use not older than `ttl_seconds`: then nothing is written and that use
/// is returned. An older use is replaced (the jobs it made are left as they are). Once the key is
/// taken, `before_jobs` runs inside the transaction (`POST /receive` takes the jobs' unique locks
/// there, so that a repeat of the key is answered 200, never refused by its own first's lock);
/// its error rolls everything back and is returned.
///
/// The primary key decides, not a read before the write: a concurrent call with the same key
/// waits at the insert for this one to end, then finds the key held (or, if this one rolled
/// back, takes it). `ON CONFLICT DO UPDATE` locks the row it conflicts with even when its
/// `WHERE` keeps it, so the read after it sees that row, and the expiry pruning (which skips
/// locked rows) cannot delete it in between.
pub async fn insert_keyed<E, F, B>(
    connection: &mut AsyncPgConnection,
    key: &KeyUse,
    jobs: &[NewJob],
    ttl_seconds: f64,
    before_jobs: B,
) -> Result<Keyed, E>
where
    E: From<diesel::result::Error> + Send,
    B: FnOnce() -> F + Send,
    F: std::future::Future<Output = Result<(), E>> + Send,
{
    connection
        .transaction(|connection| {
            async move {
                let taken = diesel::sql_query(
                    "INSERT INTO idempotency_keys (scope, key, body_sha256, task_id, workflow_kind) \
                     VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (scope, key) DO UPDATE SET body_sha256 = excluded.body_sha256, \
                         task_id = excluded.task_id, workflow_kind = excluded.workflow_kind, \
                         created_at = now() \
                     WHERE idempotency_keys.created_at <= now() - make_interval(secs => $6)",
                )
                .bind::<diesel::sql_types::Text, _>(&key.scope)
                .bind::<diesel::sql_types::Text, _>(&key.key)
                .bind::<diesel::sql_types::Bytea, _>(&key.body_sha256)
                .bind::<diesel::sql_types::Uuid, _>(key.task_id)
                .bind::<diesel::sql_types::Nullable<diesel::sql_types::Text>, _>(&key.workflow_kind)
                .bind::<diesel::sql_types::Double, _>(ttl_seconds)
                .execute(connection)
                .await?;
                if taken == 0 {
                    let held = idempotency_keys::table
                        .find((&key.scope, &key.key))
                        .select(KeyUse::as_select())
                        .first(connection)
                        .await?;
                    return Ok(Keyed::Held(held));
                }
                before_jobs().await?;
                insert(connection, jobs).await?;
                Ok(Keyed::Recorded)
            }
            .scope_boxed()
        })
        .await
}

/// Deletes up to `limit` idempotency keys older than `ttl_seconds`, oldest first, skipping any a
/// request holds at the moment; returns how many.
pub async fn forget_expired_keys(
    connection: &mut AsyncPgConnection,
    ttl_seconds: f64,
    limit: i64,
) -> QueryResult<usize> {
    diesel::sql_query(
        "DELETE FROM idempotency_keys WHERE (scope, key) IN (SELECT scope, key \
             FROM idempotency_keys WHERE created_at <= now() - make_interval(secs => $1) \
             ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind::<diesel::sql_types::Double, _>(ttl_seconds)
    .bind::<diesel::sql_types::BigInt, _>(limit)
    .execute(connection)
    .await
}

/// The rows waiting to be published: none is on record as published and no worker has reported
/// on them (past PENDING), and a chain's later steps are left out, since the message of its first
/// step carries them.
const AWAITING_PUBLISH: &str = "published_at IS NULL AND state_rank = 0 \
    AND (workflow_kind IS DISTINCT FROM 'chain' OR workflow_position = 0)";

/// Jobs waiting to be published (the outbox's backlog).
pub async fn awaiting_publish(connection: &mut AsyncPgConnection) -> QueryResult<i64> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        count: i64,
    }
    let query = format!("SELECT count(*) AS count FROM tasks WHERE {AWAITING_PUBLISH}");
    let counted: Count = diesel::sql_query(query).get_result(connection).await?;
    Ok(counted.count)
}

/// Takes up to `limit` jobs not yet published, not leased to another publisher and not backing
/// off after a failed publish ([`mark_publish_failed`]), oldest first, leasing them to the caller (`SKIP LOCKED`: publishers never wait on each other).
/// A job a worker has reported on (past PENDING) was published, whatever its row says (the
/// database may have failed right after the broker took it): it is not sent again. A chain's
/// later steps are never taken: the message of its first step carries them.
pub async fn claim_unpublished(
    connection: &mut AsyncPgConnection,
    limit: i64,
) -> QueryResult<Vec<NewJob>> {
    diesel::sql_query(format!(
        "UPDATE tasks SET publish_lease_until = now() + make_interval(secs => $1) \
         WHERE task_id IN (SELECT task_id FROM tasks \
             WHERE {AWAITING_PUBLISH} \
               AND (publish_lease_until IS NULL OR publish_lease_until < now()) \
               AND (next_attempt_at IS NULL OR next_attempt_at <= now()) \
             ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
         RETURNING task_id, task_name, args, kwargs, queue, eta, expires, \
             workflow_id, workflow_kind, workflow_position, unique_key, unique_for, \
             traceparent, tracestate",
    ))
    .bind::<diesel::sql_types::Double, _>(PUBLISH_LEASE_SECONDS)
    .bind::<diesel::sql_types::BigInt, _>(limit)
    .load(connection)
    .await
}

/// Records that the broker confirmed these jobs' messages.
pub async fn mark_published(connection: &mut AsyncPgConnection, ids: &[Uuid]) -> QueryResult<()> {
    diesel::update(tasks::table.filter(tasks::task_id.eq_any(ids)))
        .set((
            tasks::published_at.eq(Utc::now()),
            tasks::publish_error.eq(None::<String>),
        ))
        .execute(connection)
        .await
        .map(drop)
}

/// Frees jobs a publisher claimed and will not publish now, for the next round of any publisher.
pub async fn release(connection: &mut AsyncPgConnection, ids: &[Uuid]) -> QueryResult<()> {
    diesel::update(tasks::table.filter(tasks::task_id.eq_any(ids)))
        .set(tasks::publish_lease_until.eq(None::<DateTime<Utc>>))
        .execute(connection)
        .await
        .map(drop)
}

/// Longest wait between two publishes of one job: the backoff doubles from 1 s up to this.
pub const MAX_PUBLISH_BACKOFF_SECONDS: f64 = 60.0;

/// Records why the job's message could not be published, counts the attempt and frees the job
/// for the outbox once its backoff has passed (1 s after the first failure, doubling up to
/// [`MAX_PUBLISH_BACKOFF_SECONDS`]): a job whose publish always fails delays only itself.
/// Returns the failed attempts so far.
pub async fn mark_publish_failed(
    connection: &mut AsyncPgConnection,
    id: Uuid,
    error: &str,
) -> QueryResult<i32> {
    #[derive(QueryableByName)]
    struct Attempts {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        publish_attempts: i32,
    }
    let counted: Option<Attempts> = diesel::sql_query(
        "UPDATE tasks SET publish_error = $1, publish_lease_until = NULL, updated_at = now(), \
             next_attempt_at = now() \
                 + make_interval(secs => least(power(2, least(publish_attempts, 30)), $2)), \
             publish_attempts = publish_attempts + 1 \
         WHERE task_id = $3 RETURNING publish_attempts",
    )
    .bind::<diesel::sql_types::Text, _>(error)
    .bind::<diesel::sql_types::Double, _>(MAX_PUBLISH_BACKOFF_SECONDS)
    .bind::<diesel::sql_types::Uuid, _>(id)
    .get_result(connection)
    .await
    .optional()?;
    Ok(counted.map_or(0, |c| c.publish_attempts))
}

/// Ends a job the broker keeps refusing: FAILURE with a `PublishError` saying why, unless it
/// was published or a worker reported on it meanwhile. The outbox never claims it again.
pub async fn give_up_publishing(
    connection: &mut AsyncPgConnection,
    id: Uuid,
    error: &str,
) -> QueryResult<()> {
    let now = Utc::now();
    diesel::update(
        tasks::table
            .find(id)
            .filter(tasks::published_at.is_null())
            .filter(tasks::state_rank.eq(0)),
    )
    .set((
        tasks::state.eq(state::FAILURE),
        tasks::state_rank.eq(rank(state::FAILURE)),
        tasks::error_type.eq(PUBLISH_ERROR),
        tasks::error_message.eq(error),
        tasks::finished_at.eq(now),
        tasks::updated_at.eq(now),
    ))
    .execute(connection)
    .await
    .map(drop)
}

/// The exception type a job shows when its message is not published (yet, or for good).
pub const PUBLISH_ERROR: &str = "PublishError";

/// The job with task id `id`.
pub async fn find(connection: &mut AsyncPgConnection, id: Uuid) -> QueryResult<Option<Job>> {
    tasks::table
        .find(id)
        .select(Job::as_select())
        .first(connection)
        .await
        .optional()
}

/// What the view of job `id` shows.
pub async fn shown(connection: &mut AsyncPgConnection, id: Uuid) -> QueryResult<Option<Shown>> {
    tasks::table
        .find(id)
        .select(Shown::as_select())
        .first(connection)
        .await
        .optional()
}

/// The results of the jobs `ids`, by task id (none for a job without one).
pub async fn results(
    connection: &mut AsyncPgConnection,
    ids: &[Uuid],
) -> QueryResult<Vec<(Uuid, Option<Value>)>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    tasks::table
        .filter(tasks::task_id.eq_any(ids))
        .select((tasks::task_id, tasks::result))
        .load(connection)
        .await
}

/// Jobs recorded and jobs finished in the last `seconds`, by queue: `(queue, recorded,
/// finished)`. Only jobs recorded within the last hour are read (the creation index bounds the
/// scan), so a job that took longer than that is not counted when it finishes.
pub async fn recent_by_queue(
    connection: &mut AsyncPgConnection,
    seconds: f64,
) -> QueryResult<Vec<(String, i64, i64)>> {
    #[derive(QueryableByName)]
    struct Recent {
        #[diesel(sql_type = diesel::sql_types::Text)]
        queue: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        recorded: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        finished: i64,
    }
    let rows: Vec<Recent> = diesel::sql_query(
        "SELECT queue, \
             count(*) FILTER (WHERE created_at > now() - make_interval(secs => $1)) AS recorded, \
             count(*) FILTER (WHERE finished_at > now() - make_interval(secs => $1)) AS finished \
         FROM tasks WHERE created_at > now() - interval '1 hour' GROUP BY queue",
    )
    .bind::<diesel::sql_types::Double, _>(seconds)
    .load(connection)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.queue, r.recorded, r.finished))
        .collect())
}

/// The steps of workflow `id` after `position`, in order.
pub async fn steps_after(
    connection: &mut AsyncPgConnection,
    id: Uuid,
    position: i32,
) -> QueryResult<Vec<NewJob>> {
    tasks::table
        .filter(tasks::workflow_id.eq(id))
        .filter(tasks::workflow_position.gt(position))
        .order(tasks::workflow_position)
        .select(NewJob::as_select())
        .load(connection)
        .await
}

/// What the views of workflow `id`'s steps show, in order; none when there is no such
/// workflow.
pub async fn workflow(connection: &mut AsyncPgConnection, id: Uuid) -> QueryResult<Vec<Shown>> {
    tasks::table
        .filter(tasks::workflow_id.eq(id))
        .order(tasks::workflow_position)
        .select(Shown::as_select())
        .load(connection)
        .await
}

/// Where a listing page starts: after the row with this time (a job's creation, a history
/// row's first event) and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub at: DateTime<Utc>,
    pub task_id: Uuid,
}

/// Filters of `GET /tasks`.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub state: Option<String>,
    pub task: Option<String>,
    pub after: Option<Cursor>,
    pub limit: i64,
}

/// What the views of jobs show, newest first, from the cursor on (keyset pagination: stable
/// under inserts).
pub async fn list(
    connection: &mut AsyncPgConnection,
    listing: &Listing,
) -> QueryResult<Vec<Shown>> {
    let mut query = tasks::table.select(Shown::as_select()).into_boxed();
    if let Some(state_name) = &listing.state {
        query = query.filter(tasks::state.eq(state_name.clone()));
    }
    if let Some(task) = &listing.task {
        query = query.filter(tasks::task_name.eq(task.clone()));
    }
    if let Some(Cursor { at, task_id }) = listing.after {
        query = query.filter(
            tasks::created_at
                .lt(at)
                .or(tasks::created_at.eq(at).and(tasks::task_id.lt(task_id))),
        );
    }
    query
        .order((tasks::created_at.desc(), tasks::task_id.desc()))
        .limit(listing.limit)
        .load(connection)
        .await
}

type NullableTimestamp = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>;

diesel::define_sql_function! {
    /// SQL `coalesce` over timestamps.
    fn coalesce(x: NullableTimestamp, y: NullableTimestamp) -> NullableTimestamp;
}

diesel::define_sql_function! {
    /// SQL `least` over timestamps.
    fn least(x: NullableTimestamp, y: NullableTimestamp) -> NullableTimestamp;
}

/// Applies a result meta to its row if it moves the row forward; `true` when it did.
pub async fn apply(
    connection: &mut AsyncPgConnection,
    id: Uuid,
    meta: &ResultMeta,
) -> QueryResult<bool> {
    let change = StateChange::from_meta(meta, Utc::now());
    let forward = tasks::state_rank
        .lt(3)
        .and(tasks::state_rank.le(change.state_rank));
    let target = diesel::update(tasks::table.find(id).filter(forward));
    // The first state seen past PENDING dates the start; it cannot be later than the finish,
    // however late the tracker saw the start.
    let updated = match (change.state_rank, change.finished_at) {
        (0, _) => target.set(change).execute(connection).await?,
        (_, Some(done)) => {
            let started = least(coalesce(tasks::started_at, Some(done)), Some(done));
            target
                .set((change, tasks::started_at.eq(started)))
                .execute(connection)
                .await?
        }
        (_, None) => {
            let started = coalesce(tasks::started_at, Some(change.updated_at));
            target
                .set((change, tasks::started_at.eq(started)))
                .execute(connection)
                .await?
        }
    };
    Ok(updated == 1)
}

/// Marks unfinished jobs as just checked against the backend, so the next sweeps reach the
/// others first: a job the backend never reports on (a chain step after a revoked one, a
/// message lost before it ran) would otherwise stay at the head of every sweep.
pub async fn checked(connection: &mut AsyncPgConnection, ids: &[Uuid]) -> QueryResult<()> {
    diesel::update(
        tasks::table
            .filter(tasks::task_id.eq_any(ids))
            .filter(tasks::state_rank.lt(3)),
    )
    .set(tasks::updated_at.eq(Utc::now()))
    .execute(connection)
    .await
    .map(drop)
}

/// Ids of jobs not yet final, least recently updated first. Jobs whose publish is not on record
/// are among them: the database may have failed just after the broker took one.
pub async fn unfinished(connection: &mut AsyncPgConnection, limit: i64) -> QueryResult<Vec<Uuid>> {
    tasks::table
        .filter(tasks::state_rank.lt(3))
        .order(tasks::updated_at.asc())
        .select(tasks::task_id)
        .limit(limit)
        .load(connection)
        .await
}

/// A task of the history, as a row holds it and as one event (or result meta) tells of it;
/// [`record_tasks`] merges a told one into its row.
#[derive(Debug, Clone, PartialEq, Insertable, Queryable, Selectable)]
#[diesel(table_name = task_history, check_for_backend(diesel::pg::Pg))]
pub struct TaskRecord {
    pub task_id: Uuid,
    pub name: Option<String>,
    pub state: String,
    pub state_rank: i16,
    pub args: Option<String>,
    pub kwargs: Option<String>,
    pub worker: Option<String>,
    pub queue: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
    pub received_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub runtime: Option<f64>,
    pub result: Option<String>,
    pub exception: Option<String>,
    pub traceback: Option<String>,
    pub retries: i32,
    pub root_id: Option<Uuid>,
    pub parent_id: Option<Uuid>,
    pub seen_at: DateTime<Utc>,
}

/// A worker as its last heartbeat (or `worker-online`/`-offline`) told of it.
#[derive(Debug, Clone, PartialEq, Insertable, Queryable, Selectable)]
#[diesel(table_name = workers, check_for_backend(diesel::pg::Pg))]
pub struct WorkerRecord {
    pub hostname: String,
    pub last_heartbeat: DateTime<Utc>,
    pub freq: f64,
    pub active: i32,
    pub processed: i64,
    pub online: bool,
    pub software: Option<String>,
}

/// The `state_rank` of the final states (SUCCESS, FAILURE, REVOKED): nothing moves a task past
/// them. The monitor's event mapping ranks the other states below it.
pub const FINAL_RANK: i16 = 5;

/// Merges `records` into their history rows, inserting those not there yet, in one statement:
/// the same merge as the monitor's event mapping does in Rust (the row is the older side), so a
/// record applied twice, or after a later one, changes nothing it should not. The records must
/// have distinct task ids; in task id order, concurrent writers lock rows in the same order.
pub async fn record_tasks(
    connection: &mut AsyncPgConnection,
    records: &[TaskRecord],
) -> QueryResult<()> {
    use diesel::dsl::sql;
    use diesel::sql_types::{Double, Integer, Nullable, SmallInt, Text, Timestamptz};
    use task_history as h;
    // Whether the told state moves the row: forward, or to another state of the same rank
    // unless the row's is final.
    let ahead = format!(
        "(excluded.state_rank > task_history.state_rank OR (excluded.state_rank = \
         task_history.state_rank AND task_history.state_rank < {FINAL_RANK}))"
    );
    // The told value when it moves the row (or the row has none), else the row's.
    let follows = |column: &str| {
        format!(
            "CASE WHEN {ahead} THEN coalesce(excluded.{column}, task_history.{column}) \
             ELSE coalesce(task_history.{column}, excluded.{column}) END"
        )
    };
    let first = |column: &str| format!("coalesce(task_history.{column}, excluded.{column})");
    // least() and greatest() pass over NULLs.
    let earliest = |column: &str| format!("least(task_history.{column}, excluded.{column})");
    diesel::insert_into(h::table)
        .values(records)
        .on_conflict(h::task_id)
        .do_update()
        .set((
            h::state.eq(sql::<Text>(&format!(
                "CASE WHEN {ahead} THEN excluded.state ELSE task_history.state END"
            ))),
            h::state_rank.eq(sql::<SmallInt>(
                "greatest(task_history.state_rank, excluded.state_rank)",
            )),
            h::name.eq(sql::<Nullable<Text>>(&first("name"))),
            h::args.eq(sql::<Nullable<Text>>(&first("args"))),
            h::kwargs.eq(sql::<Nullable<Text>>(&first("kwargs"))),
            h::queue.eq(sql::<Nullable<Text>>(&first("queue"))),
            h::root_id.eq(sql::<Nullable<diesel::sql_types::Uuid>>(&first("root_id"))),
            h::parent_id.eq(sql::<Nullable<diesel::sql_types::Uuid>>(&first(
                "parent_id",
            ))),
            h::sent_at.eq(sql::<Nullable<Timestamptz>>(&earliest("sent_at"))),
            h::received_at.eq(sql::<Nullable<Timestamptz>>(&earliest("received_at"))),
            h::started_at.eq(sql::<Nullable<Timestamptz>>(&earliest("started_at"))),
            h::seen_at.eq(sql::<Timestamptz>(&earliest("seen_at"))),
            h::worker.eq(sql::<Nullable<Text>>(&follows("worker"))),
            h::finished_at.eq(sql::<Nullable<Timestamptz>>(&follows("finished_at"))),
            h::runtime.eq(sql::<Nullable<Double>>(&follows("runtime"))),
            h::result.eq(sql::<Nullable<Text>>(&follows("result"))),
            h::exception.eq(sql::<Nullable<Text>>(&follows("exception"))),
            h::traceback.eq(sql::<Nullable<Text>>(&follows("traceback"))),
            h::retries.eq(sql::<Integer>(
                "greatest(task_history.retries, excluded.retries)",
            )),
        ))
        .execute(connection)
        .await
        .map(drop)
}

/// Records what workers told, each row replaced only by news at least as recent as it. The
/// records must have distinct hostnames.
pub async fn record_workers(
    connection: &mut AsyncPgConnection,
    records: &[WorkerRecord],
) -> QueryResult<()> {
    use diesel::query_dsl::methods::FilterDsl;
    use diesel::upsert::excluded;
    let newer = diesel::dsl::sql::<diesel::sql_types::Bool>(
        "excluded.last_heartbeat >= workers.last_heartbeat",
    );
    let upsert = diesel::insert_into(workers::table)
        .values(records)
        .on_conflict(workers::hostname)
        .do_update()
        .set((
            workers::last_heartbeat.eq(excluded(workers::last_heartbeat)),
            workers::freq.eq(excluded(workers::freq)),
            workers::active.eq(excluded(workers::active)),
            workers::processed.eq(excluded(workers::processed)),
            workers::online.eq(excluded(workers::online)),
            workers::software.eq(excluded(workers::software)),
        ));
    FilterDsl::filter(upsert, newer)
        .execute(connection)
        .await
        .map(drop)
}

/// Filters of `GET /history`.
#[derive(Debug, Clone, Default)]
pub struct HistoryListing {
    pub state: Option<String>,
    pub name: Option<String>,
    pub worker: Option<String>,
    /// Only tasks first seen at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only tasks first seen before this time.
    pub until: Option<DateTime<Utc>>,
    /// Text the arguments (positional or keyword, as their reprs) hold, case aside.
    pub text: Option<String>,
    pub after: Option<Cursor>,
    pub limit: i64,
}

/// `text` as a LIKE pattern matching it anywhere, its own `%`, `_` and `\` taken literally.
fn containing(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

/// Tasks of the history, newest first (by their first event), from the cursor on (keyset
/// pagination).
pub async fn history(
    connection: &mut AsyncPgConnection,
    listing: &HistoryListing,
) -> QueryResult<Vec<TaskRecord>> {
    use task_history as h;
    let mut query = h::table.select(TaskRecord::as_select()).into_boxed();
    if let Some(state_name) = &listing.state {
        query = query.filter(h::state.eq(state_name.clone()));
    }
    if let Some(name) = &listing.name {
        query = query.filter(h::name.eq(name.clone()));
    }
    if let Some(worker) = &listing.worker {
        query = query.filter(h::worker.eq(worker.clone()));
    }
    if let Some(since) = listing.since {
        query = query.filter(h::seen_at.ge(since));
    }
    if let Some(until) = listing.until {
        query = query.filter(h::seen_at.lt(until));
    }
    if let Some(text) = &listing.text {
        // The expression of the trigram index, so that the index serves it.
        query = query.filter(
            diesel::dsl::sql::<diesel::sql_types::Bool>(
                "(coalesce(args, '') || ' ' || coalesce(kwargs, '')) ILIKE ",
            )
            .bind::<diesel::sql_types::Text, _>(containing(text)),
        );
    }
    if let Some(Cursor { at, task_id }) = listing.after {
        query = query.filter(
            h::seen_at
                .lt(at)
                .or(h::seen_at.eq(at).and(h::task_id.lt(task_id))),
        );
    }
    query
        .order((h::seen_at.desc(), h::task_id.desc()))
        .limit(listing.limit)
        .load(connection)
        .await
}

/// How many tasks of one name the history first saw in one minute.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct MinuteCount {
    /// Null for tasks whose name no event told yet.
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    pub name: Option<String>,
    /// The minute's start.
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub minute: DateTime<Utc>,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub tasks: i64,
}

/// Tasks of the history first seen from `since` to before `until`, counted per name and
/// minute, by name then minute; minutes without a task are left out. By first event, as the
/// listing's `since` and `until` filter, so that a minute's count is what that listing holds,
/// and the time index serves it.
pub async fn minute_counts(
    connection: &mut AsyncPgConnection,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> QueryResult<Vec<MinuteCount>> {
    diesel::sql_query(
        "SELECT name, date_trunc('minute', seen_at) AS minute, count(*) AS tasks \
         FROM task_history WHERE seen_at >= $1 AND seen_at < $2 \
         GROUP BY name, minute ORDER BY name, minute",
    )
    .bind::<diesel::sql_types::Timestamptz, _>(since)
    .bind::<diesel::sql_types::Timestamptz, _>(until)
    .load(connection)
    .await
}

/// Every worker of the history, by hostname.
pub async fn workers(connection: &mut AsyncPgConnection) -> QueryResult<Vec<WorkerRecord>> {
    workers::table
        .order(workers::hostname)
        .select(WorkerRecord::as_select())
        .load(connection)
        .await
}

/// Up to `limit` ids of history tasks not yet final and first seen after `since`, least
/// recently checked against the result backend first, marked as checked now.
pub async fn history_to_check(
    connection: &mut AsyncPgConnection,
    since: DateTime<Utc>,
    limit: i64,
) -> QueryResult<Vec<Uuid>> {
    diesel::sql_query(format!(
        "UPDATE task_history SET checked_at = now() WHERE task_id IN (SELECT task_id \
             FROM task_history WHERE state_rank < {FINAL_RANK} AND seen_at > $1 \
             ORDER BY checked_at NULLS FIRST LIMIT $2 FOR UPDATE SKIP LOCKED) \
         RETURNING task_id"
    ))
    .bind::<diesel::sql_types::Timestamptz, _>(since)
    .bind::<diesel::sql_types::BigInt, _>(limit)
    .load::<CheckedId>(connection)
    .await
    .map(|ids| ids.into_iter().map(|id| id.task_id).collect())
}

#[derive(QueryableByName)]
struct CheckedId {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    task_id: Uuid,
}

/// Deletes up to `limit` history tasks first seen before `before`, oldest first, skipping any
/// a writer holds at the moment (another replica's retention, say); returns how many.
pub async fn forget_history_before(
    connection: &mut AsyncPgConnection,
    before: DateTime<Utc>,
    limit: i64,
) -> QueryResult<usize> {
    diesel::sql_query(
        "DELETE FROM task_history WHERE task_id IN (SELECT task_id FROM task_history \
             WHERE seen_at < $1 ORDER BY seen_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind::<diesel::sql_types::Timestamptz, _>(before)
    .bind::<diesel::sql_types::BigInt, _>(limit)
    .execute(connection)
    .await
}

/// Deletes the workers last heard of before `before`; returns how many.
pub async fn forget_workers_before(
    connection: &mut AsyncPgConnection,
    before: DateTime<Utc>,
) -> QueryResult<usize> {
    diesel::delete(workers::table.filter(workers::last_heartbeat.lt(before)))
        .execute(connection)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::protocol::result::{ExceptionInfo, Extended};
    use serde_json::json;

    #[test]
    fn states_only_rank_forward() {
        assert!(rank("PENDING") < rank("STARTED"));
        assert!(rank("STARTED") < rank("PROGRESS"));
        assert!(rank("PROGRESS") < rank("SUCCESS"));
        assert_eq!(rank("RETRY"), rank("STARTED"));
        assert_eq!(rank("CUSTOM"), rank("PROGRESS"));
        assert_eq!(rank("FAILURE"), rank("REVOKED"));
    }

    #[test]
    fn progress_fills_progress_columns() {
        let now = Utc::now();
        let meta = ResultMeta::new("id", "PROGRESS", json!({"current": 3, "total": 10}), now);
        let change = StateChange::from_meta(&meta, now);
        assert_eq!(
            (change.progress_current, change.progress_total),
            (Some(3), Some(10))
        );
        assert_eq!(change.meta, Some(json!({"current": 3, "total": 10})));
        assert_eq!((change.result, change.finished_at), (None, None));
    }

    #[test]
    fn failure_fills_error_columns_and_extended_fields_the_worker() {
        let now = Utc::now();
        let exc = ExceptionInfo::builtin("RuntimeError", "boom");
        let mut meta = ResultMeta::new("id", "FAILURE", exc.to_value(), now);
        meta.traceback = Some("tb".into());
        meta.extended = Some(Extended {
            name: "tasks.fail".into(),
            args: vec![],
            kwargs: Default::default(),
            worker: "w@h".into(),
            retries: 2,
            queue: "celery".into(),
        });
        let change = StateChange::from_meta(&meta, now);
        assert_eq!(change.error_type.as_deref(), Some("RuntimeError"));
        assert_eq!(change.error_message.as_deref(), Some("boom"));
        assert_eq!(
            (change.worker.as_deref(), change.retries),
            (Some("w@h"), Some(2))
        );
        assert_eq!(
            change.finished_at.map(|t| t.timestamp_micros()),
            Some(now.timestamp_micros())
        );
        assert_eq!(change.result, None);
    }

    #[test]
    fn started_names_the_worker_from_its_result() {
        let meta = ResultMeta::new(
            "id",
            "STARTED",
            json!({"pid": 1, "hostname": "py@h"}),
            Utc::now(),
        );
        assert_eq!(
            StateChange::from_meta(&meta, Utc::now()).worker.as_deref(),
            Some("py@h")
        );
    }
}
