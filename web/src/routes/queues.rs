//! `GET /queues`: for each queue the settings name, what the broker holds (ready, unacked,
//! consumers) and the recent rates of jobs recorded and finished, so an operator can tell
//! whether the workers keep up. With `broker_api` set, RabbitMQ's management API tells what
//! AMQP does not (unacked messages, publish and ack rates); else the broker itself tells what it
//! can.

use std::collections::HashMap;

use rocket::serde::json::Json;
use rocket::State;
use runtime::client::Client;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Authorized;
use crate::db::Pool;
use crate::error::{Error, ErrorBody, Unauthorized};
use crate::management::ManagementApi;
use crate::store;

/// The window of the rates, in seconds.
const RATE_WINDOW: f64 = 60.0;

/// One queue.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueView {
    pub name: String,
    /// Whether the broker has the queue (Redis: always, an empty queue is no key at all).
    pub exists: bool,
    /// Messages waiting.
    pub ready: u64,
    /// Delivered and not yet acknowledged; null where the broker does not tell (AMQP without
    /// `broker_api`).
    #[schema(required = true)]
    pub unacked: Option<u64>,
    /// Consumers attached; null where the broker does not know (Redis).
    #[schema(required = true)]
    pub consumers: Option<u64>,
    /// Messages published to the queue per second, as RabbitMQ's management API samples it;
    /// null without `broker_api`.
    #[schema(required = true)]
    pub published_per_second: Option<f64>,
    /// Messages acknowledged per second, as RabbitMQ's management API samples it; null without
    /// `broker_api`.
    #[schema(required = true)]
    pub acked_per_second: Option<f64>,
    /// Jobs this web tier recorded for the queue, per second over the window.
    pub jobs_recorded_per_second: f64,
    /// Of those jobs, how many finished per second over the window.
    pub jobs_finished_per_second: f64,
}

/// The answer: every configured queue, in name order.
#[derive(Debug, Serialize, ToSchema)]
pub struct Queues {
    pub queues: Vec<QueueView>,
    /// The window of the rates, in seconds.
    pub rate_window_seconds: f64,
}

/// Every configured queue, in name order.
#[utoipa::path(
    get,
    path = "/queues",
    tag = "operations",
    responses(
        (status = 200, description = "each configured queue", body = Queues),
        (status = 401, response = Unauthorized),
        (status = 503, description = "the broker or the database is unavailable", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
#[rocket::get("/queues")]
pub async fn queues(
    _auth: Authorized,
    client: &State<Client>,
    management: &State<Option<ManagementApi>>,
    pool: &State<Pool>,
) -> Result<Json<Queues>, Error> {
    let recent: HashMap<String, (i64, i64)> =
        store::recent_by_queue(&mut *pool.get().await?, RATE_WINDOW)
            .await?
            .into_iter()
            .map(|(queue, recorded, finished)| (queue, (recorded, finished)))
            .collect();
    let mut views = Vec::new();
    for name in client.configured_queues() {
        let (depth, rates) = match management.inner() {
            Some(api) => match api.queue(&name).await? {
                Some(stats) => (
                    Some(stats.depth),
                    Some((stats.published_per_second, stats.acked_per_second)),
                ),
                None => (None, Some((0.0, 0.0))),
            },
            None => (
                client
                    .depth(&name)
                    .await
                    .map_err(|e| Error::BrokerUnavailable(e.to_string()))?,
                None,
            ),
        };
        let (recorded, finished) = recent.get(&name).copied().unwrap_or_default();
        let per_second = |count: i64| count as f64 / RATE_WINDOW;
        views.push(QueueView {
            exists: depth.is_some(),
            ready: depth.map_or(0, |d| d.ready),
            unacked: depth.map_or(Some(0), |d| d.unacked),
            consumers: depth.map_or(Some(0), |d| d.consumers),
            published_per_second: rates.map(|(published, _)| published),
            acked_per_second: rates.map(|(_, acked)| acked),
            jobs_recorded_per_second: per_second(recorded),
            jobs_finished_per_second: per_second(finished),
            name,
        });
    }
    Ok(Json(Queues {
        queues: views,
        rate_window_seconds: RATE_WINDOW,
    }))
}
