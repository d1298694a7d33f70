//! `GET /status/<uuid>/stream`: Server-Sent Events of a job's (or a workflow's) status, one
//! `status` event with the whole view at once and again each time it changes, ending after the
//! final state. Nothing polls: the tracker announces each row it moves (it follows the result
//! backend's notifications), and the stream reads the row again only then, or every
//! [`RECHECK`] in case a change was made where this process could not hear it (another
//! replica's sweep).
//!
//! Streams are bounded ([`Streams`]): so many open at once in all, each for so long, and never
//! past the JWT that opened it; a stream that ends early is reopened by the client (an
//! `EventSource` does so by itself) with a credential that still holds.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rocket::response::stream::{Event, EventStream};
use rocket::{Shutdown, State};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::auth::Authorized;
use crate::db::Pool;
use crate::error::{Error, ErrorBody, Unauthorized};
use crate::routes::status::{parse_id, view, AnswerBudget};
use crate::tracking::Changes;

/// Longest time a stream goes without reading its row again.
pub const RECHECK: Duration = Duration::from_secs(15);

/// The bounds of status streams, managed state: one slot per open stream, `web_max_streams`
/// in all, and `web_stream_max_seconds` of life for each.
pub struct Streams {
    slots: Arc<Semaphore>,
    most: usize,
    lifetime: Duration,
}

impl Streams {
    /// At most `most` streams at once (within what a semaphore can count), each for
    /// `lifetime`.
    pub fn new(most: usize, lifetime: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(most.min(Semaphore::MAX_PERMITS))),
            most,
            lifetime,
        }
    }

    /// How long a stream opened now with a credential that holds until `expires_at` (seconds
    /// since the epoch) may last.
    fn life(&self, expires_at: Option<u64>) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        match expires_at {
            Some(at) => self
                .lifetime
                .min(Duration::from_secs(at).saturating_sub(now)),
            None => self.lifetime,
        }
    }
}

/// The status events of the job or workflow `id`. A listener that falls behind the
/// announcements reads the row afresh rather than miss its change.
#[utoipa::path(
    get,
    path = "/status/{id}/stream",
    tag = "jobs",
    params(("id" = Uuid, Path, description = "a task id or a workflow id")),
    responses(
        (status = 200, description = "`text/event-stream`: an `event: status` whose `data` is the \
            status view (as `GET /status/{id}` answers it) at once and again each time it \
            changes; the stream ends after the final state, after `web_stream_max_seconds`, or \
            when the JWT that opened it expires: reconnect (with a token that holds) to follow \
            on", content_type = "text/event-stream", body = String),
        (status = 400, description = "`id` is not a UUID", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "no job or workflow has this id", body = ErrorBody),
        (status = 503, description = "the database is unavailable, or `web_max_streams` \
            streams are open", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
#[rocket::get("/status/<id>/stream")]
pub async fn stream(
    auth: Authorized,
    id: &str,
    pool: &State<Pool>,
    changes: &State<Changes>,
    budget: &State<AnswerBudget>,
    streams: &State<Streams>,
    mut shutdown: Shutdown,
) -> Result<EventStream![], Error> {
    let id = parse_id(id)?;
    let budget = *budget.inner();
    // Held by the stream until it ends.
    let slot = streams
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| Error::TooManyStreams(streams.most))?;
    let ends = Instant::now() + streams.life(auth.expires_at);
    // Listening before the first read: a change between the two is not missed.
    let mut moves = changes.subscribe();
    let first = view(pool, id, budget).await?;
    let pool = pool.inner().clone();
    Ok(EventStream! {
        let _slot = slot;
        let watched = first.task_ids();
        let mut last = first;
        yield Event::json(&last).event("status");
        while !last.is_final() {
            tokio::select! {
                moved = moves.recv() => match moved {
                    Ok(task_id) if !watched.contains(&task_id) => continue,
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => break,
                },
                () = tokio::time::sleep(RECHECK) => {}
                () = tokio::time::sleep_until(ends) => break,
                () = &mut shutdown => break,
            }
            // One read stands for every announcement already waiting (a burst of a group's
            // members moving at once).
            while !matches!(
                moves.try_recv(),
                Err(TryRecvError::Closed | TryRecvError::Empty)
            ) {}
            match view(&pool, id, budget).await {
                Ok(now) if now != last => {
                    last = now;
                    yield Event::json(&last).event("status");
                }
                Ok(_) => {}
                // The next announcement or recheck reads again.
                Err(error) => tracing::warn!(%id, %error, "status stream cannot read the job now"),
            }
        }
    })
}
