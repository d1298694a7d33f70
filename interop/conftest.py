"""Fixtures: one broker setup per parameter (RabbitMQ, Redis), a Rust worker, a Python worker.

Fixture graph (all session-scoped, parametrised through ``broker``):

* ``broker``     URLs, a unique queue name, a Python client app; deletes its queues at the end.
* ``rust``       a Rust ``worker`` consuming ``broker.queue`` (needs the Rust binaries).
* ``rust_events`` a Rust ``worker -E`` (task events on) consuming ``<queue>-events``.
* ``py_worker``  a stock Python Celery worker consuming ``broker.py_queue`` (Rust -> Python).
* ``isolated_broker`` ``broker``, except that on Redis the broker is a database of its own, for
  tests that shorten the visibility timeout (test_reliability).

Per test: ``spawn_rust_worker`` / ``spawn_py_worker`` start workers of the test's own.

Environment knobs: ``RCELERY_BIN_DIR`` (default ``<repo>/target/debug``), ``RCELERY_CONFIG``
(default ``<repo>/celeryconfig.toml``), ``INTEROP_AMQP_URL``, ``INTEROP_REDIS_URL``,
``INTEROP_ISOLATED_REDIS_DB`` (default 15).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis as redis_py
from celery import Celery
from kombu import Connection, Exchange, Queue

from interop_app import create_app
from interop_helpers import (
    ARTIFACTS_DIR,
    INTEROP_DIR,
    Backlog,
    ManagedProcess,
    panic_lines,
    ready_pattern,
    rust_binary,
    rust_config,
    rust_env,
    start_process,
    task_id_of,
    with_redis_db,
)

AMQP_URL = os.environ.get("INTEROP_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("INTEROP_REDIS_URL", "redis://127.0.0.1:6379/0")

# id -> (broker URL, result backend URL)
BROKER_SETUPS = {
    "rabbitmq": (AMQP_URL, REDIS_URL),
    "redis": (REDIS_URL, REDIS_URL),
    # Celery 5.5+'s production set-up: every queue a quorum queue behind a topic exchange, ETAs
    # by native delayed delivery. Modules opt in with `pytestmark = ALL_SETUPS`.
    "rabbitmq-quorum": (AMQP_URL, REDIS_URL),
}
# What every module runs on unless it opts in to more.
DEFAULT_SETUPS = ["rabbitmq", "redis"]
# The queue settings of the quorum set-up, for our processes and for Python's.
QUORUM_RUST_ENV = {
    "CELERY_TASK_DEFAULT_QUEUE_TYPE": "quorum",
    "CELERY_TASK_CREATE_MISSING_QUEUE_TYPE": "quorum",
    "CELERY_TASK_DEFAULT_EXCHANGE_TYPE": "topic",
    "CELERY_TASK_CREATE_MISSING_QUEUE_EXCHANGE_TYPE": "topic",
}
QUORUM_PYTHON_ENV = {"INTEROP_DEFAULT_QUEUE_TYPE": "quorum", "INTEROP_DEFAULT_EXCHANGE_TYPE": "topic"}

# The Redis database of `isolated_broker`: kombu's `unacked` / `unacked_index` / `unacked_mutex`
# keys are per database and every consumer restores *every* entry older than its own visibility
# timeout, so a consumer with a 5 s timeout in db 0 would re-queue long-running work of other runs.
ISOLATED_REDIS_DB = int(os.environ.get("INTEROP_ISOLATED_REDIS_DB", "15"))

READY_TIMEOUT = 60.0
RUST_CONCURRENCY = 8


@dataclass
class BrokerSetup:
    name: str
    broker_url: str
    result_backend: str
    session_id: str
    queue: str
    py_queue: str
    app: Celery
    queues_to_delete: list[str] = field(default_factory=list)

    def new_queue(self, suffix: str) -> str:
        """A further unique queue name, deleted from the broker at the end of the session."""
        name = f"{self.queue}-{suffix}"
        self.queues_to_delete.append(name)
        return name

    @property
    def quorum(self) -> bool:
        return self.name == "rabbitmq-quorum"

    def rust_env(self, default_queue: str | None = None, **extra: str) -> dict[str, str]:
        """Environment for Rust processes (worker and `call`) talking to this setup."""
        return rust_env(
            {
                **(QUORUM_RUST_ENV if self.quorum else {}),
                "CELERY_BROKER_URL": self.broker_url,
                "CELERY_RESULT_BACKEND": self.result_backend,
                "CELERY_TASK_DEFAULT_QUEUE": default_queue or self.queue,
                # Not in the contract's list of overrides, but every setting is overridable:
                # neutralise routes from the repo config so "no --queue" means the default queue.
                "CELERY_TASK_ROUTES": "{}",
                **extra,
            }
        )

    def python_env(self, default_queue: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            INTEROP_BROKER_URL=self.broker_url,
            INTEROP_RESULT_BACKEND=self.result_backend,
            INTEROP_DEFAULT_QUEUE=default_queue,
            PYTHONUNBUFFERED="1",
            **(QUORUM_PYTHON_ENV if self.quorum else {}),
        )
        return env

    def redis_results(self) -> redis_py.Redis:
        return redis_py.Redis.from_url(self.result_backend, decode_responses=True)

    def result_metas(self, task_ids: list[str]) -> list[dict | None]:
        """The stored result meta of each task (``None`` where nothing is stored yet), in one MGET."""
        if not task_ids:
            return []
        raws = self.redis_results().mget([f"celery-task-meta-{task_id}" for task_id in task_ids])
        return [json.loads(raw) if raw is not None else None for raw in raws]

    def result_meta(self, task_id: str) -> dict | None:
        return self.result_metas([task_id])[0]

    def backlog(self, queue: str) -> Backlog:
        """What the broker holds for ``queue`` that a consumer can still get.

        RabbitMQ (passive declare): the ready count and the consumer count; a dead consumer's
        unacked messages are counted as ready once RabbitMQ has noticed (consumers back to 0).
        Redis: the ids waiting in the queue's lists, and the ids recorded in kombu's ``unacked``
        hash for this queue (delivered, never acked: what a visibility-timeout restore re-queues).
        """
        if not self.broker_url.startswith("redis"):
            with Connection(self.broker_url, connect_timeout=5) as conn:
                _, ready, consumers = conn.default_channel.queue_declare(queue=queue, passive=True)
            return Backlog(ready=ready, consumers=consumers)
        client = redis_py.Redis.from_url(self.broker_url)
        ready_ids = []
        for key in (queue, *(f"{queue}\x06\x16{p}" for p in (3, 6, 9))):
            ready_ids += [task_id_of(raw) for raw in client.lrange(key, 0, -1)]
        unacked_ids = []
        for _, entry in client.hscan_iter("unacked"):
            envelope, _exchange, routing_key = json.loads(entry)
            if routing_key == queue:
                unacked_ids.append(task_id_of(envelope))
        return Backlog(ready=len(ready_ids), ready_ids=ready_ids, unacked_ids=unacked_ids)


@dataclass
class WorkerHandle:
    """A running worker: its node name as it logged it, its queue(s), process and log."""

    setup: BrokerSetup
    hostname: str
    queue: str
    process: ManagedProcess

    @property
    def app(self) -> Celery:
        return self.setup.app

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    @property
    def broker_url(self) -> str:
        return self.setup.broker_url

    @property
    def result_backend(self) -> str:
        return self.setup.result_backend


def _delete_queues(broker_url: str, names: list[str]) -> None:
    """Best-effort removal of this session's queues (and the same-named exchanges Celery makes);
    on Redis also of their entries in kombu's ``unacked`` hash (messages of a worker a test
    killed), which a restore would otherwise put back on a deleted queue."""
    try:
        with Connection(broker_url, connect_timeout=5) as conn:
            for name in names:
                for entity in (Queue(name, Exchange(name), routing_key=name), Exchange(name)):
                    try:
                        with conn.channel() as channel:  # a channel error closes only this one
                            entity.bind(channel).delete()
                    except Exception:  # noqa: BLE001 - cleanup must not mask test results
                        pass
            if broker_url.startswith("redis"):
                client = redis_py.Redis.from_url(broker_url)
                wanted = set(names)
                for tag, entry in list(client.hscan_iter("unacked")):
                    try:
                        routing_key = json.loads(entry)[2]
                    except (ValueError, IndexError, TypeError):
                        continue
                    if routing_key in wanted:
                        client.pipeline().zrem("unacked_index", tag).hdel("unacked", tag).execute()
                # A monitor's record of its subscription to `celeryev` (kept after it stops: the
                # queue is a named one, shared), taken back as kombu takes an auto-delete queue's.
                for member in client.smembers("_kombu.binding.celeryev"):
                    if member.decode(errors="replace").split("\x06\x16")[-1] in wanted:
                        client.srem("_kombu.binding.celeryev", member)
                for name in names:
                    client.delete(
                        name,
                        *(f"{name}\x06\x16{p}" for p in (3, 6, 9)),
                        f"_kombu.binding.{name}",
                        f"_kombu.binding_permanent.{name}",
                    )
    except Exception as exc:  # noqa: BLE001
        print(f"interop: could not delete queues {names}: {exc}", file=sys.stderr)


@pytest.fixture(scope="session", params=DEFAULT_SETUPS, ids=DEFAULT_SETUPS)
def broker(request) -> BrokerSetup:
    name = request.param
    broker_url, result_backend = BROKER_SETUPS[name]
    session_id = uuid.uuid4().hex[:8]
    queue = f"interop-{session_id}"
    py_queue = f"interop-py-{session_id}"
    quorum = {"default_queue_type": "quorum", "default_exchange_type": "topic"} if name == "rabbitmq-quorum" else {}
    # strict: a remote-control broadcast without a destination raises instead of reaching every
    # worker on the shared broker (see interop_app.GuardedControl).
    app = create_app(broker_url, result_backend, default_queue=queue, main=f"interop-{name}", strict_control=True,
                     **quorum)
    setup = BrokerSetup(
        name=name,
        broker_url=broker_url,
        result_backend=result_backend,
        session_id=session_id,
        queue=queue,
        py_queue=py_queue,
        app=app,
        queues_to_delete=[queue, py_queue],
    )
    try:
        yield setup
    finally:
        app.close()
        _delete_queues(broker_url, setup.queues_to_delete)


@pytest.fixture(scope="session")
def isolated_broker(broker: BrokerSetup) -> BrokerSetup:
    """``broker`` for tests that give workers a short Redis ``visibility_timeout`` (5 s).

    On RabbitMQ it is ``broker`` itself. On Redis the broker is database ``INTEROP_ISOLATED_REDIS_DB``
    (default 15) instead of 0, results stay in ``broker.result_backend``: every Redis consumer
    re-queues *every* message of its database left unacked past its own visibility timeout
    (kombu's ``unacked`` keys are per database, not per queue), so in the shared db 0 such a
    worker would re-run other runs' long tasks and ETA tasks. Whatever runs in the isolated
    database must count a message unacked for more than 5 s as abandoned.
    """
    if not broker.broker_url.startswith("redis"):
        yield broker
        return
    broker_url = with_redis_db(broker.broker_url, ISOLATED_REDIS_DB)
    queue = f"{broker.queue}-iso"
    app = create_app(broker_url, broker.result_backend, default_queue=queue, main=f"interop-{broker.name}-iso",
                     strict_control=True)
    setup = BrokerSetup(
        name=broker.name,
        broker_url=broker_url,
        result_backend=broker.result_backend,
        session_id=broker.session_id,
        queue=queue,
        py_queue=f"{broker.py_queue}-iso",
        app=app,
        queues_to_delete=[queue, f"{broker.py_queue}-iso"],
    )
    try:
        yield setup
    finally:
        app.close()
        _delete_queues(broker_url, setup.queues_to_delete)


def start_rust_worker(
    setup: BrokerSetup,
    queues: list[str],
    tag: str,
    concurrency: int = RUST_CONCURRENCY,
    task_events: bool = False,
    extra_env: dict[str, str] | None = None,
    binary: str = "worker",
) -> WorkerHandle:
    """Start a Rust worker on ``queues`` and wait (bounded) for its ``<hostname> ready.`` line.

    ``task_events`` passes ``-E`` (task events from the start); ``extra_env`` adds ``CELERY_*``
    overrides (e.g. ``CELERY_WORKER_HEARTBEAT_INTERVAL``); ``binary`` is the worker binary, ours
    or another crate's built on the runtime.
    """
    worker_bin = rust_binary(binary)
    config = rust_config()
    node = f"rust-{setup.session_id}-{tag}"
    argv = [
        worker_bin, "--config", config, "-Q", ",".join(queues), "-c", str(concurrency),
        "-n", f"{node}@%h", "--loglevel", "info",
    ]
    if task_events:
        argv.append("-E")
    env = setup.rust_env(
        default_queue=queues[0],
        CELERY_TASK_TRACK_STARTED="true",
        CELERY_RESULT_EXTENDED="true",
        **(extra_env or {}),
    )
    log_path = ARTIFACTS_DIR / f"rust-worker-{setup.name}-{node}.log"
    process = start_process(f"Rust worker {node}", argv, env, log_path)
    try:
        match = process.wait_for_log(ready_pattern(node), READY_TIMEOUT)
    except BaseException:
        process.stop()
        raise
    hostname = match.group("hostname")
    expected = f"{node}@{socket.gethostname()}"
    if hostname != expected:
        process.stop()
        pytest.fail(f"Rust worker logged node name {hostname!r}, expected {expected!r} (%h = hostname)")
    return WorkerHandle(setup=setup, hostname=hostname, queue=queues[0], process=process)


def stop_rust_worker(handle: WorkerHandle) -> None:
    """SIGTERM (then kill) and fail the teardown if the worker panicked at any point.

    A panic in a spawned task can leave the process running, so the tests alone may miss it.
    """
    handle.process.stop()
    panics = panic_lines(handle.process)
    if panics:
        pytest.fail(f"Rust worker {handle.hostname} panicked; log {handle.log_path}:\n" + "\n".join(panics[:10]),
                    pytrace=False)


@pytest.fixture(scope="session")
def rust(broker: BrokerSetup) -> WorkerHandle:
    """The shared Rust worker of this broker setup (``-c 8``, track_started, result_extended)."""
    handle = start_rust_worker(broker, [broker.queue], tag="main")
    try:
        yield handle
    finally:
        stop_rust_worker(handle)


@pytest.fixture(scope="session")
def rust_events(broker: BrokerSetup) -> WorkerHandle:
    """A second shared Rust worker, started with ``-E`` (task events from the start), ``-c 4``,
    consuming a queue of its own (``<queue>-events``); Flower watches it in test_monitoring."""
    handle = start_rust_worker(broker, [broker.new_queue("events")], tag="events", concurrency=4, task_events=True)
    try:
        yield handle
    finally:
        stop_rust_worker(handle)


def start_py_worker(
    setup: BrokerSetup,
    queues: list[str],
    node: str,
    concurrency: int = 2,
    extra_env: dict[str, str] | None = None,
) -> WorkerHandle:
    """Start a stock Python Celery worker (threads pool) named ``<node>@%h`` on ``queues`` and
    wait (bounded) for its ``ready.`` line. ``extra_env`` adds ``INTEROP_*`` settings of
    interop_app (``INTEROP_BROKER_TRANSPORT_OPTIONS``, ``INTEROP_TWIN_TASKS``)."""
    argv = [
        sys.executable, "-m", "celery", "-A", "interop_app", "worker",
        "-Q", ",".join(queues), "-c", str(concurrency), "-P", "threads", "-n", f"{node}@%h",
        "--without-gossip", "--without-mingle", "--loglevel", "info",
    ]
    # No --without-heartbeat: with events off the heart sends nothing, but its 2 s timer wakes the
    # event loop; without any timer a SIGTERM'd worker on AMQP sits in epoll ~10 s before exiting.
    log_path = ARTIFACTS_DIR / f"py-worker-{setup.name}-{node}.log"
    env = {**setup.python_env(queues[0]), **(extra_env or {})}
    process = start_process(f"Python worker {node}", argv, env, log_path, cwd=INTEROP_DIR)
    try:
        match = process.wait_for_log(ready_pattern(node), READY_TIMEOUT)
    except BaseException:
        process.stop()
        raise
    return WorkerHandle(setup=setup, hostname=match.group("hostname"), queue=queues[0], process=process)


@pytest.fixture(scope="session")
def py_worker(broker: BrokerSetup) -> WorkerHandle:
    """A stock Python Celery worker (threads pool) consuming ``broker.py_queue``."""
    handle = start_py_worker(broker, [broker.py_queue], node=f"py-{broker.session_id}")
    try:
        yield handle
    finally:
        handle.process.stop()


@pytest.fixture(scope="session")
def py_twin(broker: BrokerSetup) -> WorkerHandle:
    """A stock Python worker running the Python twins of the Rust tasks (``tasks.add``, ...) on a
    queue of its own: with ``py_worker``, the all-Python run a canvas is compared with."""
    queue = broker.new_queue("twin")
    handle = start_py_worker(broker, [queue], node=f"twin-{broker.session_id}",
                             extra_env={"INTEROP_TWIN_TASKS": "1"})
    try:
        yield handle
    finally:
        handle.process.stop()


@pytest.fixture
def spawn_py_worker(broker: BrokerSetup):
    """Start extra Python workers for one test:
    ``spawn_py_worker([queues], tag=..., concurrency=..., extra_env=..., setup=...)``
    (``setup`` defaults to ``broker``, e.g. ``isolated_broker``). Node ``py-<id8>-<tag>-<id4>@%h``.

    Each is stopped (SIGTERM, then kill) when the test ends, unless the test stopped it itself.
    """
    started: list[WorkerHandle] = []

    def spawn(queues: list[str], tag: str, concurrency: int = 2, extra_env: dict[str, str] | None = None,
              setup: BrokerSetup | None = None) -> WorkerHandle:
        setup = setup or broker
        handle = start_py_worker(setup, queues, node=f"py-{setup.session_id}-{tag}-{uuid.uuid4().hex[:4]}",
                                 concurrency=concurrency, extra_env=extra_env)
        started.append(handle)
        return handle

    try:
        yield spawn
    finally:
        for handle in started:
            handle.process.stop()


@pytest.fixture
def spawn_rust_worker(broker: BrokerSetup):
    """Start extra Rust workers for one test:
    ``spawn_rust_worker([queues], tag=..., concurrency=..., task_events=..., extra_env=..., setup=...,
    binary=...)`` (``setup`` defaults to ``broker``, e.g. ``isolated_broker``; ``binary`` to ours).

    Each is stopped (SIGTERM, then kill) when the test ends, unless the test stopped it itself.
    """
    started: list[WorkerHandle] = []

    def spawn(queues: list[str], tag: str, concurrency: int = 2, task_events: bool = False,
              extra_env: dict[str, str] | None = None, setup: BrokerSetup | None = None,
              binary: str = "worker") -> WorkerHandle:
        handle = start_rust_worker(setup or broker, queues, tag=f"{tag}-{uuid.uuid4().hex[:4]}", concurrency=concurrency,
                                   task_events=task_events, extra_env=extra_env, binary=binary)
        started.append(handle)
        return handle

    try:
        yield spawn
    finally:
        for handle in started:
            stop_rust_worker(handle)


# `make test` runs the suite in two pytest-xdist processes (`-n 2 --dist loadgroup -m "not alone"`),
# then the files of ALONE by themselves (`-m alone`): each of those loads the machine on purpose
# (chaos, a RabbitMQ cluster, Sentinel failovers) and measures what is lost against its own
# windows, which a neighbour's load would stretch. Files sharing a resource no two runs may use
# at once run in one process: the isolated Redis database (`isolated_broker`) is one per machine.
ALONE = {"test_chaos.py", "test_cluster.py", "test_sentinel.py"}
SERIAL_GROUPS = {"test_lease.py": "isolated-redis", "test_reliability.py": "isolated-redis"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Marks each test for `make test`'s two runs: ``alone`` for the files of ALONE; and a
    pytest-xdist group per file (or per SERIAL_GROUPS entry), so that under ``--dist loadgroup``
    a file's tests run in one process, in order, as they do without xdist."""
    for item in items:
        name = item.path.name
        if name in ALONE:
            item.add_marker(pytest.mark.alone)
        item.add_marker(pytest.mark.xdist_group(SERIAL_GROUPS.get(name, name)))
