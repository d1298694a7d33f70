"""The Python baseline: stock Celery running the same task as the Rust worker (``tasks.add``).

Configured from the environment so ``celery -A py_app worker`` (cwd ``bench/``) and the bench
harness talk to the same broker: ``BENCH_BROKER_URL``, ``BENCH_RESULT_BACKEND`` (empty: none).
Late acks and a prefetch multiplier of 4, as the Rust worker runs in the benchmark.
"""

import os

from celery import Celery

app = Celery(
    "bench",
    broker=os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("BENCH_RESULT_BACKEND") or None,
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="tasks.add")
def add(x, y):
    return x + y
