//! Prometheus metrics of the web app: requests by method, route and status with their latency
//! (a fairing times every request), and the outbox backlog, read from the jobs table when
//! scraped. Routes are labelled by their template (`/status/<id>`), never by the path asked
//! for, so the label set stays as small as the API.

use std::time::Instant;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use rocket::fairing::{Fairing, Info, Kind};
use rocket::{Data, Request, Response};
use runtime::metrics::{register, NAMESPACE};

/// Upper bounds of the request latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// What the web app counts.
pub struct WebMetrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    outbox_backlog: IntGauge,
}

impl Default for WebMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WebMetrics {
    /// Every metric at zero.
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some(NAMESPACE.into()), None).expect("a valid namespace");
        let labels = ["method", "route", "status"];
        let requests = IntCounterVec::new(
            Opts::new(
                "web_requests_total",
                "HTTP requests answered, by method, route and status.",
            ),
            &labels,
        )
        .expect("a valid counter");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "web_request_duration_seconds",
                "Seconds from a request's arrival to its answer, by method, route and status.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &labels,
        )
        .expect("a valid histogram");
        let outbox_backlog = IntGauge::new(
            "web_outbox_backlog",
            "Jobs recorded but not yet published to the broker.",
        )
        .expect("a valid gauge");
        Self {
            requests: register(&registry, requests),
            latency: register(&registry, latency),
            outbox_backlog: register(&registry, outbox_backlog),
            registry,
        }
    }

    /// Every metric in Prometheus' text format, with the outbox backlog as `backlog` (`None`
    /// when it could not be read: the last value read stays).
    pub fn render(&self, backlog: Option<i64>) -> String {
        if let Some(backlog) = backlog {
            self.outbox_backlog.set(backlog);
        }
        runtime::metrics::render(&self.registry)
    }

    fn observe(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let status = status.to_string();
        let labels = [method, route, status.as_str()];
        self.requests.with_label_values(&labels).inc();
        self.latency.with_label_values(&labels).observe(seconds);
    }
}

/// When a request arrived, kept in the request's local cache.
struct Arrival(Instant);

/// Times every request into the managed [`WebMetrics`].
pub struct RequestMetrics;

#[rocket::async_trait]
impl Fairing for RequestMetrics {
    fn info(&self) -> Info {
        Info {
            name: "request metrics",
            kind: Kind::Request | Kind::Response,
        }
    }

    async fn on_request(&self, request: &mut Request<'_>, _: &mut Data<'_>) {
        request.local_cache(|| Arrival(Instant::now()));
    }

    async fn on_response<'r>(&self, request: &'r Request<'_>, response: &mut Response<'r>) {
        let Some(metrics) = request.rocket().state::<std::sync::Arc<WebMetrics>>() else {
            return;
        };
        let arrival = request.local_cache(|| Arrival(Instant::now()));
        let route = request
            .route()
            .map(|route| route.uri.as_str())
            .unwrap_or("unmatched");
        metrics.observe(
            request.method().as_str(),
            route,
            response.status().code,
            arrival.0.elapsed().as_secs_f64(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_count_by_route_template_and_status() {
        let metrics = WebMetrics::new();
        metrics.observe("POST", "/receive", 202, 0.003);
        metrics.observe("POST", "/receive", 202, 0.2);
        metrics.observe("GET", "/status/<id>", 404, 0.001);
        let text = metrics.render(Some(7));
        for line in [
            r#"rcelery_web_requests_total{method="POST",route="/receive",status="202"} 2"#,
            r#"rcelery_web_requests_total{method="GET",route="/status/<id>",status="404"} 1"#,
            r#"rcelery_web_request_duration_seconds_bucket{method="POST",route="/receive",status="202",le="0.005"} 1"#,
            r#"rcelery_web_request_duration_seconds_count{method="POST",route="/receive",status="202"} 2"#,
            "rcelery_web_outbox_backlog 7",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        let unread = metrics.render(None);
        assert!(unread.lines().any(|l| l == "rcelery_web_outbox_backlog 7"));
    }
}
