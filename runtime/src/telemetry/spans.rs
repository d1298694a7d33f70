//! The spans a trace is made of, shaped as Celery's OpenTelemetry instrumentation shapes them,
//! so a trace reads the same whichever language ran a step: `run/<task>` (consumer) for a task
//! run, `apply_async/<task>` (producer) for a send, with the `celery.*` and `messaging.*`
//! attributes it sets. With tracing off each is [`Span::none`], which costs nothing.

use opentelemetry::Context;
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{enabled, propagation};
use crate::protocol::{Message, TaskRequest};

/// The span `request`'s run is traced in: a child of the context its message carries (a new
/// trace's root when it carries none). Its `celery.state` is recorded with [`ended`].
pub fn run(request: &TaskRequest, hostname: &str, queue: &str) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "run",
        otel.name = %format_args!("run/{}", request.task),
        otel.kind = "consumer",
        celery.action = "run",
        celery.task_name = %request.task,
        celery.hostname = %hostname,
        celery.retries = request.retries,
        celery.state = Empty,
        messaging.message.id = %request.id,
        messaging.destination = %queue,
        otel.status_code = Empty,
    );
    child_of(&span, propagation::from_headers(&request.extra_headers));
    span
}

/// Records in the current span (a task's [`run`] span) the state the run ended in; a FAILURE
/// also marks the span as an error, as Celery's instrumentation does.
pub fn ended(state: &str) {
    if !enabled() {
        return;
    }
    let span = Span::current();
    span.record("celery.state", state);
    if state == crate::protocol::result::state::FAILURE {
        span.record("otel.status_code", "error");
    }
}

/// `request` as the message to publish, and the span to publish it in: with tracing on,
/// `apply_async/<task>`, a child of the current span, whose context the message carries for the
/// task's run to continue.
pub fn publishing(request: &TaskRequest) -> (Message, Span) {
    let mut message = request.encode();
    if !enabled() {
        return (message, Span::none());
    }
    let span = tracing::info_span!(
        "apply_async",
        otel.name = %format_args!("apply_async/{}", request.task),
        otel.kind = "producer",
        celery.action = "apply_async",
        celery.task_name = %request.task,
        messaging.message.id = %request.id,
    );
    propagation::into_headers(&span.context(), &mut message.headers);
    (message, span)
}

/// A span named `name`, of OpenTelemetry kind `kind` (`server`, `internal`...), a child of
/// `parent` (a received or stored context), or of the current span when `parent` names none.
pub fn named(name: &str, kind: &'static str, parent: Context) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!("span", otel.name = name, otel.kind = kind);
    child_of(&span, parent);
    span
}

/// Makes `span` a child of `parent` when `parent` names a span; otherwise it keeps the parent
/// `tracing` gave it (the current span, or none: a new trace).
fn child_of(span: &Span, parent: Context) {
    use opentelemetry::trace::TraceContextExt;
    if parent.span().span_context().is_valid() {
        // Fails only for a span that is disabled or already started, and this one is neither.
        let _ = span.set_parent(parent);
    }
}

/// The context of `span`, to be carried on (stored with a job, answered by `/status`); `None`
/// with tracing off.
pub fn context_of(span: &Span) -> Option<(String, Option<String>)> {
    if !enabled() {
        return None;
    }
    propagation::to_pair(&span.context())
}
