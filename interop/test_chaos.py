"""Chaos, bounded and on loopback: nothing is lost while workers die and connections drop.

Per broker (``[rabbitmq]`` / ``[redis]``), on services of the test's own (a RabbitMQ vhost or Redis
databases 14 and 13 for the broker and results, and a private PostgreSQL server, see
``disruption``):

* a stock Python Celery client publishes ``CHAOS_TASKS`` tasks (``tasks.add`` and short
  ``tasks.sleep``) to 3 Rust workers (``-c 8``, ``task_acks_late``), spread over
  ``PUBLISH_SECONDS``;
* meanwhile one worker is SIGKILLed every ``KILL_EVERY`` s and started again, and every
  ``CUT_EVERY`` s every connection to the test's broker and results is cut (RabbitMQ
  ``close_all_connections`` on the vhost, Redis ``CLIENT KILL``);
* ``CHAOS_WEB_JOBS`` jobs go through ``POST /receive`` of a web app whose PostgreSQL is restarted
  once, a third of the way into the burst (clients retry a 503, as a client of the API would);
  every row, accepted or not, must reach a final state.

Then it counts: tasks published, tasks with a final state (and a right result), jobs accepted,
rows with a final state, tasks completed more than once. Nothing may be lost; a task may complete
twice only where its first run's worker was killed, or connections were cut, between that run
and the second (its ack could not reach the broker), where the client published it twice after
a publish error, or (a web job) where PostgreSQL went down before the web app recorded that the
broker had it (its outbox publishes it again: at least once, by design). Figures are printed (``-rP``) and written to
``interop/artifacts/chaos-<broker>.json``.

A second test, on Redis only, counts long tasks run twice: ``LONG_TASKS`` ``task_acks_late`` tasks
running past the visibility timeout while one worker is killed. A worker that lives renews what it
holds, so none may complete twice (the killed worker's come back and complete once elsewhere).

``make test`` runs it small (``CHAOS_TASKS=1500``, ``CHAOS_WEB_JOBS=300``); ``make chaos`` runs
10,000 tasks and 2,000 jobs per broker.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime

import pytest
import redis as redis_py

from conftest import REDIS_URL, BrokerSetup, WorkerHandle, start_rust_worker, stop_rust_worker
from disruption import (
    PrivatePostgres,
    close_rabbitmq_connections,
    kill_redis_clients,
    private_postgres,
    rabbitmq_vhost,
)
from interop_app import create_app
from interop_helpers import ARTIFACTS_DIR, psql, publish_until_taken, strip_ansi, wait_for, with_redis_db
from web_process import HOST, post_until_accepted, start_web, stop_web

CHAOS_TASKS = int(os.environ.get("CHAOS_TASKS", "1500"))
CHAOS_WEB_JOBS = int(os.environ.get("CHAOS_WEB_JOBS", "300"))
WORKERS = 3
CONCURRENCY = 8
KILL_EVERY = 3.0  # seconds between SIGKILLs
CUT_EVERY = 7.0  # seconds between connection cuts
PUBLISH_SECONDS = max(15.0, CHAOS_TASKS / 400)  # the publisher's pace, so chaos meets a live stream
# Seconds the web app's PostgreSQL stays down: long enough for /health, which answers from a
# check made every 2 s (web/src/probe.rs), to have seen it.
POSTGRES_OUTAGE = 4.0
VISIBILITY_TIMEOUT = 10  # Redis: a killed worker's unacked messages come back after this
BROKER_DB, RESULTS_DB = 14, 13  # Redis databases of this test alone
FINISH_TIMEOUT = 120.0 + CHAOS_TASKS / 50  # for every task to end once publishing is over
WEB_THREADS = 8
WORKER_ENV = {
    "CELERY_TASK_ACKS_LATE": "true",
    "CELERY_BROKER_TRANSPORT_OPTIONS": json.dumps({"visibility_timeout": VISIBILITY_TIMEOUT}),
}
_LOG_LINE = re.compile(r"^(\S+Z)\s.*\btask succeeded\b.*\bid=([0-9a-f-]{36})\b")


@dataclass
class Disruption:
    at: float  # time.time() it began
    until: float  # and ended
    kind: str  # "kill", "cut" or "postgres"
    worker: str | None = None  # the killed worker's hostname


@dataclass
class Cluster:
    """Three worker slots; a killed worker is replaced by a new one (a new node name)."""

    setup: BrokerSetup
    env: dict[str, str] = field(default_factory=lambda: dict(WORKER_ENV))
    live: dict[int, WorkerHandle] = field(default_factory=dict)
    every: list[WorkerHandle] = field(default_factory=list)
    generation: int = 0

    def start(self, slot: int) -> None:
        self.generation += 1
        handle = start_rust_worker(self.setup, [self.setup.queue], tag=f"chaos-w{slot}-g{self.generation}",
                                   concurrency=CONCURRENCY, extra_env=self.env)
        self.live[slot] = handle
        self.every.append(handle)

    def kill_one(self) -> str:
        slot = random.choice(sorted(self.live))
        victim = self.live[slot]
        victim.process.kill()
        self.start(slot)
        return victim.hostname

    def stop(self) -> None:
        for handle in self.live.values():
            stop_rust_worker(handle)


def succeeded_runs(handles: list[WorkerHandle]) -> dict[str, list[tuple[float, str]]]:
    """Task id -> every ``task succeeded`` line as (time, worker hostname), in time order."""
    runs: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for handle in handles:
        for line in handle.process.log_text().splitlines():
            match = _LOG_LINE.match(strip_ansi(line))
            if match:
                stamp = datetime.fromisoformat(match.group(1)).timestamp()
                runs[match.group(2)].append((stamp, handle.hostname))
    return {task_id: sorted(lines) for task_id, lines in runs.items()}


def unexplained_repeats(runs: dict[str, list[tuple[float, str]]], disruptions: list[Disruption],
                        republished: set[str], web_jobs: set[str]) -> list[str]:
    """Ids completed more than once with no reason: between the first completion and the next,
    neither was the first worker killed nor were connections cut (so its ack could not have been
    lost), nor (a web job) was PostgreSQL down, and the client did not publish it twice."""
    slack = 0.5  # seconds: log stamps and disruption times come from different processes

    def explains(d: Disruption, task_id: str, first_worker: str) -> bool:
        return (d.kind == "cut" or (d.kind == "kill" and d.worker == first_worker)
                or (d.kind == "postgres" and task_id in web_jobs))

    unexplained = []
    for task_id, lines in runs.items():
        if len(lines) < 2 or task_id in republished:
            continue
        (first_at, first_worker), (second_at, _) = lines[0], lines[1]
        if not any(d.at <= second_at + slack and d.until >= first_at - slack and explains(d, task_id, first_worker)
                   for d in disruptions):
            unexplained.append(task_id)
    return unexplained


@dataclass
class WebBurst:
    """``CHAOS_WEB_JOBS`` posts from ``WEB_THREADS`` keep-alive clients; a 503 or a dropped
    connection is retried (a refused job was never accepted). PostgreSQL is stopped for
    ``POSTGRES_OUTAGE`` s once a third of the jobs are in."""

    port: int
    postgres: PrivatePostgres
    accepted: dict[str, int] = field(default_factory=dict)  # task id -> x of tasks.add(x, 1)
    refused_503: int = 0
    slowest_503: float = 0.0  # seconds
    health_in_outage: tuple[int, dict] | None = None
    outage: Disruption | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _client(self, numbers: list[int]) -> None:
        def accepted(task_id: str, x: int) -> None:
            with self.lock:
                self.accepted[task_id] = x

        def refused(why: str, took: float) -> None:
            if not why.isdigit():
                return  # a dropped connection: posted again
            assert why == "503", f"POST /receive answered {why}"
            with self.lock:
                self.refused_503 += 1
                self.slowest_503 = max(self.slowest_503, took)

        post_until_accepted(self.port, numbers, accepted, refused)

    def _outage(self) -> None:
        wait_for(lambda: len(self.accepted) >= CHAOS_WEB_JOBS // 3, 120, interval=0.01,
                 describe="a third of the web jobs to be accepted")
        self.outage = Disruption(time.time(), 0.0, "postgres")
        self.postgres.stop("fast")
        ends = time.monotonic() + POSTGRES_OUTAGE
        try:
            # /health tells the outage once the probe's next check has met it. A 503 for the
            # broker alone (a connection cut of the chaos at that moment) is not that answer.
            while True:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
                conn.request("GET", "/health")
                response = conn.getresponse()
                self.health_in_outage = (response.status, json.loads(response.read()))
                conn.close()
                database_down = not self.health_in_outage[1].get("database", {}).get("ok", True)
                if database_down or time.monotonic() > ends - 0.5:
                    break
                time.sleep(0.1)
            time.sleep(max(0.0, ends - time.monotonic()))
        finally:
            self.postgres.start()
            self.outage.until = time.time()

    def run(self) -> None:
        numbers = list(range(CHAOS_WEB_JOBS))
        with ThreadPoolExecutor(WEB_THREADS + 1) as pool:
            futures = [pool.submit(self._client, numbers[i::WEB_THREADS]) for i in range(WEB_THREADS)]
            futures.append(pool.submit(self._outage))
            for future in futures:
                future.result()


@pytest.fixture(params=["rabbitmq", "redis"])
def chaos_setup(request):
    """A broker of the test's own: a vhost on RabbitMQ, database 14 on Redis; results in Redis
    database 13 (both emptied first: only this test uses them)."""
    session_id = uuid.uuid4().hex[:8]
    results_url = with_redis_db(REDIS_URL, RESULTS_DB)
    redis_py.Redis.from_url(results_url).flushdb()
    vhost = f"rcelery-chaos-{session_id}"
    if request.param == "rabbitmq":
        context = rabbitmq_vhost(vhost)
    else:
        broker_url = with_redis_db(REDIS_URL, BROKER_DB)
        redis_py.Redis.from_url(broker_url).flushdb()
        context = nullcontext(broker_url)
    with context as broker_url:
        queue = f"chaos-{session_id}"
        options = {"confirm_publish": True} if request.param == "rabbitmq" else None
        app = create_app(broker_url, results_url, default_queue=queue, main=f"chaos-{request.param}",
                         strict_control=True, transport_options=options)
        setup = BrokerSetup(name=request.param, broker_url=broker_url, result_backend=results_url,
                            session_id=session_id, queue=queue, py_queue=f"{queue}-py", app=app)
        try:
            yield setup, vhost
        finally:
            app.close()
            for url in (results_url, broker_url):
                if url.startswith("redis"):
                    redis_py.Redis.from_url(url).flushdb()


def cut_connections(setup: BrokerSetup, vhost: str) -> int:
    """Cuts every connection to the test's broker and results; returns Redis clients killed."""
    if setup.name == "rabbitmq":
        close_rabbitmq_connections(vhost)
        return kill_redis_clients(REDIS_URL, [RESULTS_DB])
    return kill_redis_clients(REDIS_URL, [BROKER_DB, RESULTS_DB])


@pytest.mark.timeout(int(600 + CHAOS_TASKS / 10))
def test_nothing_is_lost_under_chaos(chaos_setup):
    setup, vhost = chaos_setup
    began = time.monotonic()
    phases: dict[str, float] = {}  # seconds from the start until each phase ended
    plan = []
    for i in range(CHAOS_TASKS):
        if i % 3 == 0:
            seconds = round(random.uniform(0.01, 0.3), 3)
            plan.append((str(uuid.uuid4()), "tasks.sleep", [seconds], seconds))
        else:
            plan.append((str(uuid.uuid4()), "tasks.add", [i, i], 2 * i))
    published: list[str] = []
    publish_errors: Counter = Counter()
    republished: set[str] = set()

    def publish() -> None:
        pause = PUBLISH_SECONDS / max(1, len(plan))
        for task_id, name, args, _ in plan:
            publish_until_taken(setup.app, name, args, queue=setup.queue, task_id=task_id, attempts=100,
                                errors=publish_errors, republished=republished)
            published.append(task_id)
            time.sleep(pause)

    disruptions: list[Disruption] = []
    redis_clients_killed = 0
    stop = threading.Event()
    cluster = Cluster(setup)

    def chaos() -> None:
        nonlocal redis_clients_killed
        next_kill, next_cut = time.monotonic() + KILL_EVERY, time.monotonic() + CUT_EVERY / 2
        while not stop.wait(0.05):
            if time.monotonic() >= next_kill:
                at = time.time()
                victim = cluster.kill_one()
                disruptions.append(Disruption(at, time.time(), "kill", victim))
                next_kill = time.monotonic() + KILL_EVERY
            if time.monotonic() >= next_cut:
                at = time.time()
                redis_clients_killed += cut_connections(setup, vhost)
                disruptions.append(Disruption(at, time.time(), "cut"))
                next_cut = time.monotonic() + CUT_EVERY

    with private_postgres() as postgres:
        database = f"rcelery_chaos_{setup.session_id}"
        web = start_web(setup, database, tag="chaos", server=postgres.url)
        try:
            for slot in range(WORKERS):
                cluster.start(slot)
            burst = WebBurst(port=web.port, postgres=postgres)
            with ThreadPoolExecutor(3) as pool:
                chaos_done = pool.submit(chaos)
                try:
                    publishing = pool.submit(publish)
                    burst.run()
                    publishing.result()
                    phases["published"] = time.monotonic() - began
                    ids = list(published)
                    ended: dict[str, int] = {}

                    def all_ended() -> bool:
                        if chaos_done.done():
                            chaos_done.result()  # raises what stopped the chaos
                        # redis-py retries a command whose connection was cut.
                        metas = setup.result_metas(ids)
                        ended["count"] = sum(m is not None and m["status"] in ("SUCCESS", "FAILURE") for m in metas)
                        return ended["count"] == len(ids)

                    wait_for(all_ended, FINISH_TIMEOUT, interval=1.0,
                             describe=lambda: f"every published task to end ({ended.get('count')}/{len(ids)})")
                    phases["tasks_ended"] = time.monotonic() - began
                finally:
                    stop.set()
                    chaos_done.result()
            # The web rows catch up through the tracker and its sweep (every 5 s).
            accepted = dict(burst.accepted)

            def rows() -> dict[str, tuple[str, str]]:
                out = psql("SELECT task_id, state, coalesce(result::text, '') FROM tasks", database=database,
                           server=postgres.url)
                return {line.split("|")[0]: tuple(line.split("|")[1:]) for line in out.splitlines() if line}

            def web_done():
                current = rows()
                return (set(accepted) <= set(current)
                        and all(state in ("SUCCESS", "FAILURE") for state, _ in current.values()) and current)

            final_rows = wait_for(web_done, 120, interval=1.0,
                                  describe=lambda: "every row (each accepted job among them) to be final")
            phases["rows_final"] = time.monotonic() - began
        finally:
            cluster.stop()
            stop_web(web)
    elapsed = time.monotonic() - began

    planned = [task_id for task_id, *_ in plan]
    metas = {task_id: meta for task_id, meta in zip(planned, setup.result_metas(planned)) if meta}
    expected = {task_id: value for task_id, _, _, value in plan}
    lost = [task_id for task_id in published if task_id not in metas]
    wrong = [task_id for task_id in published if task_id in metas
             and (metas[task_id]["status"] != "SUCCESS" or metas[task_id]["result"] != expected[task_id])]
    web_lost = [task_id for task_id in accepted if final_rows.get(task_id, ("",))[0] not in ("SUCCESS", "FAILURE")]
    web_wrong = [task_id for task_id, x in accepted.items()
                 if final_rows[task_id][0] != "SUCCESS" or json.loads(final_rows[task_id][1]) != x + 1]
    runs = succeeded_runs(cluster.every)
    repeated = [task_id for task_id, lines in runs.items() if len(lines) > 1]
    if burst.outage is not None:
        disruptions.append(burst.outage)
    unexplained = unexplained_repeats(runs, disruptions, republished, set(accepted))
    kills = sum(d.kind == "kill" for d in disruptions)
    cuts = sum(d.kind == "cut" for d in disruptions)
    figures = {
        "broker": setup.name,
        "tasks_published": len(published),
        "tasks_final": sum(1 for task_id in published if task_id in metas),
        "tasks_lost": len(lost),
        "tasks_wrong": len(wrong),
        "publish_errors_retried": dict(publish_errors),
        "web_jobs_accepted": len(accepted),
        # Rows whose POST got no 202 (the commit's answer was lost with the connection): they
        # run all the same, and the client's retry is another job.
        "web_rows_not_answered_202": len(set(final_rows) - set(accepted)),
        "web_jobs_lost": len(web_lost),
        "web_jobs_wrong": len(web_wrong),
        "web_503_retried": burst.refused_503,
        "web_slowest_503_seconds": round(burst.slowest_503, 3),
        "health_during_outage": burst.health_in_outage,
        "completed_more_than_once": len(repeated),
        "repeats_unexplained": len(unexplained),
        "workers_killed": kills,
        "worker_processes": len(cluster.every),
        "connection_cuts": cuts,
        "redis_clients_killed": redis_clients_killed,
        "seconds": round(elapsed, 1),
        "phases_seconds": {name: round(at, 1) for name, at in phases.items()},
    }
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS_DIR / f"chaos-{setup.name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"[{setup.name}] chaos figures: {json.dumps(figures)}")

    assert kills >= 2 and cuts >= 1, f"too little chaos to mean anything: {figures}"
    assert not lost, f"{len(lost)} published tasks never ended, e.g. {lost[:5]}: {figures}"
    assert not wrong, f"{len(wrong)} tasks ended wrong, e.g. {[metas[i] for i in wrong[:3]]}"
    assert not web_lost, f"{len(web_lost)} accepted web jobs not final, e.g. {web_lost[:5]}: {figures}"
    assert not web_wrong, f"{len(web_wrong)} web jobs ended wrong, e.g. {[final_rows[i] for i in web_wrong[:3]]}"
    assert not unexplained, f"completed twice with no kill or cut between: {unexplained[:5]}: {figures}"
    assert burst.refused_503 > 0, "no POST /receive was answered 503 while PostgreSQL was down"
    status, health = burst.health_in_outage
    assert status == 503 and health["database"]["ok"] is False and health["database"]["error"], \
        f"/health while PostgreSQL was down: {burst.health_in_outage}"


# --------------------------------------------------------------------------------------------
# Long tasks on Redis: run once while their worker lives, again only when it was killed

LONG_TASKS = 24  # one per slot of the three workers
LONG_SECONDS = 15.0  # each, longer than VISIBILITY_TIMEOUT
KILL_AT = 5.0  # seconds after the tasks were sent, one worker is SIGKILLed and replaced
CUT_AT = 8.0  # and every connection to the test's Redis databases is cut


@pytest.mark.parametrize("chaos_setup", ["redis"], indirect=True)
@pytest.mark.timeout(240)
def test_long_tasks_run_twice_only_when_their_worker_dies(chaos_setup):
    """``LONG_TASKS`` acks_late tasks of ``LONG_SECONDS`` (past the visibility timeout) on three
    Rust workers taking one task per slot; one worker is killed ``KILL_AT`` s in and replaced, and
    ``CUT_AT`` s in every connection to the broker and results is cut. Counts tasks completed more
    than once: a worker that lives renews what it holds, over a connection it makes again, so only
    the killed worker's tasks may run again (they never completed on it), each once more."""
    setup, vhost = chaos_setup
    cluster = Cluster(setup, env={**WORKER_ENV, "CELERY_WORKER_PREFETCH_MULTIPLIER": "1"})
    began = time.monotonic()
    try:
        for slot in range(WORKERS):
            cluster.start(slot)
        ids = [str(uuid.uuid4()) for _ in range(LONG_TASKS)]
        sent = time.monotonic()
        for task_id in ids:
            setup.app.send_task("tasks.sleep", (LONG_SECONDS,), queue=setup.queue, task_id=task_id)
        wait_for(lambda: all(m and m["status"] == "STARTED" for m in setup.result_metas(ids)), 15, interval=0.1,
                 describe=lambda: f"all {LONG_TASKS} long tasks STARTED ({setup.result_metas(ids)})")
        time.sleep(max(0.0, sent + KILL_AT - time.monotonic()))  # the kill lands mid-run by design
        victim = cluster.live[0]
        held_by_victim = {i for i, m in zip(ids, setup.result_metas(ids)) if m["worker"] == victim.hostname}
        victim.process.kill()
        cluster.start(0)
        time.sleep(max(0.0, sent + CUT_AT - time.monotonic()))
        clients_cut = cut_connections(setup, vhost)

        def succeeded() -> int:
            return sum(1 for m in setup.result_metas(ids) if m and m["status"] == "SUCCESS")

        wait_for(lambda: succeeded() == LONG_TASKS, 120, interval=0.5,
                 describe=lambda: f"all {LONG_TASKS} long tasks SUCCESS (have {succeeded()})")
        # A copy restored late would complete up to a run later: wait that out, then count.
        time.sleep(LONG_SECONDS + 1)
    finally:
        cluster.stop()
    runs = succeeded_runs(cluster.every)
    twice = sorted(task_id for task_id in ids if len(runs.get(task_id, [])) > 1)
    figures = {
        "broker": setup.name,
        "long_tasks": LONG_TASKS,
        "seconds_each": LONG_SECONDS,
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "held_by_killed_worker": len(held_by_victim),
        "redis_clients_cut": clients_cut,
        "completed_more_than_once": len(twice),
        "of_which_held_by_killed_worker": len(set(twice) & held_by_victim),
        "most_completions": max((len(runs.get(task_id, [])) for task_id in ids), default=0),
        "seconds": round(time.monotonic() - began, 1),
    }
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS_DIR / "chaos-long-redis.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"[redis] long-task figures: {json.dumps(figures)}")
    assert held_by_victim, f"the killed worker held no long task: nothing was tested: {figures}"
    assert all(len(runs.get(task_id, [])) >= 1 for task_id in ids), f"a long task never completed: {figures}"
    assert not twice, f"long tasks completed more than once: {twice[:5]}: {figures}"
