//! `GET /metrics`: the web app's Prometheus metrics. Open like `/health`: it names routes and
//! counts, never a job's data.

use std::sync::Arc;

use rocket::http::ContentType;
use rocket::State;

use crate::db::Pool;
use crate::metrics::WebMetrics;
use crate::store;

/// Prometheus' text format, as the worker's listener also names it.
fn text_format() -> ContentType {
    ContentType::parse_flexible(runtime::metrics::CONTENT_TYPE).expect("a valid media type")
}

/// Every metric; the outbox backlog is counted now (a database that does not answer leaves the
/// last count, and the scrape still succeeds).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus' text format, version 0.0.4",
        content_type = "text/plain; version=0.0.4; charset=utf-8", body = String)),
)]
#[rocket::get("/metrics")]
pub async fn metrics(
    metrics: &State<Arc<WebMetrics>>,
    pool: &State<Pool>,
) -> (ContentType, String) {
    let backlog = match pool.get().await {
        Ok(mut connection) => store::awaiting_publish(&mut connection).await.ok(),
        Err(_) => None,
    };
    (text_format(), metrics.render(backlog))
}
