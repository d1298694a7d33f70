"""OpenTelemetry traces across Python and Rust (issue #20), on both brokers, into a real OTLP/HTTP
receiver in the test process (:mod:`otlp_receiver`).

* ``curl`` → web → Rust task → Python task → Rust task (a chain through ``POST /receive``, with
  the caller's ``traceparent``) is one trace, every span the child of the one before: the web
  app's request, insert and publish, then each step's ``apply_async/<task>`` and ``run/<task>``,
  the Python worker's made by ``opentelemetry-instrumentation-celery``. ``/status`` names it.
* A Python client instrumented with ``opentelemetry-instrumentation-celery`` calling a Rust task:
  our ``run/<task>`` is a child of the client's ``apply_async/<task>``, from a worker that logs
  only warnings.
* A collector that does not answer costs log lines, not tasks.
"""

from __future__ import annotations

import json
import secrets
import socket

import pytest
from celery import _state as celery_state
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import BrokerSetup
from interop_app import create_app
from interop_helpers import wait_for
from otlp_receiver import Receiver, Span
from web_process import own_database, running_web

TIMEOUT = 60.0


@pytest.fixture
def receiver():
    receiver = Receiver()
    try:
        yield receiver
    finally:
        receiver.close()


def traced(endpoint: str) -> dict[str, str]:
    """The environment that points a Rust process at ``endpoint``, with batches sent every
    100 ms (the SDK's default is 5 s) so the test waits less."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}


def wait_spans(receiver: Receiver, wanted: list[tuple[str, str]], trace_id: str) -> list[Span]:
    """Until the trace ``trace_id`` holds a span of each ``(name, message id)`` of ``wanted``
    (message id ``""``: any); returns the trace's spans."""
    spans: list[Span] = []

    def complete():
        spans[:] = [span for span in receiver.received() if span.trace_id == trace_id]
        return all(any(span.name == name and (not task_id or span.attributes.get("messaging.message.id") == task_id)
                       for span in spans) for name, task_id in wanted)

    wait_for(complete, TIMEOUT, interval=0.1,
             describe=lambda: f"spans {wanted} in trace {trace_id}; have {[(s.name, s.service) for s in spans]}")
    return spans


def one(spans: list[Span], name: str, **attributes) -> Span:
    """The one span named ``name`` with ``attributes`` (``service`` matches the service name)."""
    service = attributes.pop("service", None)
    found = [span for span in spans if span.name == name and (service is None or span.service == service)
             and all(span.attributes.get(key) == value for key, value in attributes.items())]
    assert len(found) == 1, f"{len(found)} spans {name} {attributes} in {[(s.name, s.service) for s in spans]}"
    return found[0]


@pytest.mark.timeout(120)
def test_a_request_and_its_chain_across_python_and_rust_are_one_trace(broker: BrokerSetup, receiver,
                                                                       spawn_rust_worker, spawn_py_worker):
    rust_queue, py_queue = broker.new_queue("trace-rust"), broker.new_queue("trace-py")
    rust = spawn_rust_worker([rust_queue], tag="trace", extra_env=traced(receiver.endpoint))
    spawn_py_worker([py_queue], tag="trace",
                         extra_env={"INTEROP_OTLP_ENDPOINT": receiver.endpoint, "INTEROP_TWIN_TASKS": "1"})
    with own_database(f"rcelery_traces_{broker.session_id}_{broker.name}") as database, \
            running_web(broker, database, tag="trace", extra_env=traced(receiver.endpoint)) as web:
        caller_trace, caller_span = secrets.token_hex(16), secrets.token_hex(8)
        chain = {"chain": [
            {"task": "tasks.add", "args": [2, 3], "queue": rust_queue},
            {"task": "py.mul", "args": [10], "queue": py_queue},
            {"task": "tasks.add", "args": [1], "queue": rust_queue},
        ]}
        reply = web.request("POST", "/receive", body=json.dumps(chain).encode(),
                            headers={"Content-Type": "application/json",
                                     "traceparent": f"00-{caller_trace}-{caller_span}-01"})
        assert reply.status == 202, reply
        first, middle, last = reply.json()["task_ids"]
        assert web.wait_final(last)["result"] == 51
        assert {web.status(task_id)["trace_id"] for task_id in (first, middle, last)} == {caller_trace}

        spans = wait_spans(receiver, [("POST /receive", ""), ("insert", ""), ("publish", ""),
                                      ("run/tasks.add", first), ("run/py.mul", middle), ("run/tasks.add", last)],
                           caller_trace)

    request = one(spans, "POST /receive", service="rcelery-web")
    assert (request.parent, request.kind) == (caller_span, "server"), request
    insert, publish = one(spans, "insert"), one(spans, "publish")
    assert insert.parent == publish.parent == request.span_id, (insert, publish)
    web_send = one(spans, "apply_async/tasks.add", service="rcelery-web")
    assert (web_send.parent, web_send.kind) == (publish.span_id, "producer"), web_send

    run_first = one(spans, "run/tasks.add", **{"messaging.message.id": first})
    assert (run_first.parent, run_first.kind, run_first.service) == (web_send.span_id, "consumer", "rcelery-worker")
    assert run_first.attributes["celery.action"] == "run", run_first
    assert run_first.attributes["celery.task_name"] == "tasks.add", run_first
    assert run_first.attributes["celery.state"] == "SUCCESS", run_first
    assert run_first.attributes["celery.hostname"] == rust.hostname, run_first
    rust_send = one(spans, "apply_async/py.mul", service="rcelery-worker")
    assert rust_send.parent == run_first.span_id, rust_send
    assert rust_send.attributes["messaging.message.id"] == middle, rust_send

    # Made by opentelemetry-instrumentation-celery in the Python worker.
    run_middle = one(spans, "run/py.mul", **{"messaging.message.id": middle})
    assert (run_middle.parent, run_middle.service) == (rust_send.span_id, "interop-python-worker"), run_middle
    assert run_middle.attributes.get("celery.state") == "SUCCESS", run_middle
    py_send = one(spans, "apply_async/tasks.add", service="interop-python-worker")
    assert py_send.parent == run_middle.span_id, py_send

    run_last = one(spans, "run/tasks.add", **{"messaging.message.id": last})
    assert run_last.parent == py_send.span_id, run_last
    assert all(span.trace_id == caller_trace for span in spans)


@pytest.mark.timeout(90)
def test_a_rust_run_is_a_child_of_an_instrumented_python_clients_send(broker: BrokerSetup, receiver,
                                                                      spawn_rust_worker):
    rust_queue = broker.new_queue("trace-client")
    # Logging warnings only (but the ready line the fixture waits for): the log level must not
    # turn spans off.
    quiet = {"RUST_LOG": "warn,runtime::worker=info"}
    spawn_rust_worker([rust_queue], tag="trace-client", extra_env={**traced(receiver.endpoint), **quiet})
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # The instrumentation ends a send's span only for a task it finds in the current app.
    client = create_app(broker.broker_url, broker.result_backend, default_queue=rust_queue,
                        main=f"interop-traces-{broker.name}", strict_control=True, twin_tasks=True)
    previous = celery_state.get_current_app()
    client.set_current()
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        with provider.get_tracer("interop").start_as_current_span("client request") as request:
            sent = client.send_task("tasks.add", args=(2, 3), queue=rust_queue)
        assert sent.get(timeout=TIMEOUT) == 5
    finally:
        instrumentor.uninstrument()
        previous.set_current()

    send = next(span for span in exporter.get_finished_spans() if span.name == "apply_async/tasks.add")
    assert send.parent.span_id == request.get_span_context().span_id
    trace_id = format(send.context.trace_id, "032x")
    run = one(wait_spans(receiver, [("run/tasks.add", sent.id)], trace_id), "run/tasks.add")
    assert run.parent == format(send.context.span_id, "016x"), run
    assert run.attributes["celery.state"] == "SUCCESS", run


@pytest.mark.timeout(90)
def test_a_collector_that_does_not_answer_costs_log_lines_not_tasks(broker: BrokerSetup, spawn_rust_worker):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{unused.getsockname()[1]}"
    queue = broker.new_queue("trace-nowhere")
    worker = spawn_rust_worker([queue], tag="trace-nowhere", extra_env=traced(closed))
    results = [broker.app.send_task("tasks.add", args=(x, 1), queue=queue) for x in range(200)]
    assert [result.get(timeout=TIMEOUT) for result in results] == [x + 1 for x in range(200)]
    wait_for(lambda: "BatchSpanProcessor.ExportError" in worker.process.log_text(), TIMEOUT,
             describe=lambda: f"the failed export in the log {worker.process.log_path}")
