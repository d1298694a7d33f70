"""Hostile numbers from anyone who can publish to the broker or send a control command: the
worker settles what it cannot honour and goes on answering ``ping`` and running tasks.

* A message time limit too large for any clock (``1e20`` s) is no limit, not a panic.
* A rate limit too slow for any clock (``1e-30/s``) holds that task's later runs for ever,
  without poisoning the lock every later message takes.
* ``pool_grow`` with a huge ``n`` grows the pool to its bound instead of overflowing it.
* A control request whose reply routing key is longer than AMQP can carry is not answered,
  instead of a malformed frame taking the worker's connection down.
* Messages with a 10-year countdown, more than the prefetch window holds, do not stop the queue:
  each is held outside the window (Celery raises its QoS by one per ETA task), and a revoke lets
  a held one go at once, as REVOKED.
* A task message whose headers nest tables as deep as one AMQP frame carries (about 21,000
  levels) does not overflow a stack: it is refused, FAILURE under its id, and the worker goes on.
"""

from __future__ import annotations

import sys
import threading
import uuid

import pytest
from kombu import Connection, Exchange, Producer

from interop_helpers import control_node, inspect_node, wait_state

pytestmark = pytest.mark.timeout(90)

GET_TIMEOUT = 20


def assert_still_serving(broker, worker, n: int) -> None:
    assert inspect_node(broker.app, worker.hostname, "ping") == {"ok": "pong"}
    assert broker.app.send_task("tasks.add", (n, n), queue=worker.queue).get(timeout=GET_TIMEOUT) == 2 * n
    assert worker.process.alive()


def test_numbers_too_large_for_a_clock_do_not_stop_the_worker(broker, spawn_rust_worker):
    worker = spawn_rust_worker([broker.new_queue("hostile-numbers")], tag="numbers", concurrency=2)
    app, node, queue = broker.app, worker.hostname, worker.queue

    endless = app.send_task("tasks.add", (1, 2), queue=queue, time_limit=1e20, soft_time_limit=1e20)
    assert endless.get(timeout=GET_TIMEOUT) == 3
    assert_still_serving(broker, worker, 1)

    reply = control_node(app, node, "rate_limit", task_name="tasks.mul", rate_limit="1e-30/s")
    assert "new rate limit" in reply.get("ok", ""), reply
    assert app.send_task("tasks.mul", (2, 3), queue=queue).get(timeout=GET_TIMEOUT) == 6
    app.send_task("tasks.mul", (4, 5), queue=queue)  # waits for ever, for its token
    assert_still_serving(broker, worker, 2)

    control_node(app, node, "pool_grow", n=2**62)
    stats = inspect_node(app, node, "stats")
    assert stats["pool"]["max-concurrency"] <= 10_000, stats["pool"]
    assert_still_serving(broker, worker, 3)


def test_a_reply_key_too_long_for_amqp_does_not_drop_the_connection(broker, spawn_rust_worker):
    worker = spawn_rust_worker([broker.new_queue("hostile-reply")], tag="reply", concurrency=1)
    request = {
        "method": "ping", "arguments": {}, "destination": [worker.hostname], "pattern": None, "matcher": None,
        "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "r" * 300}, "ticket": str(uuid.uuid4()),
    }
    with Connection(broker.broker_url, connect_timeout=5) as conn:
        Producer(conn.default_channel).publish(
            request, exchange=Exchange("celery.pidbox", "fanout", durable=False), routing_key="", serializer="json")
    assert_still_serving(broker, worker, 4)
    assert "connection lost" not in worker.process.log_text()


def test_far_etas_do_not_stop_the_queue_and_a_revoke_frees_one(broker, spawn_rust_worker):
    # A window of one message: without holding ETA messages outside it, the first one stops all.
    worker = spawn_rust_worker([broker.new_queue("hostile-eta")], tag="eta", concurrency=1,
                               extra_env={"CELERY_WORKER_PREFETCH_MULTIPLIER": "1"})
    app, queue = broker.app, worker.queue
    ten_years = 10 * 365 * 24 * 3600
    held = [app.send_task("tasks.add", (i, i), queue=queue, countdown=ten_years) for i in range(4)]
    assert app.send_task("tasks.add", (5, 5), queue=queue).get(timeout=GET_TIMEOUT) == 10
    assert all(result.state == "PENDING" for result in held)

    control_node(app, worker.hostname, "revoke", task_id=held[0].id)
    assert wait_state(held[0], "REVOKED", timeout=GET_TIMEOUT) == "REVOKED"
    assert held[1].state == "PENDING"
    assert_still_serving(broker, worker, 6)


def publish_deep_headers(broker_url: str, queue: str, task_id: str, depth: int) -> None:
    """py-amqp encodes nested tables recursively: in a thread with room for ``depth`` levels."""
    nested: dict = {"end": True}
    for _ in range(depth):
        nested = {"": nested}
    headers = {"id": task_id, "task": "tasks.add", "lang": "py", "deep": nested}

    def publish() -> None:
        with Connection(broker_url, connect_timeout=5) as conn:
            Producer(conn.default_channel).publish(
                [[1, 2], {}, {}], routing_key=queue, serializer="json", headers=headers, retry=False)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20 * depth))
    threading.stack_size(512 * 1024 * 1024)
    try:
        publisher = threading.Thread(target=publish)
        publisher.start()
        publisher.join(timeout=60)
    finally:
        threading.stack_size(0)
        sys.setrecursionlimit(limit)
    assert not publisher.is_alive()


def test_headers_nested_as_deep_as_a_frame_holds_are_refused(broker, spawn_rust_worker):
    if not broker.broker_url.startswith("amqp"):
        pytest.skip("AMQP field tables")
    worker = spawn_rust_worker([broker.new_queue("hostile-deep")], tag="deep", concurrency=1)
    task_id = str(uuid.uuid4())
    # 6 bytes a level (empty name, type, length): about all of a 128 KiB frame.
    publish_deep_headers(broker.broker_url, worker.queue, task_id, 21_000)
    result = broker.app.AsyncResult(task_id)
    assert wait_state(result, "FAILURE", timeout=GET_TIMEOUT) == "FAILURE"
    assert "nested deeper than" in str(result.result)
    assert_still_serving(broker, worker, 7)
    assert "overflowed its stack" not in worker.process.log_text()
