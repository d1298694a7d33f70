"""RabbitMQ queues as production Celery declares them: quorum queues, and queues someone else
declared with arguments our worker does not choose.

* A worker started on five queues that Python declared first, each with other arguments
  (quorum, x-max-priority, a TTL with dead-lettering, a bounded quorum queue, a topic exchange),
  consumes all five on one connection, runs a task from each, and reports each queue's real
  arguments in ``inspect active_queues``.
* ``task_default_queue_type = "quorum"``: our worker declares its default queue as a quorum
  queue, and a Python worker and ours share it.
"""

from __future__ import annotations

import pytest
from kombu import Connection, Exchange, Queue

from interop_helpers import inspect_node

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
