"""Monitoring and remote control: the celery CLI, ``app.control`` and Flower against Rust workers.

Every test runs once per broker setup (``[rabbitmq]`` / ``[redis]``).

The brokers are shared with other runs and developers, so every remote-control broadcast names its
destination: the node names of workers this session started (``rust-<id8>-...@<host>``,
``py-<id8>@<host>``). The helpers (``inspect_node``, ``control_node``, ``celery_json``) always
pass one; the fixtures' client apps refuse a broadcast without one (``GuardedControl``), and so
does the ``celery`` CLI as run here (``INTEROP_CONTROL_STRICT=1``). Flower is run with
``-A interop_app`` and ``INTEROP_CONTROL_DESTINATION`` = its two workers, so its own broadcasts
(the periodic ``enable_events``, ``inspect`` on refresh, ``revoke`` from ``/api/task/revoke``) go
to those two nodes only.

Workers used:

* ``rust`` (shared, ``-c 8``): read-only inspection, and revoke of tasks it runs;
* ``spawn_rust_worker``: a worker of the test's own wherever a test changes a worker
  (consumers, pool size, event switch, shutdown) or needs a known secret in its settings;
* ``py_worker`` (stock Celery, threads pool): the reference for the shape of the replies;
* Flower's cluster (module fixture ``flower``): ``rust_events`` (a Rust worker started with
  ``-E``, queue ``<queue>-events``) plus ``py_worker`` (queue ``broker.py_queue``) - one Flower
  watching a mixed cluster whose workers consume different queues, so each task's worker is known.
  Tasks for Flower go to the Rust worker's queue.
"""

from __future__ import annotations

import json
import re
import signal
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote, urlsplit

import pytest
from celery.exceptions import TaskRevokedError
from kombu import Connection

from interop_helpers import (
    ALL_BROKER_SETUPS,
    ARTIFACTS_DIR,
    EventCapture,
    ManagedProcess,
    Reply,
    celery_json,
    chromium_binary,
    chromium_dom,
    chromium_screenshot,
    control_node,
    free_port,
    http_request,
    inspect_node,
    inspect_nodes,
    run_celery,
    sample,
    scrape,
    start_flower,
    wait_for,
)

pytestmark = ALL_BROKER_SETUPS

GET_TIMEOUT = 20  # seconds for one AsyncResult.get()
STOP_WITHIN = 5.0  # seconds a revoke(terminate=True) may take to make a running task REVOKED
RUST_TASKS = {"tasks.add", "tasks.mul", "tasks.xsum", "tasks.echo", "tasks.sleep", "tasks.fail", "tasks.progress"}
STATS_KEYS = {"total", "pid", "clock", "uptime", "prefetch_count", "pool", "broker", "rusage"}
BROKER_INFO_KEYS = ("hostname", "port", "userid", "virtual_host", "transport")
INTERFERENCE = ("task events were switched on by someone else (another Flower on the shared broker "
                "broadcasting enable_events to every worker?)")
ACTIVE_KEYS = {"id", "name", "type", "args", "kwargs", "hostname", "time_start", "acknowledged",
               "delivery_info", "worker_pid"}


# --------------------------------------------------------------------------------------------
# Small checks


def wait_state(result, state: str, timeout: float = 15.0) -> None:
    wait_for(lambda: result.state == state, timeout, interval=0.05,
             describe=lambda: f"task {result.id} to be {state} (last {result.state})")


def expect_revoked(result, reason: str, within: float = STOP_WITHIN) -> float:
    """The task becomes REVOKED within ``within`` s and ``get()`` raises TaskRevokedError(reason).
    Returns the seconds it took."""
    started = time.monotonic()
    wait_state(result, "REVOKED", timeout=within)
    elapsed = time.monotonic() - started
    with pytest.raises(TaskRevokedError) as excinfo:
        result.get(timeout=GET_TIMEOUT)
    assert reason in str(excinfo.value), f"expected TaskRevokedError({reason!r}), got {excinfo.value!r}"
    return elapsed


def assert_runs_add(worker) -> None:
    assert worker.process.alive(), f"worker died; log {worker.log_path}:\n{worker.process.tail()}"
    result = worker.app.send_task("tasks.add", (20, 22), queue=worker.queue)
    assert result.get(timeout=GET_TIMEOUT) == 42


def walk(value: Any, key: str | None = None) -> Iterator[tuple[str | None, Any]]:
    """Every (key, value) pair of a JSON document, depth first (list items keep the list's key)."""
    yield key, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, str(k))
    elif isinstance(value, list):
        for v in value:
            yield from walk(v, key)


def masked(text: str | None) -> bool:
    return not text or set(text) <= {"*"}


def assert_no_password(reply: Any, secrets: list[str], what: str) -> None:
    """No secret string anywhere; every ``*password*`` field and every URL password masked."""
    text = json.dumps(reply)
    for secret in secrets:
        assert secret not in text, f"{what} leaks {secret!r}: {text}"
    for key, value in walk(reply):
        if key and "password" in key.lower() and isinstance(value, str):
            assert masked(value), f"{what}: field {key!r} = {value!r}"
        if isinstance(value, str) and "://" in value:
            assert masked(urlsplit(value).password), f"{what}: URL with a password in {key!r}: {value!r}"


def url_secret(url: str) -> list[str]:
    """``:<password>@`` of a URL with a password (the bare password may equal the user name)."""
    password = urlsplit(url).password
    return [f":{password}@"] if password else []


def find_task(entries: list[dict], task_id: str) -> dict | None:
    return next((entry for entry in entries if entry.get("id") == task_id), None)


# --------------------------------------------------------------------------------------------
# Harness sanity: nothing here can broadcast to every worker on the shared broker


@pytest.mark.timeout(60)
def test_undirected_broadcasts_are_refused(broker):
    for call in (lambda: broker.app.control.ping(timeout=0.5),
                 lambda: broker.app.control.inspect(timeout=0.5).stats(),
                 lambda: broker.app.control.shutdown(destination=[]),  # [] would mean everyone too
                 lambda: broker.app.control.revoke(str(uuid.uuid4()))):
        with pytest.raises(RuntimeError, match="refusing to broadcast"):
            call()
    out = run_celery(broker.python_env(broker.queue), "inspect", "ping", "--json")  # no -d
    assert out.returncode != 0 and "refusing to broadcast" in out.stderr + out.stdout, out


# --------------------------------------------------------------------------------------------
# celery inspect: the CLI and app.control.inspect against the shared Rust worker


@pytest.mark.timeout(60)
def test_cli_inspect_ping(broker, rust):
    env = broker.python_env(rust.queue)
    assert celery_json(env, "inspect", "ping", node=rust.hostname) == {"ok": "pong"}
    assert broker.app.control.ping(destination=[rust.hostname], timeout=5) == [{rust.hostname: {"ok": "pong"}}]


@pytest.mark.timeout(60)
def test_directed_command_is_ignored_by_other_nodes(broker, rust):
    """A broadcast for another node name gets no reply from our worker (nor does anyone else's)."""
    nobody = f"nobody-{uuid.uuid4().hex[:8]}@{rust.hostname.split('@', 1)[1]}"
    replies = broker.app.control.broadcast("ping", destination=[nobody], reply=True, timeout=1.5)
    assert replies == [], replies
    out = run_celery(broker.python_env(rust.queue), "inspect", "ping", "-d", nobody, "--json")
    assert out.returncode != 0 and "No nodes replied" in out.stderr, out


def logged_tasks(worker) -> set[str]:
    """The task names the worker listed in its ``ready.`` line (``tasks=["tasks.add", ...]``)."""
    match = re.search(r" ready\..* tasks=\[([^\]]*)\]", worker.process.log_text())
    assert match, f"no tasks=[...] in the ready line; log {worker.log_path}"
    return set(re.findall(r'"([^"]+)"', match.group(1)))


@pytest.mark.timeout(60)
def test_cli_inspect_registered(broker, rust):
    registered = celery_json(broker.python_env(rust.queue), "inspect", "registered", node=rust.hostname)
    assert isinstance(registered, list) and RUST_TASKS <= set(registered), registered
    assert len(set(registered)) == len(registered), f"duplicates: {registered}"
    # Exactly the registry the worker runs (the tasks crate may grow beyond the seven above).
    assert set(registered) == logged_tasks(rust), registered
    assert all(name.startswith("tasks.") for name in registered), registered
    assert sorted(inspect_node(broker.app, rust.hostname, "registered")) == sorted(registered)


@pytest.mark.timeout(60)
def test_cli_inspect_active_queues(broker, rust):
    queues = celery_json(broker.python_env(rust.queue), "inspect", "active_queues", node=rust.hostname)
    assert [q["name"] for q in queues] == [rust.queue], queues
    queue = queues[0]
    assert queue["routing_key"] == rust.queue, queue
    exchange_type, arguments = ("topic", {"x-queue-type": "quorum"}) if broker.quorum else ("direct", None)
    assert queue["exchange"]["name"] == rust.queue and queue["exchange"]["type"] == exchange_type, queue
    assert queue["queue_arguments"] == arguments, queue
    assert queue["durable"] is True and queue["no_ack"] is False, queue


@pytest.mark.timeout(90)
def test_cli_inspect_stats_and_conf_hide_passwords(broker, spawn_rust_worker):
    """stats has Celery's keys and right values; neither stats nor conf shows a password.

    A worker of its own, with a PostgreSQL URL carrying a unique password among its settings
    (the worker never connects to it), so "no password" is checked on both brokers.
    """
    secret = f"s3cret-{uuid.uuid4().hex[:10]}"
    db_url = f"postgres://interop:{secret}@127.0.0.1:5432/never_used"
    worker = spawn_rust_worker([broker.new_queue("stats")], tag="stats", concurrency=3,
                               extra_env={"CELERY_DATABASE_URL": db_url})
    for name, args in (("tasks.add", (1, 2)), ("tasks.add", (3, 4)), ("tasks.mul", (2, 3))):
        broker.app.send_task(name, args, queue=worker.queue).get(timeout=GET_TIMEOUT)

    env = broker.python_env(worker.queue)
    stats = celery_json(env, "inspect", "stats", node=worker.hostname)
    assert STATS_KEYS <= set(stats), f"stats lacks {STATS_KEYS - set(stats)}: {stats}"
    assert stats["pid"] == worker.process.pid, stats["pid"]
    assert stats["total"] == {"tasks.add": 2, "tasks.mul": 1}, stats["total"]
    assert isinstance(stats["uptime"], int) and 0 <= stats["uptime"] < 120, stats["uptime"]
    assert int(stats["clock"]) > 0, stats["clock"]
    assert isinstance(stats["prefetch_count"], int) and stats["prefetch_count"] >= 3, stats["prefetch_count"]
    pool = stats["pool"]
    assert pool["max-concurrency"] == 3 and pool.get("implementation"), pool
    assert isinstance(pool.get("processes"), list), pool
    expected = Connection(broker.broker_url).info()  # what a Python worker reports for this URL
    assert {k: stats["broker"].get(k) for k in BROKER_INFO_KEYS} == {k: expected[k] for k in BROKER_INFO_KEYS}, \
        stats["broker"]
    assert isinstance(stats["rusage"], dict) and "maxrss" in stats["rusage"], stats["rusage"]
    assert_no_password(stats, [secret, *url_secret(broker.broker_url)], "inspect stats")

    conf = celery_json(env, "inspect", "conf", node=worker.hostname)
    assert isinstance(conf, dict) and conf, conf
    assert_no_password(conf, [secret, *url_secret(broker.broker_url)], "inspect conf")
    assert urlsplit(conf["database_url"]).hostname == "127.0.0.1", conf["database_url"]
    assert conf["worker_concurrency"] == 3 and conf["task_default_queue"] == worker.queue, conf
    # report, another text that names the transport and result backend
    report = inspect_node(broker.app, worker.hostname, "report")
    assert_no_password(report, [secret, *url_secret(broker.broker_url)], "inspect report")


@pytest.mark.timeout(90)
def test_inspect_active_shows_running_sleep(broker, rust):
    env = broker.python_env(rust.queue)
    sent = time.time()
    result = broker.app.send_task("tasks.sleep", (30,), queue=rust.queue)
    try:
        wait_state(result, "STARTED")
        active = celery_json(env, "inspect", "active", node=rust.hostname)
        entry = find_task(active, result.id)
        assert entry is not None, f"{result.id} not in inspect active: {active}"
        assert ACTIVE_KEYS <= set(entry), f"active entry lacks {ACTIVE_KEYS - set(entry)}: {entry}"
        assert entry["name"] == entry["type"] == "tasks.sleep", entry
        assert entry["args"] == [30] and entry["kwargs"] == {}, entry
        assert entry["hostname"] == rust.hostname, entry
        # The shipped config acks late: a running task's message is not acknowledged yet.
        assert entry["acknowledged"] is False, entry
        assert sent - 1 <= entry["time_start"] <= time.time() + 1, (sent, entry["time_start"])
        assert entry["worker_pid"] == rust.process.pid, entry
        assert entry["delivery_info"]["routing_key"] == rust.queue, entry

        # The same through the API; safe=True gives reprs (what Flower asks for).
        safe = find_task(inspect_node(broker.app, rust.hostname, "active", safe=True), result.id)
        assert safe is not None and isinstance(safe["args"], str) and "30" in safe["args"], safe
        assert isinstance(safe["kwargs"], str), safe
        # query_task: (state, info) per id, as Celery answers it
        query = inspect_node(broker.app, rust.hostname, "query_task", result.id)
        assert list(query) == [result.id] and query[result.id][0] == "active", query
        assert query[result.id][1]["id"] == result.id, query
        reserved = inspect_node(broker.app, rust.hostname, "reserved")
        assert find_task(reserved, result.id) is None, reserved
    finally:
        broker.app.control.revoke(result.id, terminate=True, destination=[rust.hostname])
    expect_revoked(result, "terminated")


@pytest.mark.timeout(120)
def test_inspect_replies_have_python_shape(broker, rust, py_worker):
    """The same inspect commands on the Rust and the stock Python worker answer with the same keys."""
    env_rust, env_py = broker.python_env(rust.queue), broker.python_env(py_worker.queue)
    rust_task = broker.app.send_task("tasks.sleep", (6,), queue=rust.queue)
    py_task = broker.app.send_task("py.sleep", (6,), queue=py_worker.queue)
    wait_state(rust_task, "STARTED")
    wait_state(py_task, "STARTED")
    nodes = [rust.hostname, py_worker.hostname]

    # stats through the CLI, once per worker
    stats_rust = celery_json(env_rust, "inspect", "stats", node=rust.hostname)
    stats_py = celery_json(env_py, "inspect", "stats", node=py_worker.hostname)
    assert set(stats_py) <= set(stats_rust), f"Rust stats lacks {set(stats_py) - set(stats_rust)}"
    for key in stats_py:
        assert type(stats_rust[key]) is type(stats_py[key]), (key, stats_rust[key], stats_py[key])
    assert {"implementation", "max-concurrency"} <= set(stats_rust["pool"]) & set(stats_py["pool"])
    assert set(stats_py["rusage"]) == set(stats_rust["rusage"]), (stats_py["rusage"], stats_rust["rusage"])
    # broker: every key Python has
    missing = set(stats_py["broker"]) - set(stats_rust["broker"])
    assert not missing, f"Rust stats.broker lacks {missing}"

    replies = {m: inspect_nodes(broker.app, nodes, m) for m in ("ping", "registered", "active_queues", "active",
                                                                    "reserved", "scheduled", "revoked", "conf")}
    replies["active_safe"] = inspect_nodes(broker.app, nodes, "active", safe=True)
    for method, reply in replies.items():
        r, p = reply[rust.hostname], reply[py_worker.hostname]
        assert type(r) is type(p), f"{method}: Rust {type(r).__name__}, Python {type(p).__name__}"
    assert replies["ping"][rust.hostname] == replies["ping"][py_worker.hostname] == {"ok": "pong"}
    assert all(isinstance(name, str) for name in replies["registered"][rust.hostname])

    (queue_rust,), (queue_py,) = (replies["active_queues"][n] for n in nodes)
    assert set(queue_rust) == set(queue_py), (sorted(queue_rust), sorted(queue_py))
    assert set(queue_rust["exchange"]) == set(queue_py["exchange"]), (queue_rust["exchange"], queue_py["exchange"])

    for method in ("active", "active_safe"):
        entry_rust = find_task(replies[method][rust.hostname], rust_task.id)
        entry_py = find_task(replies[method][py_worker.hostname], py_task.id)
        assert entry_rust and entry_py, (method, replies[method])
        assert set(entry_rust) == set(entry_py), (method, sorted(entry_rust), sorted(entry_py))
        assert set(entry_rust["delivery_info"]) == set(entry_py["delivery_info"]), (entry_rust, entry_py)
        for key in entry_py:
            if entry_py[key] is not None:
                assert type(entry_rust[key]) is type(entry_py[key]), (method, key, entry_rust[key], entry_py[key])
    # safe=True: the reprs a Python client put in the argsrepr/kwargsrepr headers, on both workers
    safe_rust = find_task(replies["active_safe"][rust.hostname], rust_task.id)
    safe_py = find_task(replies["active_safe"][py_worker.hostname], py_task.id)
    assert (safe_rust["args"], safe_rust["kwargs"]) == (safe_py["args"], safe_py["kwargs"]) == ("(6,)", "{}")

    queried = {n: inspect_node(broker.app, n, "query_task", t.id)
               for n, t in ((rust.hostname, rust_task), (py_worker.hostname, py_task))}
    (state_rust, info_rust), = queried[rust.hostname].values()
    (state_py, info_py), = queried[py_worker.hostname].values()
    assert state_rust == state_py == "active" and set(info_rust) == set(info_py), queried
    assert rust_task.get(timeout=GET_TIMEOUT) == 6 and py_task.get(timeout=GET_TIMEOUT) == 6


@pytest.mark.timeout(60)
def test_stats_broker_info_has_every_python_key(broker, rust, py_worker):
    replies = inspect_nodes(broker.app, [rust.hostname, py_worker.hostname], "stats")
    rust_keys, py_keys = set(replies[rust.hostname]["broker"]), set(replies[py_worker.hostname]["broker"])
    assert py_keys <= rust_keys, f"Rust stats.broker lacks {sorted(py_keys - rust_keys)}"


# --------------------------------------------------------------------------------------------
# Revoke


@pytest.mark.timeout(60)
def test_revoke_terminate_stops_running_task(broker, rust):
    result = broker.app.send_task("tasks.sleep", (30,), queue=rust.queue)
    wait_state(result, "STARTED")
    replies = broker.app.control.revoke(result.id, terminate=True, destination=[rust.hostname],
                                        reply=True, timeout=5, limit=1)
    assert len(replies) == 1 and result.id in replies[0][rust.hostname].get("ok", ""), replies
    took = expect_revoked(result, "terminated")
    assert took < STOP_WITHIN, took

    meta = json.loads(broker.redis_results().get(f"celery-task-meta-{result.id}"))
    assert meta["status"] == "REVOKED" and meta["result"]["exc_type"] == "TaskRevokedError", meta
    assert result.id in inspect_node(broker.app, rust.hostname, "revoked")
    assert find_task(inspect_node(broker.app, rust.hostname, "active"), result.id) is None
    assert_runs_add(rust)


@pytest.mark.timeout(60)
def test_cli_control_terminate_stops_running_task(broker, rust):
    result = broker.app.send_task("tasks.sleep", (30,), queue=rust.queue)
    wait_state(result, "STARTED")
    started = time.monotonic()
    reply = celery_json(broker.python_env(rust.queue), "control", "terminate", "SIGTERM", result.id,
                        node=rust.hostname)
    assert result.id in reply.get("ok", ""), reply
    expect_revoked(result, "terminated")
    assert time.monotonic() - started < STOP_WITHIN + 3, "terminate (incl. CLI start-up) took too long"
    revoked = celery_json(broker.python_env(rust.queue), "inspect", "revoked", node=rust.hostname)
    assert result.id in revoked, revoked


@pytest.mark.timeout(90)
def test_revoke_before_the_task_runs(broker, spawn_rust_worker):
    """Revoked without terminate: a task waiting for its countdown, one reserved behind a busy
    slot, and an id revoked before it was even sent are all REVOKED ('revoked') and never run."""
    worker = spawn_rust_worker([broker.new_queue("revoke")], tag="revoke", concurrency=1)
    app, node, queue = broker.app, worker.hostname, worker.queue

    countdown = app.send_task("tasks.add", (1, 1), queue=queue, countdown=4)
    # With native delayed delivery it waits in the broker, and reaches the worker only at its ETA.
    if not broker.quorum:
        wait_for(lambda: find_task([s["request"] for s in inspect_node(app, node, "scheduled")], countdown.id),
                 10, interval=0.2, describe="the countdown task in inspect scheduled")
    busy = app.send_task("tasks.sleep", (3,), queue=queue)
    wait_state(busy, "STARTED")
    behind = app.send_task("tasks.add", (2, 2), queue=queue)
    wait_for(lambda: find_task(inspect_node(app, node, "reserved"), behind.id), 10, interval=0.2,
             describe="the task behind the busy slot in inspect reserved")
    early_id = str(uuid.uuid4())

    for task_id in (countdown.id, behind.id, early_id):
        reply = control_node(app, node, "revoke", task_id=task_id)
        assert task_id in reply.get("ok", ""), reply
    early = app.send_task("tasks.add", (3, 3), queue=queue, task_id=early_id)

    assert busy.get(timeout=GET_TIMEOUT) == 3
    for result in (early, behind, countdown):  # the countdown one is discarded at its eta
        expect_revoked(result, "revoked", within=10)
    revoked = celery_json(broker.python_env(queue), "inspect", "revoked", node=node)
    assert {countdown.id, behind.id, early_id} <= set(revoked), revoked
    assert inspect_node(app, node, "stats")["total"] == {"tasks.sleep": 1}, "a revoked task ran"
    assert_runs_add(worker)


@pytest.mark.timeout(60)
def test_revoke_stores_revoked_unless_a_worker_began_the_task(broker, rust):
    """As Celery's worker does, a revoke stores REVOKED at once for a task no worker has begun,
    and leaves a task another worker started (STARTED, PROGRESS) to that worker."""
    backend = broker.app.backend
    not_sent, started, progressing = (str(uuid.uuid4()) for _ in range(3))
    backend.store_result(started, {"hostname": "other@host"}, "STARTED")
    backend.store_result(progressing, {"current": 1, "total": 2}, "PROGRESS")

    reply = control_node(broker.app, rust.hostname, "revoke", task_id=[not_sent, started, progressing])
    assert not_sent in reply.get("ok", ""), reply
    assert backend.get_state(not_sent) == "REVOKED"
    assert backend.get_state(started) == "STARTED"
    assert backend.get_state(progressing) == "PROGRESS"


@pytest.mark.timeout(60)
def test_expired_task_is_revoked(broker, rust):
    result = broker.app.send_task("tasks.add", (1, 2), queue=rust.queue, countdown=2, expires=1)
    expect_revoked(result, "expired", within=10)


# --------------------------------------------------------------------------------------------
# Consumers, pool, events switch, unsupported commands (workers of their own)


@pytest.mark.timeout(90)
def test_add_and_cancel_consumer(broker, spawn_rust_worker):
    worker = spawn_rust_worker([broker.new_queue("consumer")], tag="consumer", concurrency=2)
    app, node = broker.app, worker.hostname
    extra = broker.new_queue("consumer-extra")

    reply = app.control.add_consumer(extra, destination=[node], reply=True, timeout=5, limit=1)
    assert "ok" in reply[0][node], reply
    names = [q["name"] for q in inspect_node(app, node, "active_queues")]
    assert names == [worker.queue, extra], names
    assert app.send_task("tasks.add", (2, 2), queue=extra).get(timeout=GET_TIMEOUT) == 4

    reply = app.control.cancel_consumer(extra, destination=[node], reply=True, timeout=5, limit=1)
    assert "ok" in reply[0][node], reply
    names = [q["name"] for q in celery_json(broker.python_env(worker.queue), "inspect", "active_queues", node=node)]
    assert names == [worker.queue], names
    ignored = app.send_task("tasks.add", (3, 3), queue=extra)
    time.sleep(2)  # an observation window: nothing may consume the cancelled queue
    assert ignored.state == "PENDING", f"task on the cancelled queue ran: {ignored.state}"
    assert_runs_add(worker)  # the original queue is still consumed


@pytest.mark.timeout(90)
def test_pool_grow_and_shrink(broker, spawn_rust_worker):
    worker = spawn_rust_worker([broker.new_queue("pool")], tag="pool", concurrency=1)
    app, node = broker.app, worker.hostname

    def max_concurrency() -> int:
        return inspect_node(app, node, "stats")["pool"]["max-concurrency"]

    assert max_concurrency() == 1
    reply = app.control.pool_grow(2, destination=[node], reply=True, timeout=5, limit=1)
    assert "ok" in reply[0][node], reply
    assert max_concurrency() == 3
    # and it is real: three tasks run at once
    results = [app.send_task("tasks.sleep", (3,), queue=worker.queue) for _ in range(3)]
    last: list[str] = []

    def all_started():
        last[:] = [r.state for r in results]
        return all(state == "STARTED" for state in last)

    wait_for(all_started, 10, describe=lambda: f"3 tasks STARTED at once after pool_grow (last {last})")
    assert [r.get(timeout=GET_TIMEOUT) for r in results] == [3, 3, 3]

    reply = app.control.pool_shrink(2, destination=[node], reply=True, timeout=5, limit=1)
    assert "ok" in reply[0][node], reply
    assert max_concurrency() == 1
    stats = celery_json(broker.python_env(worker.queue), "inspect", "stats", node=node)
    assert stats["pool"]["max-concurrency"] == 1, stats["pool"]
    assert_runs_add(worker)


@pytest.mark.timeout(60)
def test_unsupported_and_unknown_commands_answer_errors(broker, rust):
    for command, arguments in (
        ("time_limit", {"task_name": "tasks.add", "soft": 10, "hard": 20}),
        ("autoscale", {"max": 4, "min": 1}),
        ("pool_restart", {}),
    ):
        reply = control_node(broker.app, rust.hostname, command, **arguments)
        assert reply == {"error": f"{command} is not supported by this worker"}, (command, reply)
    unknown = f"no_such_command_{uuid.uuid4().hex[:6]}"
    assert control_node(broker.app, rust.hostname, unknown) == {"error": f"KeyError('{unknown}')"}
    assert_runs_add(rust)


@pytest.mark.timeout(90)
def test_rate_limit_spaces_task_starts(broker, spawn_rust_worker):
    """A worker of its own: a rate limit on the shared worker would slow every other test."""
    worker = spawn_rust_worker([broker.new_queue("rate")], tag="rate", concurrency=4)
    node = worker.hostname
    assert control_node(broker.app, node, "rate_limit", task_name="tasks.add", rate_limit="ten/s") == {
        "error": "configuration: invalid rate limit \"ten/s\": use N/s, N/m or N/h"}
    assert control_node(broker.app, node, "rate_limit", task_name="tasks.add", rate_limit="2/s") == {
        "ok": "new rate limit set successfully"}
    results = [broker.app.send_task("tasks.add", (i, i), queue=worker.queue) for i in range(5)]
    assert [r.get(timeout=GET_TIMEOUT) for r in results] == [0, 2, 4, 6, 8]
    done = sorted(r.date_done for r in results)
    # Five starts at 2/s take at least two seconds, however fast the machine.
    assert (done[-1] - done[0]).total_seconds() >= 1.9, done


@pytest.mark.timeout(90)
def test_enable_and_disable_events_switch_task_events(broker, spawn_rust_worker):
    """Started without -E: heartbeats only; enable_events turns task events on, disable_events off."""
    worker = spawn_rust_worker([broker.new_queue("events")], tag="events", concurrency=2)
    app, node = broker.app, worker.hostname
    with EventCapture(app, [node]) as events:
        events.wait_live()  # a worker-heartbeat arrived: the subscription is live
        assert {e["type"] for e in events.snapshot()} <= {"worker-online", "worker-heartbeat"}

        quiet = app.send_task("tasks.add", (1, 1), queue=worker.queue)
        assert quiet.get(timeout=GET_TIMEOUT) == 2

        # "task events enabled" (not "already"): they were off until now. An "already" here means
        # someone else's Flower on the shared broker broadcast enable_events to every worker.
        assert control_node(app, node, "enable_events") == {"ok": "task events enabled"}, INTERFERENCE
        loud = app.send_task("tasks.add", (2, 2), queue=worker.queue)
        assert loud.get(timeout=GET_TIMEOUT) == 4
        wait_for(lambda: events.of_type("task-succeeded", loud.id), 10,
                 describe=lambda: f"task-succeeded for {loud.id}; got {events.types()}")
        assert events.types(loud.id) == ["task-received", "task-started", "task-succeeded"], events.types(loud.id)
        succeeded = events.of_type("task-succeeded", loud.id)[0]
        assert succeeded["result"] == "4" and succeeded["runtime"] >= 0, succeeded
        received = events.of_type("task-received", loud.id)[0]
        assert received["name"] == "tasks.add" and received["args"] == "(2, 2)", received

        assert control_node(app, node, "disable_events") == {"ok": "task events disabled"}
        quiet_again = app.send_task("tasks.add", (3, 3), queue=worker.queue)
        assert quiet_again.get(timeout=GET_TIMEOUT) == 6
        heartbeats = len(events.of_type("worker-heartbeat"))
        wait_for(lambda: len(events.of_type("worker-heartbeat")) > heartbeats, 10,
                 describe="one more heartbeat after disable_events (heartbeats go on)")
        assert events.types(quiet.id) == [] and events.types(quiet_again.id) == [], (INTERFERENCE, events.snapshot())
        assert control_node(app, node, "disable_events") == {"ok": "task events already disabled"}, INTERFERENCE


# --------------------------------------------------------------------------------------------
# Flower


@dataclass
class FlowerCluster:
    port: int
    process: ManagedProcess
    rust: Any  # WorkerHandle of the `rust_events` fixture: -E, queue <queue>-events
    py: Any  # WorkerHandle of the session's stock Python worker

    def request(self, method: str, path: str, timeout: float = 30.0) -> Reply:
        return http_request("127.0.0.1", self.port, method, path, timeout=timeout)

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        reply = self.request("GET", path, timeout=timeout)
        assert reply.status == 200, f"{reply}\nFlower log {self.process.log_path}:\n{self.process.tail()}"
        return reply.json()

    def tasks(self) -> dict[str, dict]:
        return self.get_json(f"/api/tasks?workername={quote(self.rust.hostname)}")

    def online(self) -> dict[str, bool]:
        return self.get_json("/api/workers?status=1")


@pytest.fixture(scope="module")
def flower(broker, rust_events, py_worker) -> Iterator[FlowerCluster]:
    """Flower 2.x on a free port watching a Rust worker (-E, own queue) and the Python worker."""
    port, process = start_flower(broker, [rust_events.hostname, py_worker.hostname])
    try:
        yield FlowerCluster(port=port, process=process, rust=rust_events, py=py_worker)
    finally:
        process.stop(signal.SIGTERM, timeout=10)


@pytest.mark.timeout(90)
def test_flower_lists_rust_and_python_workers(flower):
    rust, py = flower.rust.hostname, flower.py.hostname
    last: dict = {}

    def both_listed():
        last.clear()
        last.update(flower.get_json("/api/workers?refresh=1"))
        return all(name in last and {"stats", "registered", "active_queues"} <= set(last[name]) for name in (rust, py))

    wait_for(both_listed, 30, interval=1,
             describe=lambda: f"both workers with stats/registered/active_queues in /api/workers; "
                              f"got {json.dumps({n: sorted(v) for n, v in last.items() if n in (rust, py)})}")
    # Flower's inspect broadcasts were scoped (-A interop_app): no other worker on the broker answered.
    assert set(last) <= {rust, py}, f"Flower inspected workers beyond its scope: {sorted(last)}"
    info = last[rust]
    assert set(info["registered"]) == logged_tasks(flower.rust), info["registered"]
    assert RUST_TASKS <= set(info["registered"]), info["registered"]
    assert info["stats"]["pool"]["max-concurrency"] == 4 and info["stats"]["pid"] == flower.rust.process.pid, \
        info["stats"]
    assert [q["name"] for q in info["active_queues"]] == [flower.rust.queue], info["active_queues"]
    assert {"py.mul", "py.concat", "py.sleep"} <= set(last[py]["registered"]), last[py]["registered"]

    # One worker's page of data (Flower then also asks for its active/reserved/revoked lists).
    one = flower.get_json(f"/api/workers?workername={quote(rust)}&refresh=1")
    assert list(one) == [rust] and {"active", "reserved", "scheduled", "revoked", "conf"} <= set(one[rust]), \
        sorted(one.get(rust, {}))


@pytest.mark.timeout(90)
def test_flower_shows_worker_online_then_offline(broker, flower, spawn_rust_worker):
    """Online while idle for > 15 s (heartbeats every 2 s keep it alive), offline after shutdown."""
    worker = spawn_rust_worker([broker.new_queue("flower-life")], tag="flower-life", concurrency=1,
                               task_events=True)
    node = worker.hostname
    wait_for(lambda: flower.online().get(node) is True, 15, interval=0.5,
             describe=lambda: f"{node} online in /api/workers?status=1 (got {flower.online().get(node)})")
    listed = flower.get_json("/workers?json=1")["data"]
    assert any(w.get("hostname") == node and w.get("status") is True for w in listed), listed

    idle_from = time.monotonic()
    while time.monotonic() - idle_from < 16:  # poll through an idle stretch; it must never flap
        assert flower.online().get(node) is True, f"{node} went offline after {time.monotonic() - idle_from:.1f}s idle"
        time.sleep(1)

    control_node(broker.app, node, "shutdown", reply=False)
    wait_for(lambda: flower.online().get(node) is False, 10, interval=0.25,
             describe=lambda: f"{node} offline in Flower (got {flower.online().get(node)})")
    code = worker.process.stop(timeout=15)  # already exiting: waits for it
    assert code == 0, f"worker exit code after remote shutdown: {code}; log {worker.log_path}"


@pytest.mark.timeout(120)
def test_flower_shows_task_states(broker, flower):
    app, queue = broker.app, flower.rust.queue
    ok = app.send_task("tasks.add", (20, 22), queue=queue)
    bad = app.send_task("tasks.fail", ("flower boom",), queue=queue)
    progress = app.send_task("tasks.progress", kwargs={"total": 8, "step_ms": 500}, queue=queue)
    sleeper = app.send_task("tasks.sleep", (30,), queue=queue)

    last: dict = {}

    def state_of(task_id: str, state: str):
        last.clear()
        last.update(flower.tasks())
        task = last.get(task_id)
        return task if task and task.get("state") == state else None

    def states():
        return {tid[:8]: t.get("state") for tid, t in last.items()}

    seen = wait_for(lambda: state_of(progress.id, "PROGRESS"), 10, interval=0.1,
                    describe=lambda: f"tasks.progress in PROGRESS in /api/tasks (states {states()})")
    assert seen["name"] == "tasks.progress" and seen["worker"] == flower.rust.hostname, seen

    succeeded = wait_for(lambda: state_of(ok.id, "SUCCESS"), 15, interval=0.2,
                         describe=lambda: f"tasks.add SUCCESS in Flower (states {states()})")
    assert succeeded["result"] == "42" and isinstance(succeeded["runtime"], float) and succeeded["runtime"] >= 0, \
        succeeded
    assert succeeded["args"] == "(20, 22)" and succeeded["received"] and succeeded["started"], succeeded

    failed = wait_for(lambda: state_of(bad.id, "FAILURE"), 15, interval=0.2,
                      describe=lambda: f"tasks.fail FAILURE in Flower (states {states()})")
    assert "flower boom" in failed["exception"], failed
    assert failed["traceback"], failed

    wait_state(sleeper, "STARTED")
    broker.app.control.revoke(sleeper.id, terminate=True, destination=[flower.rust.hostname])
    expect_revoked(sleeper, "terminated")
    revoked = wait_for(lambda: state_of(sleeper.id, "REVOKED"), 10, interval=0.2,
                       describe=lambda: f"tasks.sleep REVOKED in Flower (states {states()})")
    assert revoked["name"] == "tasks.sleep", revoked

    assert progress.get(timeout=GET_TIMEOUT) == 8
    wait_for(lambda: state_of(progress.id, "SUCCESS"), 10, interval=0.2,
             describe=lambda: f"tasks.progress SUCCESS in Flower after its PROGRESS (states {states()})")


@pytest.mark.timeout(90)
def test_flower_revoke_api_terminates_running_task(broker, flower):
    sleeper = broker.app.send_task("tasks.sleep", (30,), queue=flower.rust.queue)
    try:
        wait_state(sleeper, "STARTED")
        # Flower's revoke carries no destination of its own; -A interop_app scopes it to its two workers.
        reply = flower.request("POST", f"/api/task/revoke/{sleeper.id}?terminate=true")
        assert reply.status == 200 and sleeper.id in reply.json().get("message", ""), reply
        expect_revoked(sleeper, "terminated")
        last: dict = {}

        def revoked_in_flower():
            last.clear()
            last.update(flower.tasks().get(sleeper.id) or {})
            return last.get("state") == "REVOKED"

        wait_for(revoked_in_flower, 10, interval=0.2, describe=lambda: f"REVOKED in /api/tasks (last {last})")
        assert last["name"] == "tasks.sleep" and last["worker"] == flower.rust.hostname, last
    finally:  # do not leave a 30 s task holding one of the worker's slots
        broker.app.control.revoke(sleeper.id, terminate=True, destination=[flower.rust.hostname])


@pytest.mark.timeout(60)
def test_revoke_terminate_given_as_1_stops_running_task(broker, rust):
    """What Flower sends, without Flower: ``{"task_id": ..., "terminate": 1, "signal": "SIGTERM"}``."""
    result = broker.app.send_task("tasks.sleep", (30,), queue=rust.queue)
    try:
        wait_state(result, "STARTED")
        control_node(broker.app, rust.hostname, "revoke", task_id=result.id, terminate=1, signal="SIGTERM")
        expect_revoked(result, "terminated")
    finally:
        broker.app.control.revoke(result.id, terminate=True, destination=[rust.hostname])


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.mark.timeout(120)
def test_flower_workers_page_screenshot(broker, flower, tmp_path):
    """Headless Chromium renders Flower's workers page (saved for people to look at) and the page
    names the Rust worker."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium found (chromium, chromium-browser, google-chrome or $CHROMIUM); "
                    "`bash scripts/chromium.sh` installs it as root")
    # A task first, so the Succeeded column and counters have something to show.
    assert broker.app.send_task("tasks.add", (1, 2), queue=flower.rust.queue).get(timeout=GET_TIMEOUT) == 3
    wait_for(lambda: flower.online().get(flower.rust.hostname) is True, 15, interval=0.5,
             describe="the Rust worker online in Flower")
    url = f"http://127.0.0.1:{flower.port}/workers"
    png = ARTIFACTS_DIR / f"flower-workers-{broker.name}.png"
    png.unlink(missing_ok=True)
    out = chromium_screenshot(binary, url, png, tmp_path / "chromium-profile")
    assert out.returncode == 0 and png.is_file(), out
    assert png.stat().st_size > 20_000, f"{png} is only {png.stat().st_size} bytes"
    assert png_size(png) == (1400, 900), png_size(png)

    # What the screenshot shows, as text: the rendered page lists the Rust worker.
    dom = chromium_dom(binary, url, tmp_path / "chromium-profile-dom")
    assert flower.rust.hostname in dom, f"{flower.rust.hostname} not on {url}"


# --------------------------------------------------------------------------------------------
# Prometheus


@pytest.mark.timeout(60)
def test_worker_metrics_move_as_tasks_run(broker, spawn_rust_worker):
    """A worker started with ``worker_metrics_port`` serves Prometheus' text format at
    ``/metrics``: a running task shows in flight, and each run counts by task and outcome, with
    its runtime; a message for a task it does not have counts as rejected."""
    port = free_port()
    worker = spawn_rust_worker([broker.new_queue("metrics")], tag="metrics",
                               extra_env={"CELERY_WORKER_METRICS_PORT": str(port)})
    before = scrape(port)
    assert sample(before, "rcelery_tasks_in_flight") == 0, before
    assert sample(before, "rcelery_tasks_received_total", task="tasks.add") == 0, before

    def send(name: str, *args):
        return broker.app.send_task(name, args, queue=worker.queue)

    running = send("tasks.progress", 5, 200)  # about a second
    wait_for(lambda: sample(scrape(port), "rcelery_tasks_in_flight") == 1, 10,
             describe="tasks.progress counted in flight")
    assert running.get(timeout=GET_TIMEOUT) == 5
    for result in [send("tasks.add", i, i) for i in range(5)]:
        result.get(timeout=GET_TIMEOUT)
    with pytest.raises(RuntimeError):
        send("tasks.fail", "boom").get(timeout=GET_TIMEOUT)
    with pytest.raises(Exception, match="tasks.nope"):
        send("tasks.nope").get(timeout=GET_TIMEOUT)
    expected = {
        ("rcelery_tasks_received_total", "tasks.add"): 5,
        ("rcelery_tasks_succeeded_total", "tasks.add"): 5,
        ("rcelery_task_runtime_seconds_count", "tasks.add"): 5,
        ("rcelery_tasks_succeeded_total", "tasks.progress"): 1,
        ("rcelery_tasks_failed_total", "tasks.fail"): 1,
        ("rcelery_tasks_succeeded_total", "tasks.fail"): 0,
    }
    last: dict = {}

    def counted():
        last.clear()
        last.update(scrape(port))
        return all(sample(last, name, task=task) == value for (name, task), value in expected.items())

    wait_for(counted, 10, describe=lambda: f"counts {expected}; scraped "
             f"{ {k: sample(last, k[0], task=k[1]) for k in expected} }")
    assert sample(last, "rcelery_messages_rejected_total", reason="unregistered") == 1, last
    assert sample(last, "rcelery_task_runtime_seconds_sum", task="tasks.progress") >= 0.8, last
    assert sample(last, "rcelery_tasks_in_flight") == 0, last
    assert sample(last, "rcelery_messages_prefetched") == 0, last
    assert sample(last, "rcelery_broker_reconnects_total") == 0, last
    not_found = http_request("127.0.0.1", port, "GET", "/", timeout=5)
    assert not_found.status == 404, not_found
