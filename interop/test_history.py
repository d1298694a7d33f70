"""The task history (issue #20): a web app with ``monitor = true`` records every task of the
cluster from its events, whoever sent or ran it, on both brokers.

* Tasks a Python client sends (not through ``/receive``) to a Python worker and to our Rust worker
  all appear in ``GET /history`` with their state and worker, and ``GET /workers`` lists both.
* Nothing is lost while the monitor is down: ``HISTORY_TASKS`` tasks (``INTEROP_HISTORY_TASKS``)
  run while it is stopped, and all are in the history once it is back. On RabbitMQ the events
  wait in the monitor's queue (``x-expires``); on Redis, where events are PUB/SUB, the tasks'
  ``task-sent`` is seen before the stop and their ends are read from the result backend after.
* Two web replicas run the monitor on one database (on RabbitMQ as two consumers of the one
  event queue): every task is one row, ended.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

import pytest
from celery import Celery

from conftest import BrokerSetup
from interop_app import create_app
from interop_helpers import wait_for
from web_process import WebApp, own_database, running_web, start_web, stop_web

HISTORY_TASKS = int(os.environ.get("INTEROP_HISTORY_TASKS", "500"))
FINAL = {"SUCCESS", "FAILURE", "REVOKED"}
TIMEOUT = 60.0


def events_client(broker: BrokerSetup) -> Celery:
    """A Python client of ``broker`` that sends ``task-sent`` events."""
    return create_app(broker.broker_url, broker.result_backend, default_queue=broker.queue,
                      main=f"interop-history-{broker.name}", strict_control=True, task_events=True)


def monitor_env(queue: str) -> dict[str, str]:
    return {"CELERY_MONITOR": "true", "CELERY_MONITOR_QUEUE": queue}


def history(web: WebApp, **filters: str) -> list[dict]:
    """Every task of ``GET /history`` with ``filters``, following the pages."""
    query = "&".join(f"{key}={value}" for key, value in filters.items())
    tasks: list[dict] = []
    cursor = None
    while True:
        reply = web.get(f"/history?limit=500&{query}" + (f"&cursor={cursor}" if cursor else ""))
        assert reply.status == 200, reply
        page = reply.json()
        tasks += page["tasks"]
        cursor = page["next_cursor"]
        if cursor is None:
            return tasks


def workers(web: WebApp) -> dict[str, dict]:
    reply = web.get("/workers")
    assert reply.status == 200, reply
    return {worker["hostname"]: worker for worker in reply.json()["workers"]}


def wait_listening(web: WebApp, client: Celery, probe_queue: str) -> None:
    """Until the monitor records events: a probe task is sent (to a queue nobody consumes) until
    its ``task-sent`` is in the history (the ones sent before it subscribed go nowhere)."""
    probes: list[str] = []

    def heard():
        probes.append(client.send_task("tasks.add", args=(0, 0), queue=probe_queue).id)
        seen = {task["task_id"] for task in history(web, name="tasks.add", state="PENDING")}
        return bool(seen & set(probes))

    wait_for(heard, TIMEOUT, interval=0.2, describe=lambda: f"the monitor to hear a task-sent; log {web.process.log_path}")


def wait_recorded(web: WebApp, worker: str, expected: dict[str, str], describe: str) -> dict[str, dict]:
    """Until each task of ``expected`` (id -> state) is in the history of ``worker`` in its state
    with its worker known; returns the rows by id."""
    rows: dict[str, dict] = {}

    def recorded():
        rows.clear()
        rows.update({task["task_id"]: task for task in history(web, worker=worker)})
        return all(rows.get(task_id, {}).get("state") == state for task_id, state in expected.items())

    def missing() -> str:
        wrong = {task_id: rows.get(task_id, {}).get("state") for task_id, state in expected.items()
                 if rows.get(task_id, {}).get("state") != state}
        return f"{describe}: {len(wrong)} of {len(expected)} not as expected, e.g. {list(wrong.items())[:5]}; log {web.process.log_path}"

    wait_for(recorded, TIMEOUT, interval=0.25, describe=missing)
    return {task_id: rows[task_id] for task_id in expected}


@contextmanager
def history_database(broker: BrokerSetup, tag: str) -> Iterator[str]:
    with own_database(f"rcelery_history_{broker.session_id}_{broker.name}_{tag}") as database:
        yield database


@pytest.mark.timeout(120)
def test_python_and_rust_tasks_and_both_workers_are_in_the_history(broker, spawn_rust_worker, spawn_py_worker):
    client = events_client(broker)
    rust_queue, py_queue = broker.new_queue("history-rust"), broker.new_queue("history-py")
    monitor_queue, probe_queue = broker.new_queue("history-monitor"), broker.new_queue("history-probe")
    with history_database(broker, "both") as database, \
            running_web(broker, database, tag="history", extra_env=monitor_env(monitor_queue)) as web:
        rust = spawn_rust_worker([rust_queue], tag="history", task_events=True,
                                 extra_env={"CELERY_WORKER_HEARTBEAT_INTERVAL": "1"})
        py = spawn_py_worker([py_queue], tag="history", extra_env={"INTEROP_TASK_EVENTS": "1"})
        wait_listening(web, client, probe_queue)
        on_rust = {client.send_task("tasks.add", args=(x, 1), queue=rust_queue).id: "SUCCESS" for x in range(3)}
        on_rust[client.send_task("tasks.fail", args=("boom",), queue=rust_queue).id] = "FAILURE"
        on_py = {client.send_task("py.mul", args=(x, 2), queue=py_queue).id: "SUCCESS" for x in range(3)}
        on_py[client.send_task("py.concat", args=(1, "a"), queue=py_queue).id] = "FAILURE"
        for task_id in [*on_rust, *on_py]:
            client.AsyncResult(task_id).get(timeout=TIMEOUT, propagate=False)

        rust_rows = wait_recorded(web, rust.hostname, on_rust, "the Rust worker's tasks")
        py_rows = wait_recorded(web, py.hostname, on_py, "the Python worker's tasks")
        for rows in (rust_rows, py_rows):
            for row in rows.values():
                assert all(row[time] for time in ("sent_at", "received_at", "started_at", "finished_at")), row
                # (task-sent is dated after the publish, so a fast worker may receive it first)
                assert row["received_at"] <= row["started_at"] <= row["finished_at"], row
        adds = sorted(row["args"] for row in rust_rows.values() if row["name"] == "tasks.add")
        assert adds == ["(0, 1)", "(1, 1)", "(2, 1)"], rust_rows
        failed = next(row for row in rust_rows.values() if row["state"] == "FAILURE")
        assert failed["name"] == "tasks.fail" and "boom" in failed["exception"], failed
        assert all(row["result"] is not None and row["runtime"] is not None
                   for row in rust_rows.values() if row["state"] == "SUCCESS"), rust_rows
        muls = sorted(row["result"] for row in py_rows.values() if row["name"] == "py.mul")
        assert muls == ["0", "2", "4"], py_rows
        assert "TypeError" in next(row for row in py_rows.values() if row["state"] == "FAILURE")["exception"]

        def both_online_with_their_counts():
            listed = workers(web)
            return all(
                name in listed and listed[name]["online"] and listed[name]["processed"] >= 4
                for name in (rust.hostname, py.hostname)
            ) and listed

        listed = wait_for(both_online_with_their_counts, TIMEOUT, interval=0.5,
                          describe=lambda: f"both workers online with 4 processed: {workers(web)}")
        assert listed[rust.hostname]["software"].startswith("rcelery"), listed[rust.hostname]
        assert listed[py.hostname]["software"].startswith("py-celery"), listed[py.hostname]


@pytest.mark.timeout(180)
def test_no_task_is_lost_while_the_monitor_is_down(broker, spawn_rust_worker):
    """The issue's test: ``HISTORY_TASKS`` tasks run while the monitor is stopped, and every one is
    in the history, ended, once it is back."""
    client = events_client(broker)
    queue = broker.new_queue("history-down")
    monitor_queue, probe_queue = broker.new_queue("history-monitor-down"), broker.new_queue("history-probe-down")
    amqp = not broker.broker_url.startswith("redis")
    env = monitor_env(monitor_queue)
    with history_database(broker, "down") as database:
        web = start_web(broker, database, tag="history-1", extra_env=env)
        try:
            wait_listening(web, client, probe_queue)
            sent: list[str] = []
            if not amqp:
                # Redis: events while nobody listens are lost; the sends are seen before the stop.
                sent = [client.send_task("tasks.add", args=(x, 1), queue=queue).id for x in range(HISTORY_TASKS)]
                wait_for(lambda: {t["task_id"] for t in history(web, name="tasks.add", state="PENDING")} >= set(sent),
                         TIMEOUT, interval=0.25, describe="every task-sent recorded before the stop")
        finally:
            stop_web(web)
        started = time.monotonic()
        if amqp:
            # RabbitMQ: nothing of these tasks is seen before the stop; their events wait.
            sent = [client.send_task("tasks.add", args=(x, 1), queue=queue).id for x in range(HISTORY_TASKS)]
        worker = spawn_rust_worker([queue], tag="down", concurrency=8, task_events=True)
        for task_id in sent:
            client.AsyncResult(task_id).get(timeout=TIMEOUT)
        web = start_web(broker, database, tag="history-2", extra_env=env)
        try:
            rows = wait_recorded(web, worker.hostname, dict.fromkeys(sent, "SUCCESS"),
                                 f"the {HISTORY_TASKS} tasks run while the monitor was down")
        finally:
            stop_web(web)
        print(f"{HISTORY_TASKS} tasks down and back in {time.monotonic() - started:.1f} s on {broker.name}")
        assert sorted(int(row["result"]) for row in rows.values()) == list(range(1, HISTORY_TASKS + 1))
        assert all(row["sent_at"] and row["finished_at"] for row in rows.values())
        if amqp:
            # Every event waited in the queue, so the row is whole.
            assert all(row["received_at"] and row["started_at"] for row in rows.values())


@pytest.mark.timeout(120)
def test_two_monitors_share_the_work_and_record_each_task_once(broker, spawn_rust_worker):
    """Two web replicas run the monitor on one database: on RabbitMQ they are two consumers of the
    one event queue; on Redis each hears every event. Either way every task is one row, ended."""
    client = events_client(broker)
    queue = broker.new_queue("history-replicas")
    monitor_queue, probe_queue = broker.new_queue("history-monitor-replicas"), broker.new_queue("history-probe-replicas")
    env = monitor_env(monitor_queue)
    with history_database(broker, "replicas") as database, \
            running_web(broker, database, tag="history-a", extra_env=env) as first, \
            running_web(broker, database, tag="history-b", extra_env=env) as second:
        worker = spawn_rust_worker([queue], tag="replicas", concurrency=8, task_events=True)
        wait_listening(second, client, probe_queue)
        if not broker.broker_url.startswith("redis"):
            wait_for(lambda: broker.backlog(monitor_queue).consumers == 2, TIMEOUT, interval=0.1,
                     describe="both monitors consuming the one event queue")
        sent = [client.send_task("tasks.add", args=(x, 1), queue=queue).id for x in range(100)]
        for task_id in sent:
            client.AsyncResult(task_id).get(timeout=TIMEOUT)
        rows = wait_recorded(first, worker.hostname, dict.fromkeys(sent, "SUCCESS"), "100 tasks under two monitors")
        assert all(row["sent_at"] and row["received_at"] and row["started_at"] for row in rows.values())
        assert len(history(second, worker=worker.hostname)) == len(sent)
