//! `GET /status/<uuid>/stream`: Server-Sent Events of a job's (or a workflow's) status, one
//! `status` event with the whole view at once and again each time it changes, ending after the
//! final state. Nothing polls: the tracker announces each row it moves (it follows the result
//! backend's notifications), and the stream reads the row again only then, or every
//! [`RECHECK`] in case a change was made where this process could not hear it (another
//! replica's sweep).

use std::time::Duration;

use rocket::response::stream::{Event, EventStream};
use rocket::{Shutdown, State};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::auth::Authorized;
use crate::db::Pool;
use crate::error::{DatabaseUnavailable, Error, ErrorBody, Unauthorized};
use crate::routes::status::{parse_id, view, AnswerBudget};
use crate::tracking::Changes;

/// Longest time a stream goes without reading its row again.
pub const RECHECK: Duration = Duration::from_secs(15);

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
            changes; the stream ends after the final state", content_type = "text/event-stream",
            body = String),
        (status = 400, description = "`id` is not a UUID", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "no job or workflow has this id", body = ErrorBody),
        (status = 503, response = DatabaseUnavailable),
    ),
    security(("bearer" = [])),
)]
#[rocket::get("/status/<id>/stream")]
pub async fn stream(
    _auth: Authorized,
    id: &str,
    pool: &State<Pool>,
    changes: &State<Changes>,
    budget: &State<AnswerBudget>,
    mut shutdown: Shutdown,
) -> Result<EventStream![], Error> {
    let id = parse_id(id)?;
    let budget = *budget.inner();
    // Listening before the first read: a change between the two is not missed.
    let mut moves = changes.subscribe();
    let first = view(pool, id, budget).await?;
    let pool = pool.inner().clone();
    Ok(EventStream! {
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
