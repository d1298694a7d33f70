//! `GET /metrics`: the web app's Prometheus metrics. Open like `/health`: it names routes and
//! counts, never a job's data.

use std::sync::Arc;

use rocket::http::ContentType;
use rocket::State;

use crate::metrics::WebMetrics;
use crate::probe::Probe;

/// Prometheus' text format, as the worker's listener also names it.
fn text_format() -> ContentType {
    ContentType::parse_flexible(runtime::metrics::CONTENT_TYPE).expect("a valid media type")
}

/// Every metric; the outbox backlog as the probe last counted it (every 2 s; a database that
/// does not answer leaves the last count, and the scrape still succeeds).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus' text format, version 0.0.4",
        content_type = "text/plain; version=0.0.4; charset=utf-8", body = String)),
)]
#[rocket::get("/metrics")]
pub fn metrics(metrics: &State<Arc<WebMetrics>>, probe: &State<Probe>) -> (ContentType, String) {
    (text_format(), metrics.render(probe.snapshot().backlog))
}
