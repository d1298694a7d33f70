"""The Python side of the interop suite: a stock Celery app plus two Python tasks.

The module-level ``app`` is configured from the environment so that a Python worker
(``python -m celery -A interop_app worker ...``, run with cwd ``interop/``) talks to the same
broker and result backend as the Rust processes under test:

* ``INTEROP_BROKER_URL``      broker URL (default: local RabbitMQ)
* ``INTEROP_RESULT_BACKEND``  result backend URL (default: local Redis db 0)
* ``INTEROP_DEFAULT_QUEUE``   ``task_default_queue`` (default: ``celery``)

The test fixtures build their own client apps with :func:`create_app`, one per broker setup,
so that no app object is ever re-pointed at another broker after it connected.
"""

from __future__ import annotations

import os

from celery import Celery

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_RESULT_BACKEND = "redis://127.0.0.1:6379/0"


def mul(x, y):
    """Called from Rust as ``py.mul``."""
    return x * y


def concat(a, b):
    """Called from Rust as ``py.concat``."""
    return a + b


def create_app(broker_url: str, result_backend: str, default_queue: str = "celery", main: str = "interop") -> Celery:
    """A Celery app with JSON only, extended results, and the ``py.*`` tasks registered."""
    celery_app = Celery(main, broker=broker_url, backend=result_backend, set_as_current=False)
    celery_app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_extended=True,
        task_default_queue=default_queue,
        task_track_started=True,
        broker_connection_retry_on_startup=True,
        enable_utc=True,
        timezone="UTC",
    )
    celery_app.task(name="py.mul")(mul)
    celery_app.task(name="py.concat")(concat)
    return celery_app


app = create_app(
    os.environ.get("INTEROP_BROKER_URL", DEFAULT_BROKER_URL),
    os.environ.get("INTEROP_RESULT_BACKEND", DEFAULT_RESULT_BACKEND),
    os.environ.get("INTEROP_DEFAULT_QUEUE", "celery"),
)
