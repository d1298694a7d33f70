"""The Python side of the interop suite: a stock Celery app plus a few Python tasks.

The module-level ``app`` is configured from the environment so that a Python worker
(``python -m celery -A interop_app worker ...``, run with cwd ``interop/``) talks to the same
broker and result backend as the Rust processes under test:

* ``INTEROP_BROKER_URL``      broker URL (default: local RabbitMQ)
* ``INTEROP_RESULT_BACKEND``  result backend URL (default: local Redis db 0)
* ``INTEROP_DEFAULT_QUEUE``   ``task_default_queue`` (default: ``celery``)
* ``INTEROP_CONTROL_DESTINATION``  comma-separated node names: remote-control broadcasts sent
  without a destination (Flower's inspect, enable_events, revoke, ...) go to these nodes only
* ``INTEROP_CONTROL_STRICT``  ``1``: refuse remote-control broadcasts without a destination
* ``INTEROP_BROKER_TRANSPORT_OPTIONS``  JSON object: ``broker_transport_options`` (e.g. a short
  Redis ``visibility_timeout`` for the reliability tests)
* ``INTEROP_DEFAULT_QUEUE_TYPE``  ``task_default_queue_type``: ``classic`` (default) or ``quorum``
* ``INTEROP_DEFAULT_EXCHANGE_TYPE``  ``task_default_exchange_type``: ``direct`` (default) or ``topic``
* ``INTEROP_TASK_EVENTS``  ``1``: the worker sends task events from the start (as ``-E``) and the
  app sends ``task-sent``, for the monitor's tests
* ``INTEROP_OTLP_ENDPOINT``  an OTLP/HTTP base URL: the process is traced with
  ``opentelemetry-instrumentation-celery`` and sends its spans there (the trace tests)
* ``INTEROP_TWIN_TASKS``  ``1``: also register Python twins of Rust task names (``tasks.sleep``,
  ``tasks.add``, ``tasks.mul``, ``tasks.xsum``, ``tasks.echo``, ``tasks.fail``, ``tasks.scaled_sum``), so this worker
  can finish what a Rust worker left, or run a canvas all in Python to compare; only workers on
  queues of their own set it

The brokers are shared with other test runs and developers, so no broadcast of the suite may
reach a worker it did not start: see :class:`GuardedControl`.

The test fixtures build their own client apps with :func:`create_app`, one per broker setup,
so that no app object is ever re-pointed at another broker after it connected.
"""

from __future__ import annotations

import json
import os
import time

from celery import Celery
from celery.app.control import Control

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_RESULT_BACKEND = "redis://127.0.0.1:6379/0"


def mul(x, y):
    """Called from Rust as ``py.mul``."""
    return x * y


def concat(a, b):
    """Called from Rust as ``py.concat``."""
    return a + b


class GuardedControl(Control):
    """``app.control`` that never broadcasts to every worker on the (shared) broker.

    A broadcast without a destination (``None`` or an empty list, which kombu also sends to
    everyone) goes to ``scope`` when the app has one, and is refused when the app is ``strict``.
    Every ``app.control`` call funnels through :meth:`broadcast`, ``inspect()`` included.
    """

    scope: tuple[str, ...] = ()
    strict: bool = False

    def broadcast(self, command, arguments=None, destination=None, *args, **kwargs):
        if not destination:
            if self.scope:
                destination = list(self.scope)
            elif self.strict:
                raise RuntimeError(
                    f"refusing to broadcast {command!r} to every worker on a shared broker: "
                    f"pass destination=[<node names this test started>]"
                )
        return super().broadcast(command, arguments, destination, *args, **kwargs)


def _node_list(text: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in (text or "").split(",") if name.strip())


def add(x, y):
    """``tasks.add``'s Python twin."""
    return x + y


def echo(value):
    """``tasks.echo``'s Python twin."""
    return value


def fail(message):
    """``tasks.fail``'s Python twin: raises ``RuntimeError(message)``, as the Rust task does."""
    raise RuntimeError(message)


class QuotaExceeded(Exception):
    """An application's own exception class, which ``tasks.raise_exception`` raises by name."""


def scaled_sum(self, numbers, factor):
    """``tasks.scaled_sum``'s Python twin: replaced by ``tasks.xsum(numbers) | tasks.mul(factor)``."""
    steps = self.app.signature("tasks.xsum", args=(numbers,)) | self.app.signature("tasks.mul", args=(factor,))
    return self.replace(steps)


def xsum(numbers):
    """``py.xsum`` (and ``tasks.xsum``'s twin): a chord body that sums the header's results."""
    return sum(numbers)


def sleep(seconds):
    """``py.sleep``: a Python task that stays active for a while (monitoring tests)."""
    time.sleep(seconds)
    return seconds


def create_app(
    broker_url: str,
    result_backend: str,
    default_queue: str = "celery",
    main: str = "interop",
    control_scope: tuple[str, ...] | list[str] = (),
    strict_control: bool = False,
    transport_options: dict | None = None,
    twin_tasks: bool = False,
    default_queue_type: str = "classic",
    default_exchange_type: str = "direct",
    task_events: bool = False,
) -> Celery:
    """A Celery app with JSON only, extended results, and the ``py.*`` tasks registered.

    ``control_scope`` / ``strict_control`` configure its :class:`GuardedControl`;
    ``transport_options`` become ``broker_transport_options``; ``twin_tasks`` also registers
    :func:`sleep` as ``tasks.sleep`` (the Rust task's name and contract: returns its argument);
    ``task_events`` sends task events (a worker's, as ``-E``, and ``task-sent``).
    """
    control = type("ScopedControl", (GuardedControl,), {"scope": tuple(control_scope), "strict": strict_control})
    celery_app = Celery(main, broker=broker_url, backend=result_backend, set_as_current=False, control=control)
    celery_app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_extended=True,
        task_default_queue=default_queue,
        task_default_queue_type=default_queue_type,
        task_default_exchange_type=default_exchange_type,
        # Queues named by a send (`queue="..."`) are declared the same way.
        task_create_missing_queue_type=default_queue_type,
        task_create_missing_queue_exchange_type=default_exchange_type,
        task_track_started=True,
        broker_connection_retry_on_startup=True,
        enable_utc=True,
        timezone="UTC",
    )
    celery_app.task(name="py.mul")(mul)
    celery_app.task(name="py.concat")(concat)
    celery_app.task(name="py.sleep")(sleep)
    celery_app.task(name="py.xsum")(xsum)
    if task_events:
        celery_app.conf.update(worker_send_task_events=True, task_send_sent_event=True)
    if transport_options:
        celery_app.conf.broker_transport_options = dict(transport_options)
    if twin_tasks:
        celery_app.task(name="tasks.sleep")(sleep)
        celery_app.task(name="tasks.add")(add)
        celery_app.task(name="tasks.mul")(mul)
        celery_app.task(name="tasks.xsum")(xsum)
        celery_app.task(name="tasks.echo")(echo)
        celery_app.task(name="tasks.fail")(fail)
        celery_app.task(name="tasks.scaled_sum", bind=True)(scaled_sum)
    return celery_app


def trace_to(endpoint: str, celery_app: Celery, service: str) -> None:
    """Traces this process as a Python service would: ``opentelemetry-instrumentation-celery``
    with its spans sent to ``endpoint`` over OTLP/HTTP, one at a time so a test sees each soon.
    ``celery_app`` is made the current app: the instrumentation looks the task a message names up
    there, and a producer span of a task it does not find is never ended."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")))
    celery_app.set_current()
    CeleryInstrumentor().instrument(tracer_provider=provider)


app = create_app(
    os.environ.get("INTEROP_BROKER_URL", DEFAULT_BROKER_URL),
    os.environ.get("INTEROP_RESULT_BACKEND", DEFAULT_RESULT_BACKEND),
    os.environ.get("INTEROP_DEFAULT_QUEUE", "celery"),
    control_scope=_node_list(os.environ.get("INTEROP_CONTROL_DESTINATION")),
    strict_control=os.environ.get("INTEROP_CONTROL_STRICT") == "1",
    transport_options=json.loads(os.environ.get("INTEROP_BROKER_TRANSPORT_OPTIONS") or "{}"),
    twin_tasks=os.environ.get("INTEROP_TWIN_TASKS") == "1",
    default_queue_type=os.environ.get("INTEROP_DEFAULT_QUEUE_TYPE", "classic"),
    default_exchange_type=os.environ.get("INTEROP_DEFAULT_EXCHANGE_TYPE", "direct"),
    task_events=os.environ.get("INTEROP_TASK_EVENTS") == "1",
)
if os.environ.get("INTEROP_OTLP_ENDPOINT"):
    trace_to(os.environ["INTEROP_OTLP_ENDPOINT"], app, "interop-python-worker")
