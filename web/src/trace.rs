//! The span a request is served in: a request guard that opens `<METHOD> <route>` (a server
//! span) continuing the trace the request's W3C `traceparent` and `tracestate` headers name, so
//! a caller that traces (a Python service, `curl -H traceparent:..`) sees its job's spans in its
//! own trace. Without them, or with malformed ones, the request starts a trace of its own.

use std::convert::Infallible;

use rocket::request::{FromRequest, Outcome};
use rocket::Request;
use runtime::telemetry::propagation::{self, TRACEPARENT, TRACESTATE};
use runtime::telemetry::{self, spans};
use tracing::Span;

/// The request's span ([`Span::none`] when the app does not trace).
pub struct ServerSpan(pub Span);

#[rocket::async_trait]
impl<'r> FromRequest<'r> for ServerSpan {
    type Error = Infallible;

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, Self::Error> {
        if !telemetry::enabled() {
            return Outcome::Success(ServerSpan(Span::none()));
        }
        let route = request.route().map(|route| route.uri.to_string());
        let name = format!("{} {}", request.method(), route.as_deref().unwrap_or("?"));
        let headers = request.headers();
        let parent =
            propagation::from_pair(headers.get_one(TRACEPARENT), headers.get_one(TRACESTATE));
        Outcome::Success(ServerSpan(spans::named(&name, "server", parent)))
    }
}
