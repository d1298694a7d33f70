//! W3C trace context in and out of the carriers a trace crosses: a task message's headers
//! (where Celery's OpenTelemetry instrumentation reads and writes `traceparent` and
//! `tracestate`) and any set of name-value pairs (HTTP headers, a job's row). Pure: no I/O and
//! no global state; the propagator is the W3C one, whatever else a process has installed.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use serde_json::{Map, Value};

/// The header naming the trace and the parent span: `00-<trace id>-<span id>-<flags>`.
pub const TRACEPARENT: &str = "traceparent";
/// The header carrying vendors' trace state beside it.
pub const TRACESTATE: &str = "tracestate";

/// A task message's headers read as a carrier. Values that are not text (a Python sender's
/// own headers may be anything) read as absent.
struct Reading<'a>(&'a Map<String, Value>);

impl Extractor for Reading<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(Value::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The context `headers` carry (an empty context when they carry none, or a malformed one).
pub fn from_headers(headers: &Map<String, Value>) -> Context {
    TraceContextPropagator::new().extract(&Reading(headers))
}

/// Writes `context` into `headers`, replacing what they carried: a resent request's old
/// `tracestate` must not ride along with a new `traceparent`. An invalid context writes
/// nothing, so the message carries no trace; an empty `tracestate` is left out, as Python's
/// propagator leaves it.
pub fn into_headers(context: &Context, headers: &mut Map<String, Value>) {
    headers.remove(TRACEPARENT);
    headers.remove(TRACESTATE);
    let mut written = HashMap::new();
    TraceContextPropagator::new().inject_context(context, &mut written);
    headers.extend(
        written
            .into_iter()
            .filter(|(_, value)| !value.is_empty())
            .map(|(key, value)| (key, Value::String(value))),
    );
}

/// The context named by a `traceparent` and an optional `tracestate` (from HTTP headers or a
/// stored row); empty when `traceparent` is absent or malformed.
pub fn from_pair(traceparent: Option<&str>, tracestate: Option<&str>) -> Context {
    let mut headers = Map::new();
    for (key, value) in [(TRACEPARENT, traceparent), (TRACESTATE, tracestate)] {
        if let Some(value) = value {
            headers.insert(key.to_string(), Value::String(value.to_string()));
        }
    }
    from_headers(&headers)
}

/// `context` as a `traceparent` and its `tracestate` (`None` when it has none), to be stored
/// and carried on later; `None` when the context names no span.
pub fn to_pair(context: &Context) -> Option<(String, Option<String>)> {
    let mut headers = Map::new();
    into_headers(context, &mut headers);
    let text = |key| headers.get(key).and_then(Value::as_str).map(str::to_string);
    Some((text(TRACEPARENT)?, text(TRACESTATE)))
}

/// The trace id a `traceparent` names, as 32 hex digits; `None` unless it is well formed.
pub fn trace_id(traceparent: &str) -> Option<String> {
    let context = from_pair(Some(traceparent), None);
    let span = context.span();
    let span_context = span.span_context();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    #[test]
    fn a_context_read_from_headers_is_written_back_the_same() {
        let sent = headers(json!({"traceparent": PARENT, "tracestate": "vendor=1", "id": "x"}));
        let context = from_headers(&sent);
        let mut resent = headers(json!({"id": "x"}));
        into_headers(&context, &mut resent);
        assert_eq!(resent["traceparent"], PARENT);
        assert_eq!(resent["tracestate"], "vendor=1");
        assert_eq!(resent["id"], "x");
    }

    #[test]
    fn writing_a_context_replaces_the_old_pair_and_an_empty_one_leaves_none() {
        let mut resent = headers(json!({"traceparent": PARENT, "tracestate": "old=1"}));
        let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        into_headers(&from_pair(Some(other), None), &mut resent);
        assert_eq!(resent["traceparent"], other);
        assert!(!resent.contains_key("tracestate"), "{resent:?}");
        into_headers(&Context::new(), &mut resent);
        assert!(resent.is_empty(), "{resent:?}");
    }

    #[test]
    fn malformed_or_absent_or_non_text_headers_carry_no_trace() {
        for carried in [
            json!({}),
            json!({"traceparent": "00-nothex-00f067aa0ba902b7-01"}),
            json!({"traceparent": 42}),
            json!({"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"}),
        ] {
            let context = from_headers(&headers(carried.clone()));
            assert!(!context.span().span_context().is_valid(), "{carried}");
            assert_eq!(to_pair(&context), None, "{carried}");
        }
    }

    #[test]
    fn a_pair_round_trips_and_names_its_trace_id() {
        let context = from_pair(Some(PARENT), Some("vendor=1"));
        assert_eq!(
            to_pair(&context),
            Some((PARENT.to_string(), Some("vendor=1".to_string())))
        );
        assert_eq!(
            trace_id(PARENT).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("garbage"), None);
    }
}
