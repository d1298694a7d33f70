"""RabbitMQ's topology as production Celery declares it: quorum queues, queues someone else
declared with arguments our worker does not choose, native delayed delivery, and the private
queues RabbitMQ 4 accepts.

* A worker started on five queues that Python declared first, each with other arguments
  (quorum, x-max-priority, a TTL with dead-lettering, a bounded quorum queue, a topic exchange),
  consumes all five on one connection, runs a task from each, and reports each queue's real
  arguments in ``inspect active_queues``.
* ``task_default_queue_type = "quorum"``: our worker declares its default queue as a quorum
  queue, and a Python worker and ours share it.
* Native delayed delivery (quorum queues behind topic exchanges): countdowns sent by Python
  wait in the broker's ``celery_delayed_*`` queues, not in our worker; ours (the ``call``
  client, retries) are sent the same way and a Python worker runs them; the Python worker and
  ours declare the same delay topology.
* The worker's pidbox queue is exclusive, as Celery 5.7 declares it (``control_queue_exclusive``):
  RabbitMQ 4 refuses transient queues that are not.
"""

from __future__ import annotations

import time

import pytest
from amqp.exceptions import ResourceLocked
from kombu import Connection, Exchange, Queue

from interop_app import create_app
from interop_helpers import inspect_node, run_call, wait_for

pytestmark = pytest.mark.timeout(120)

GET_TIMEOUT = 30


def kombu_queue(name: str, arguments: dict, exchange_type: str = "direct") -> Queue:
    return Queue(name, Exchange(name, exchange_type, durable=True), routing_key=name, durable=True,
                 queue_arguments=arguments or None)


@pytest.fixture
def rabbitmq(broker):
    if not broker.broker_url.startswith("amqp"):
        pytest.skip("queue arguments and quorum queues are RabbitMQ's")
    return broker


def test_queues_declared_by_others_are_all_consumed_as_declared(rabbitmq, spawn_rust_worker):
    shapes = {
        "quorum": ({"x-queue-type": "quorum"}, "direct"),
        "priority": ({"x-max-priority": 10}, "direct"),
        "ttl-dlx": ({"x-message-ttl": 600000, "x-dead-letter-exchange": f"{rabbitmq.queue}-dlx"}, "direct"),
        "bounded-quorum": ({"x-queue-type": "quorum", "x-max-length": 1000, "x-delivery-limit": 5}, "direct"),
        "topic": ({"x-max-length-bytes": 10_000_000, "x-overflow": "reject-publish"}, "topic"),
    }
    queues = {suffix: kombu_queue(rabbitmq.new_queue(suffix), arguments, exchange_type)
              for suffix, (arguments, exchange_type) in shapes.items()}
    with Connection(rabbitmq.broker_url, connect_timeout=5) as conn:
        for queue in queues.values():
            queue.bind(conn.default_channel).declare()

    worker = spawn_rust_worker([q.name for q in queues.values()], tag="declared", concurrency=4)

    # Sent through the kombu queues themselves: Python's own declare must match too.
    results = {suffix: rabbitmq.app.send_task("tasks.add", (index, 100), queue=queue)
               for index, (suffix, queue) in enumerate(queues.items())}
    for index, (suffix, result) in enumerate(results.items()):
        assert result.get(timeout=GET_TIMEOUT) == index + 100, suffix

    reported = {q["name"]: q for q in inspect_node(rabbitmq.app, worker.hostname, "active_queues")}
    assert set(reported) == {q.name for q in queues.values()}, reported
    for suffix, queue in queues.items():
        arguments, exchange_type = shapes[suffix]
        entry = reported[queue.name]
        assert entry["queue_arguments"] == arguments, (suffix, entry)
        assert entry["exchange"]["type"] == exchange_type, (suffix, entry)
        assert entry["durable"] is True, (suffix, entry)
    assert reported[queues["priority"].name]["max_priority"] == 10
    assert reported[queues["ttl-dlx"].name]["message_ttl"] == 600.0
    assert worker.process.alive(), "the worker stopped"


def test_default_queue_type_quorum_is_shared_with_a_python_worker(rabbitmq, spawn_rust_worker, spawn_py_worker):
    queue_name = rabbitmq.new_queue("quorum-default")
    worker = spawn_rust_worker([queue_name], tag="quorum", concurrency=2,
                               extra_env={"CELERY_TASK_DEFAULT_QUEUE_TYPE": "quorum"})
    # Declaring it again as a quorum queue is accepted only if ours declared it so.
    quorum = kombu_queue(queue_name, {"x-queue-type": "quorum"})
    with Connection(rabbitmq.broker_url, connect_timeout=5) as conn:
        quorum.bind(conn.default_channel).declare()
    (entry,) = inspect_node(rabbitmq.app, worker.hostname, "active_queues")
    assert entry["queue_arguments"] == {"x-queue-type": "quorum"}, entry

    python = spawn_py_worker([queue_name], tag="quorum",
                             extra_env={"INTEROP_DEFAULT_QUEUE_TYPE": "quorum", "INTEROP_TWIN_TASKS": "1"})
    results = [rabbitmq.app.send_task("tasks.add", (n, n), queue=quorum) for n in range(40)]
    assert [r.get(timeout=GET_TIMEOUT) for r in results] == [2 * n for n in range(40)]
    workers = {meta["worker"] for meta in rabbitmq.result_metas([r.id for r in results])}
    assert {worker.hostname, python.hostname} <= workers, workers


# Celery's set-up for native delayed delivery: quorum queues behind topic exchanges.
RUST_DELAYED = {"CELERY_TASK_DEFAULT_QUEUE_TYPE": "quorum", "CELERY_TASK_DEFAULT_EXCHANGE_TYPE": "topic"}
PY_DELAYED = {"INTEROP_DEFAULT_QUEUE_TYPE": "quorum", "INTEROP_DEFAULT_EXCHANGE_TYPE": "topic", "INTEROP_TWIN_TASKS": "1"}
OUR_DELAY_WARNING = "cannot declare native delayed delivery's queues"
PY_DELAY_WARNINGS = ("Failed to setup delayed delivery", "Failed to declare exchanges and queues", "Failed to bind")


@pytest.fixture
def delayed_app(rabbitmq):
    """A Python client whose default queue is a quorum queue behind a topic exchange."""
    queue = rabbitmq.new_queue("delayed")
    app = create_app(rabbitmq.broker_url, rabbitmq.result_backend, default_queue=queue, main="interop-delayed",
                     strict_control=True, default_queue_type="quorum", default_exchange_type="topic")
    try:
        yield app, queue
    finally:
        app.close()


def waiting_in(level: int, broker_url: str) -> int:
    """Messages waiting in delay queue ``celery_delayed_<level>``."""
    with Connection(broker_url, connect_timeout=5) as conn:
        _, ready, _ = conn.default_channel.queue_declare(queue=f"celery_delayed_{level}", passive=True)
    return ready


def test_python_countdowns_wait_in_the_broker_not_in_our_worker(rabbitmq, delayed_app, spawn_rust_worker):
    app, queue = delayed_app
    worker = spawn_rust_worker([queue], tag="delayed", concurrency=2, extra_env=RUST_DELAYED)
    sent = time.monotonic()
    # 4 s is 100 in binary: the message waits first in level 2 (4 s).
    result = app.send_task("tasks.add", (20, 22), countdown=4)
    wait_for(lambda: waiting_in(2, rabbitmq.broker_url) >= 1, 3, describe="the message in celery_delayed_2")
    assert inspect_node(rabbitmq.app, worker.hostname, "scheduled") == [], "the worker holds the ETA message"
    assert result.get(timeout=GET_TIMEOUT) == 42
    assert time.monotonic() - sent >= 3.5
    assert OUR_DELAY_WARNING not in worker.process.log_text()


def test_our_countdowns_and_retries_reach_a_python_worker_through_the_delay_queues(
        rabbitmq, delayed_app, spawn_rust_worker, spawn_py_worker):
    app, queue = delayed_app
    python = spawn_py_worker([queue], tag="delayed", extra_env=PY_DELAYED)
    env = rabbitmq.rust_env(default_queue=queue, **RUST_DELAYED)
    sent = time.monotonic()
    call = run_call(env, "tasks.add", args=(1, 2), extra=["--countdown", "4"])
    assert call.returncode == 0, call
    wait_for(lambda: waiting_in(2, rabbitmq.broker_url) >= 1, 3, describe="the message in celery_delayed_2")
    result = rabbitmq.app.AsyncResult(call.task_id)
    assert result.get(timeout=GET_TIMEOUT) == 3
    assert time.monotonic() - sent >= 3.5

    # Retries of our worker go through the delay queues too (the Python worker, which has no
    # tasks.flaky, steps aside), and the Python worker and ours declare the same topology.
    python.process.stop()
    python_log = python.process.log_text()
    assert not [w for w in PY_DELAY_WARNINGS if w in python_log], python_log[-2000:]
    worker = spawn_rust_worker([queue], tag="retries", concurrency=2, extra_env=RUST_DELAYED)
    flaky = app.send_task("tasks.flaky", (2,))
    assert flaky.get(timeout=GET_TIMEOUT) == 2
    assert OUR_DELAY_WARNING not in worker.process.log_text()


def test_the_pidbox_queue_is_exclusive_as_rabbitmq_4_requires(rabbitmq, rust):
    # Another connection may not even look at an exclusive queue.
    with Connection(rabbitmq.broker_url, connect_timeout=5) as conn:
        with pytest.raises(ResourceLocked):
            conn.default_channel.queue_declare(queue=f"{rust.hostname}.celery.pidbox", passive=True)
