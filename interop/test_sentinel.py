"""Redis Sentinel: the worker, the web app and a Python client follow the master over failovers.

The test starts its own Redis group from the installed ``redis-server``, in a temporary
directory, on free loopback ports: one master, one replica and three sentinels
(``redis-server <conf> --sentinel``, quorum 2, ``down-after-milliseconds`` 1000). Every process
under test is given only the sentinels' URLs (``sentinel://a;sentinel://b;sentinel://c``, broker in
database 0, results in database 1) and ``master_name``:

* a stock Python Celery client publishes ``SENTINEL_TASKS`` ``tasks.add`` over
  ``PUBLISH_SECONDS`` (kombu's sentinel transport) to a Rust worker (``task_acks_late``);
* ``SENTINEL_WEB_JOBS`` jobs go through ``POST /receive`` of a web app on the same URLs (and
  the Rust ``call`` client sends one more task at the end);
* meanwhile the master is failed over twice: ``SENTINEL FAILOVER`` (the old master becomes a
  replica), then the new master is SIGKILLed (the sentinels notice it down and promote the
  replica, the old master; the killed server stays down).

Then it counts tasks published and finished, web jobs accepted and final, tasks run twice, and
for each failover how long results stopped coming (the longest gap between two finished tasks
around it), for the Python client's tasks and the web app's jobs apart.

What may be lost, and why. Redis replication is asynchronous: a write the master acknowledged
and had not yet sent to its replica when it died is gone. And after ``SENTINEL FAILOVER`` the old
master stays a master, named by nobody, until the sentinels next look at it and make it a replica
(up to 10 s); it then drops everything written to it since. A client that moves only when its
connection breaks (kombu's sentinel transport, redis-py) writes there all that time: its tasks are
lost. Ours listen to the sentinels' ``+switch-master`` announcement and move at once, so they can
lose only what they wrote between the promotion and its announcement. The test requires exactly
that: nothing the web app accepted outside a promotion, and nothing the Python client published
outside a failover's window (until the old master is dead or a replica), may be lost; what was
lost inside is reported. Figures are printed (``-rP``) and written to
``interop/artifacts/sentinel.json``.

``make test`` runs it small (``SENTINEL_TASKS=600``, ``SENTINEL_WEB_JOBS=120``); ``make chaos``
runs it larger.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest
import redis as redis_py
from redis.sentinel import Sentinel

from conftest import BrokerSetup, start_rust_worker, stop_rust_worker
from interop_app import create_app
from interop_helpers import (
    ARTIFACTS_DIR,
    ManagedProcess,
    free_port,
    psql,
    publish_until_taken,
    run_call,
    start_process,
    wait_for,
)
from test_chaos import succeeded_runs
from web_process import own_database, post_until_accepted, running_web

SENTINEL_TASKS = int(os.environ.get("SENTINEL_TASKS", "600"))
SENTINEL_WEB_JOBS = int(os.environ.get("SENTINEL_WEB_JOBS", "120"))
# Long enough for both failovers and the 10 s a demoted master stays one (see `fail_over`).
PUBLISH_SECONDS = max(30.0, SENTINEL_TASKS / 100)
MASTER_NAME = "rcelery-sentinel"
DOWN_AFTER_MS = 1000
# A sentinel that led a failover leads none for the same master for twice this long.
FAILOVER_TIMEOUT_MS = 3000
VISIBILITY_TIMEOUT = 6  # seconds: unacked messages of a lost connection come back after this
WINDOW_SLACK = 1.0  # seconds counted into a failover's window on either side
SETTLE_SECONDS = 2.5 * VISIBILITY_TIMEOUT  # wait this long without progress before counting losses
WEB_THREADS = 4


@dataclass
class RedisGroup:
    """A master, its replica and three sentinels, each a ``redis-server`` of the test's own."""

    directory: Path
    servers: dict[int, ManagedProcess] = field(default_factory=dict)  # port -> process
    sentinels: dict[int, ManagedProcess] = field(default_factory=dict)

    def start_server(self, port: int, replica_of: int | None = None) -> None:
        data = self.directory / f"redis-{port}"
        data.mkdir()
        argv = [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                "--save", "", "--appendonly", "no"]
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.servers[port] = start_process(f"redis {port}", argv, os.environ, ARTIFACTS_DIR / f"sentinel-redis-{port}.log")

    def start_sentinel(self, port: int, master_port: int) -> None:
        conf = self.directory / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        argv = [shutil.which("redis-server"), str(conf), "--sentinel"]
        self.sentinels[port] = start_process(f"sentinel {port}", argv, os.environ,
                                             ARTIFACTS_DIR / f"sentinel-{port}.log")

    def sentinel(self, port: int) -> redis_py.Redis:
        return redis_py.Redis(host="127.0.0.1", port=port, socket_timeout=2, decode_responses=True)

    def master_port(self) -> int | None:
        """The master's port as every sentinel names it, or ``None`` while they disagree."""
        named = set()
        for port in self.sentinels:
            try:
                named.add(self.sentinel(port).sentinel_get_master_addr_by_name(MASTER_NAME))
            except redis_py.RedisError:
                return None
        return int(named.pop()[1]) if len(named) == 1 and None not in named else None

    def settled(self, master: int) -> bool:
        """Whether ``master`` is a master with an online, in-step replica, and every sentinel
        names it and knows the other sentinels and the replica: a failover can then happen."""
        if self.master_port() != master:
            return False
        info = redis_py.Redis(port=master, socket_timeout=2).info("replication")
        replica = info.get("slave0")
        if info.get("role") != "master" or not replica or replica.get("state") != "online":
            return False
        for port in self.sentinels:
            state = self.sentinel(port).sentinel_master(MASTER_NAME)
            if int(state["num-other-sentinels"]) < len(self.sentinels) - 1 or int(state["num-slaves"]) < 1:
                return False
            if "s_down" in state["flags"] or "o_down" in state["flags"]:
                return False
        return True

    def urls(self, db: int) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}/{db}" for port in self.sentinels)

    def master(self, db: int) -> redis_py.Redis:
        """A redis-py client of the current master (``decode_responses``), through the sentinels."""
        sentinel = Sentinel([("127.0.0.1", port) for port in self.sentinels], socket_timeout=2)
        return sentinel.master_for(MASTER_NAME, db=db, socket_timeout=5, decode_responses=True)

    def stop(self) -> None:
        for process in [*self.sentinels.values(), *self.servers.values()]:
            process.stop(signal.SIGTERM, timeout=10)


@pytest.fixture
def redis_group():
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (make services installs it)", pytrace=False)
    with tempfile.TemporaryDirectory(prefix="rcelery-sentinel-") as directory:
        group = RedisGroup(Path(directory))
        try:
            master, replica = free_port(), free_port()
            group.start_server(master)
            group.start_server(replica, replica_of=master)
            for _ in range(3):
                group.start_sentinel(free_port(), master)
            wait_for(lambda: group.settled(master), 30, interval=0.2,
                     describe="the sentinels to know the master, its replica and each other")
            yield group
        finally:
            group.stop()


class SentinelSetup(BrokerSetup):
    """A broker set-up whose Rust processes get the sentinels' ``master_name`` and whose result
    reads go to the current master."""

    group: RedisGroup

    def rust_env(self, default_queue: str | None = None, **extra: str) -> dict[str, str]:
        options = {"master_name": MASTER_NAME, "visibility_timeout": VISIBILITY_TIMEOUT}
        ours = {
            "CELERY_BROKER_TRANSPORT_OPTIONS": json.dumps(options),
            "CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS": json.dumps({"master_name": MASTER_NAME}),
            "CELERY_TASK_ACKS_LATE": "true",
        }
        return super().rust_env(default_queue, **{**ours, **extra})

    def redis_results(self) -> redis_py.Redis:
        return self.group.master(db=1)


@dataclass
class Failover:
    kind: str  # "SENTINEL FAILOVER" or "master killed"
    began: float  # time.time()
    old_master: int
    new_master: int = 0
    promoted_after: float = 0.0  # seconds until every sentinel named the new master
    # SENTINEL FAILOVER: seconds until the old master took the new one's data as its replica.
    # Until then it is a master nobody names, and what clients still connected to it write there
    # is dropped when it becomes a replica (the sentinels reconfigure it at their next look, at
    # most 10 s after the failover).
    demoted_after: float = 0.0

    @property
    def window(self) -> tuple[float, float]:
        """While a client that learns of the move only when its connection breaks may write
        where it is lost: until the old master is dead or a replica."""
        return self.began - WINDOW_SLACK, self.began + max(self.promoted_after, self.demoted_after) + WINDOW_SLACK

    @property
    def promotion(self) -> tuple[float, float]:
        """While a client that follows the sentinels' announcements may write where it is
        lost: until the new master is announced."""
        return self.began - WINDOW_SLACK, self.began + self.promoted_after + WINDOW_SLACK


def fail_over(group: RedisGroup, kill: bool) -> Failover:
    """Fails the master over (SIGKILL, or ``SENTINEL FAILOVER``) once the group can, and returns
    when the new master is named and the old one is a replica or dead."""
    old = group.master_port()
    assert old is not None
    wait_for(lambda: group.settled(old), 30, interval=0.1, describe="the group to be ready for a failover")
    event = Failover("master killed" if kill else "SENTINEL FAILOVER", time.time(), old)
    if kill:
        group.servers[old].kill()
    else:
        def accepted() -> bool:
            try:
                group.sentinel(next(iter(group.sentinels))).execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
            except redis_py.ResponseError as exc:
                # The sentinels have not had the replica's INFO yet (slow under load).
                if "NOGOODSLAVE" in str(exc):
                    return False
                raise
            return True

        wait_for(accepted, 10, interval=0.2, describe="a sentinel to accept SENTINEL FAILOVER")
    new = wait_for(lambda: (port := group.master_port()) not in (None, old) and port, 30, interval=0.05,
                   describe=f"the sentinels to promote a new master after {event.kind}")
    event.new_master, event.promoted_after = new, time.time() - event.began
    # A killed master stays dead: started again empty (no persistence here) it could pass its
    # emptiness on if the sentinels took it for the master again before demoting it.
    if not kill:
        def demoted() -> bool:
            return redis_py.Redis(port=old, socket_timeout=2).execute_command("ROLE")[0] == b"slave"

        wait_for(demoted, 30, interval=0.05, describe="the old master to become a replica")
        event.demoted_after = time.time() - event.began
    return event


@dataclass
class WebJobs:
    """``SENTINEL_WEB_JOBS`` posts from ``WEB_THREADS`` clients, each retried until a 202."""

    port: int
    accepted: dict[str, tuple[int, float]] = field(default_factory=dict)  # id -> (x, accepted at)
    refused: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, numbers: list[int], pause: float) -> None:
        def accepted(task_id: str, x: int) -> None:
            with self.lock:
                self.accepted[task_id] = (x, time.time())

        def refused(why: str, _took: float) -> None:
            with self.lock:
                self.refused[why] += 1

        post_until_accepted(self.port, numbers, accepted, refused, pause)

    def run(self) -> None:
        numbers = list(range(SENTINEL_WEB_JOBS))
        pause = PUBLISH_SECONDS * WEB_THREADS / max(1, SENTINEL_WEB_JOBS)
        with ThreadPoolExecutor(WEB_THREADS) as pool:
            for future in [pool.submit(self.client, numbers[i::WEB_THREADS], pause) for i in range(WEB_THREADS)]:
                future.result()


def stalls(done_at: list[float], failovers: list[Failover]) -> list[float]:
    """For each failover, the longest gap between two consecutive task completions from its
    start to the next failover (or 30 s after): how long the work stopped."""
    times = sorted(done_at)
    out = []
    ends = [event.began for event in failovers[1:]] + [failovers[-1].began + 30]
    for event, end in zip(failovers, ends):
        around = [t for t in times if event.began - 5 <= t <= end]
        before = [t for t in around if t <= event.began]
        points = ([before[-1]] if before else [event.began]) + [t for t in around if t > event.began]
        out.append(round(max((b - a for a, b in zip(points, points[1:])), default=float("inf")), 2))
    return out


def done_time(meta: dict) -> float:
    return datetime.fromisoformat(meta["date_done"]).replace(tzinfo=timezone.utc).timestamp()


@pytest.mark.timeout(int(240 + SENTINEL_TASKS / 20))
def test_worker_web_and_python_follow_the_master(redis_group):
    group = redis_group
    began = time.monotonic()
    session_id = uuid.uuid4().hex[:8]
    queue = f"sentinel-{session_id}"
    broker_url, results_url = group.urls(0), group.urls(1)
    app = create_app(broker_url, results_url, default_queue=queue, main="sentinel", strict_control=True,
                     transport_options={"master_name": MASTER_NAME, "visibility_timeout": VISIBILITY_TIMEOUT})
    app.conf.result_backend_transport_options = {"master_name": MASTER_NAME}
    setup = SentinelSetup(name="sentinel", broker_url=broker_url, result_backend=results_url,
                          session_id=session_id, queue=queue, py_queue=f"{queue}-py", app=app)
    setup.group = group

    plan = [(str(uuid.uuid4()), i) for i in range(SENTINEL_TASKS)]
    published: dict[str, float] = {}  # id -> time.time() the publish returned
    publish_errors: Counter = Counter()
    republished: set[str] = set()

    def publish() -> None:
        pause = PUBLISH_SECONDS / max(1, len(plan))
        for task_id, i in plan:
            publish_until_taken(app, "tasks.add", [i, i], queue=queue, task_id=task_id, attempts=300,
                                errors=publish_errors, republished=republished)
            published[task_id] = time.time()
            time.sleep(pause)

    failovers: list[Failover] = []

    def disrupt() -> None:
        time.sleep(PUBLISH_SECONDS * 0.1)
        failovers.append(fail_over(group, kill=False))
        # Past the failover timeout of the sentinel that led the first one (`fail_over` then
        # waits for the old master to be a replica in step): the second failover can happen.
        time.sleep(max(0.0, 2 * FAILOVER_TIMEOUT_MS / 1000 - failovers[-1].demoted_after))
        failovers.append(fail_over(group, kill=True))

    worker = start_rust_worker(setup, [queue], tag="sentinel", concurrency=8)
    database = f"rcelery_sentinel_{session_id}"
    try:
        with own_database(database), running_web(setup, database, tag="sentinel") as web:
            jobs = WebJobs(port=web.port)
            with ThreadPoolExecutor(3) as pool:
                running = [pool.submit(publish), pool.submit(jobs.run), pool.submit(disrupt)]
                for future in running:
                    future.result()
            phases = {"published": time.monotonic() - began}

            # Wait while results keep coming; what has not ended once they stop for
            # SETTLE_SECONDS (longer than a visibility-timeout restore) is lost.
            progress = {"count": -1, "at": time.monotonic()}
            ids = list(published)

            def settled() -> bool:
                metas = setup.result_metas(ids)
                count = sum(m is not None and m["status"] == "SUCCESS" for m in metas)
                if count != progress["count"]:
                    progress.update(count=count, at=time.monotonic())
                return count == len(ids) or time.monotonic() - progress["at"] > SETTLE_SECONDS

            wait_for(settled, 120 + SENTINEL_TASKS / 20, interval=0.5, describe=lambda: f"results to settle: {progress}")
            phases["tasks_settled"] = time.monotonic() - began

            progress.update(count=-1, at=time.monotonic())

            def rows() -> dict[str, str]:
                out = psql("SELECT task_id, state FROM tasks", database=database)
                return dict(line.split("|") for line in out.splitlines() if line)

            def web_settled() -> dict[str, str] | bool:
                current = rows()
                final = sum(state == "SUCCESS" for state in current.values())
                if final != progress["count"]:
                    progress.update(count=final, at=time.monotonic())
                done = final == len(current) or time.monotonic() - progress["at"] > SETTLE_SECONDS
                return done and current

            final_rows = wait_for(web_settled, 120, interval=0.5, describe=lambda: f"web rows to settle: {progress}")
            phases["rows_settled"] = time.monotonic() - began
            # Python reads results through the sentinels too (Celery's SentinelBackend).
            # (the last three that ended: one lost is counted below, not a read failure).
            sample = [task_id for task_id, meta in zip(ids, setup.result_metas(ids)) if meta][-3:]
            try:
                python_read = [app.AsyncResult(task_id).get(timeout=10) for task_id in sample]
            except Exception as exc:  # noqa: BLE001 - reported with the figures, then failed
                python_read = f"{type(exc).__name__}: {exc}"
            # The Rust `call` client, on the same URLs, after both failovers.
            called = run_call(setup.rust_env(), "tasks.add", args=[20, 22], wait=True, timeout=20)
    finally:
        stop_rust_worker(worker)
        app.close()

    metas = dict(zip(ids, setup.result_metas(ids)))
    expected = dict(plan)
    lost = [task_id for task_id in ids if not metas[task_id] or metas[task_id]["status"] != "SUCCESS"]
    wrong = [task_id for task_id in ids if task_id not in lost and metas[task_id]["result"] != 2 * expected[task_id]]

    def inside(at: float, windows: list[tuple[float, float]]) -> bool:
        return any(start <= at <= end for start, end in windows)

    lost_outside = [task_id for task_id in lost if not inside(published[task_id], [e.window for e in failovers])]
    web_lost = [task_id for task_id in jobs.accepted if final_rows.get(task_id) != "SUCCESS"]
    web_lost_outside = [task_id for task_id in web_lost
                        if not inside(jobs.accepted[task_id][1], [e.promotion for e in failovers])]
    runs = succeeded_runs([worker])
    repeated = [task_id for task_id, lines in runs.items() if len(lines) > 1]
    python_done = [done_time(meta) for meta in metas.values() if meta and meta.get("date_done")]
    web_metas = setup.result_metas(list(jobs.accepted))
    web_done = [done_time(meta) for meta in web_metas if meta and meta.get("date_done")]
    figures = {
        "tasks_published": len(ids),
        "tasks_done": len(ids) - len(lost),
        "tasks_lost": len(lost),
        "tasks_lost_by_failover": [
            sum(event.window[0] <= published[task_id] <= event.window[1] for task_id in lost) for event in failovers
        ],
        # When the lost tasks were published, in seconds from their failover's start: before 0,
        # acknowledged and not yet replicated; after, written to a master nobody names.
        "tasks_lost_published_seconds_after_failover": [
            [round(f(published[task_id] - event.began for task_id in lost
                     if event.window[0] <= published[task_id] <= event.window[1]), 2)
             for f in (min, max)] if any(event.window[0] <= published[task_id] <= event.window[1]
                                         for task_id in lost) else None
            for event in failovers
        ],
        "tasks_lost_outside_failover_windows": len(lost_outside),
        "tasks_wrong": len(wrong),
        "tasks_run_more_than_once": len(repeated),
        "publish_errors_retried": dict(publish_errors),
        "web_jobs_accepted": len(jobs.accepted),
        "web_rows": len(final_rows),
        "web_jobs_done": len(jobs.accepted) - len(web_lost),
        "web_jobs_lost": len(web_lost),
        "web_jobs_lost_outside_promotions": len(web_lost_outside),
        "web_posts_retried": dict(jobs.refused),
        "failovers": [
            {"kind": event.kind, "promoted_after_seconds": round(event.promoted_after, 2),
             "old_master_demoted_after_seconds": round(event.demoted_after, 2) or None,
             "python_tasks_stalled_seconds": python_stall, "web_jobs_stalled_seconds": web_stall}
            for event, python_stall, web_stall in zip(failovers, stalls(python_done, failovers),
                                                      stalls(web_done, failovers))
        ],
        "python_read_results": python_read,
        "seconds": round(time.monotonic() - began, 1),
        "phases_seconds": {name: round(at, 1) for name, at in phases.items()},
    }
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS_DIR / "sentinel.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"sentinel figures: {json.dumps(figures)}")

    assert len(failovers) == 2 and all(event.new_master for event in failovers), figures
    assert python_read == [2 * expected[task_id] for task_id in sample], figures
    assert called.returncode == 0 and called.value == 42, called
    assert not wrong, f"tasks ended with a wrong result: {wrong[:5]}: {figures}"
    assert not lost_outside, f"tasks published outside the failovers never ended: {lost_outside[:5]}: {figures}"
    # The web app (our client) follows the announcement: it may lose only what it published
    # before the new master was announced, never what it published while the old one lingered.
    assert not web_lost_outside, f"web jobs accepted after a promotion not final: {web_lost_outside[:5]}: {figures}"
    # Work goes on after the last failover: the tail of the run ended on the last new master.
    tail = [task_id for task_id, at in published.items() if at > failovers[-1].window[1]]
    assert tail and not set(tail) & set(lost), figures
    assert all(stall < 15 for stall in stalls(web_done, failovers)), figures
