"""``make bench``: our worker and web app against Python Celery, side by side in one run.

Every measurement runs on both brokers, alternating Rust and Python repetition by repetition so
that the machine's noise falls on both; tables give the median and the range of the repetitions,
and ratios of medians. Beside the rates, the CPU-seconds each worker and web app (all their
processes) and each local service spent over the same runs (``proctree``): what a task or a
request costs, whatever share of the machine the broker takes. Raw samples go to
``bench/results/samples.jsonl``, the report to ``bench/RESULTS.md`` with charts in
``bench/results/``.

Services: the local RabbitMQ (queues named ``bench-<id>``), Redis databases 11 (broker) and 10
(results) of this benchmark alone (flushed), PostgreSQL databases ``rcelery_bench_*``.

Beside them, issue #20's figures, each part in a module of its own: what tracing costs
(``tracing.py``), what the monitor records and costs (``monitor.py``), and the task history's
queries on a table of 10 million rows (``history.py``). ``--only tracing,history`` runs some
parts alone (``workers`` is the side-by-side above).

``--quick`` runs one repetition of everything, small (under 3 minutes).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import amqp
import redis

from figures import fraction, lowest, median, share, spread
from proctree import CpuMeter, rss_mb

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
BIN = Path(os.environ.get("BENCH_BIN_DIR", REPO / "target" / "release"))
VENV_BIN = Path(sys.executable).parent
REDIS_BROKER_DB, REDIS_RESULTS_DB = 11, 10
BROKERS = {
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
    "redis": f"redis://127.0.0.1:6379/{REDIS_BROKER_DB}",
}
RESULTS_URL = f"redis://127.0.0.1:6379/{REDIS_RESULTS_DB}"
REDIS_BROKER = redis.Redis.from_url(BROKERS["redis"])
POSTGRES = "postgres://postgres@127.0.0.1:5432"


@dataclass
class Plan:
    reps: int
    seconds: float  # target length of one drain run
    rtt_calls: int
    publish_count: int
    http_seconds: int
    python_pools: list[tuple[str, int]]
    concurrencies: list[int]
    processes: list[int]
    loaded_queue: int  # messages queued for the memory-under-load run
    monitor_tasks: int  # tasks a run of the monitor's bench records
    history_rows: int  # rows seeded for the history's query plans


FULL = Plan(reps=3, seconds=8.0, rtt_calls=2000, publish_count=5000, http_seconds=10,
            python_pools=[("prefork", 2), ("threads", 8), ("gevent", 64)],
            concurrencies=[1, 8, 64, 512], processes=[1, 2, 4], loaded_queue=100_000,
            monitor_tasks=20_000, history_rows=10_000_000)
QUICK = Plan(reps=1, seconds=1.0, rtt_calls=200, publish_count=500, http_seconds=2,
             python_pools=[("prefork", 2)], concurrencies=[8, 64], processes=[1, 2], loaded_queue=10_000,
             monitor_tasks=2_000, history_rows=1_000_000)


class Recorder:
    """Appends every sample to ``samples.jsonl`` and keeps it for the report."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w")
        self.samples: list[dict] = []

    def add(self, bench: str, broker: str, system: str, value: float, **extra) -> None:
        sample = {"bench": bench, "broker": broker, "system": system, "value": value, **extra}
        self.samples.append(sample)
        self.file.write(json.dumps(sample) + "\n")
        self.file.flush()
        print(f"  {bench:<28} {broker:<8} {system:<26} {value:>12.1f} {json.dumps(extra) if extra else ''}",
              flush=True)

    def values(self, bench: str, broker: str, system: str, **match) -> list[float]:
        return [s["value"] for s in self.samples if s["bench"] == bench and s["broker"] == broker
                and s["system"] == system and all(s.get(k) == v for k, v in match.items())]


# --------------------------------------------------------------------------------------------
# Processes


# The local services, by the name of their first process (whose tree holds the rest, as
# PostgreSQL's backends): their CPU over a run says where the rest of the machine went. They
# serve whatever else runs on the machine too.
SERVERS = {"rabbitmq": "beam.smp", "redis": "redis-server", "postgres": "postgres"}


@functools.cache
def server_pids() -> dict[str, list[int]]:
    """The oldest process of each service found (a cluster's extra nodes start later)."""
    found = {}
    for service, name in SERVERS.items():
        out = subprocess.run(["pgrep", "-o", "-x", name], capture_output=True, text=True).stdout.split()
        if out:
            found[service] = [int(out[0])]
    return found


def settled(meter: CpuMeter, group: str, timeout: float = 3.0) -> dict[str, int]:
    """A reading of ``meter`` once ``group`` has gone quiet (at most one clock tick in 0.1 s):
    the queue is empty before the last tasks taken from it have run."""
    last = meter.ticks()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = meter.ticks()
        if now[group] - last[group] <= 1:
            return now
        last = now
    return last


def per(cpu: dict[str, float], count: int, unit: int, suffix: str) -> dict[str, float]:
    """Each group's CPU-seconds per ``unit`` of ``count`` things done, named ``<group>_<suffix>``."""
    return {f"{name}_{suffix}": round(seconds / max(count, 1) * unit, 4) for name, seconds in cpu.items()}


@contextmanager
def process(argv: list[str], env: dict, ready: Callable[[str], bool], log: Path, cwd: Path | None = None,
            timeout: float = 60) -> Iterator[subprocess.Popen]:
    """Runs ``argv`` until the block ends; waits until ``ready(log text)``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while not ready(log.read_text(errors="replace")):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} did not start; log {log}:\n{log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.05)
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def base_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "ROCKET_"))}
    env.update(extra)
    return env


def worker_log(tag: str, queue: str) -> Path:
    return RESULTS / "logs" / f"{tag}-{queue}.log"


@contextmanager
def worker(system: str, broker: str, queue: str, concurrency: int, results: bool, tag: str,
           extra_env: dict[str, str] | None = None, flags: tuple[str, ...] = ()) -> Iterator[subprocess.Popen]:
    """A Rust worker (``system`` ``rust``) or a Python one (``python-<pool>``) on ``queue``; a
    Rust one with ``extra_env`` added to its environment and ``flags`` to its arguments."""
    node = f"bench-{tag}-{uuid.uuid4().hex[:6]}@%h"
    log = worker_log(tag, queue)
    if system == "rust":
        env = base_env(**{"CELERY_BROKER_URL": BROKERS[broker], "CELERY_RESULT_BACKEND": RESULTS_URL,
                          "CELERY_TASK_ACKS_LATE": "true", "CELERY_TASK_TRACK_STARTED": "false",
                          "CELERY_RESULT_EXTENDED": "false", "CELERY_TASK_IGNORE_RESULT": str(not results).lower(),
                          **(extra_env or {})})
        # Info level, as the Python worker: both log a line per task.
        argv = [str(BIN / "worker"), "--config", str(REPO / "celeryconfig.toml"), "-Q", queue,
                "-c", str(concurrency), "-n", node, "--loglevel", "info", *flags]
        with process(argv, env, lambda text: " ready." in text, log) as proc:
            yield proc
        return
    pool = system.split("-", 1)[1]
    env = base_env(BENCH_BROKER_URL=BROKERS[broker], BENCH_RESULT_BACKEND=RESULTS_URL if results else "",
                   PYTHONUNBUFFERED="1")
    argv = [str(VENV_BIN / "celery"), "-A", "py_app", "worker", "-P", pool, "-c", str(concurrency), "-Q", queue,
            "-n", node, "--loglevel", "info", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    with process(argv, env, lambda text: " ready." in text, log, cwd=BENCH_DIR) as proc:
        yield proc


# --------------------------------------------------------------------------------------------
# Broker state


_amqp_channel = None


def depth(broker: str, queue: str) -> int:
    """Messages waiting in ``queue`` (not counting those delivered and unacked)."""
    global _amqp_channel
    if broker == "redis":
        return REDIS_BROKER.llen(queue)
    if _amqp_channel is None:
        connection = amqp.Connection("127.0.0.1:5672")
        connection.connect()
        _amqp_channel = connection.channel()
    try:
        return _amqp_channel.queue_declare(queue, passive=True).message_count
    except amqp.exceptions.NotFound:
        _amqp_channel = None  # the error closed the channel; start afresh
        return 0


def delete_queue(broker: str, queue: str) -> None:
    if broker == "redis":
        REDIS_BROKER.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
        return
    with amqp.Connection("127.0.0.1:5672") as connection:
        connection.channel().queue_delete(queue)



def purge_queue(broker: str, queue: str) -> None:
    if broker == "redis":
        REDIS_BROKER.delete(queue)
        return
    with amqp.Connection("127.0.0.1:5672") as connection:
        connection.channel().queue_purge(queue)


def loadgen(broker: str, queue: str, count: int, *args: str) -> dict:
    out = subprocess.run([str(BIN / "loadgen"), "--broker-url", BROKERS[broker], "--queue", queue,
                          "--count", str(count), *args], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


# --------------------------------------------------------------------------------------------
# 1, 6, 7. Draining a full queue


def drain(broker: str, system: str, concurrency: int, results: bool, count: int, processes: int = 1,
          extra_env: dict[str, str] | None = None) -> dict:
    """Fills a queue with ``count`` ``tasks.add``, starts ``processes`` workers (a Rust one with
    ``extra_env``) and times how long
    they take to empty it. Returns tasks/s, the largest RSS seen and the RSS over time (MB, all
    processes), and the CPU-seconds the workers (all processes) and each service used from the
    start of the timing until the workers went quiet, with ``cpu_tasks``, the tasks still queued
    at that start, and the workers' logs. What a worker took before then is left out of both, but
    for the prefetched tasks it had not run yet: in the CPU time only, they overstate it by at
    most a prefetch."""
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    redis.Redis.from_url(RESULTS_URL).flushdb()
    loadgen(broker, queue, count, "publish", *([] if results else ["--ignore-result"]))
    trace: list[float] = []
    with ExitStack() as stack:
        procs = [stack.enter_context(worker(system, broker, queue, concurrency, results, f"{system}-{i}",
                                            extra_env))
                 for i in range(processes)]
        meter = CpuMeter({"worker": [p.pid for p in procs], **server_pids()})
        cpu_tasks = depth(broker, queue)
        began = time.monotonic()
        done = None
        results_db = redis.Redis.from_url(RESULTS_URL)
        while time.monotonic() - began < 900:
            trace.append(sum(rss_mb(p.pid) for p in procs))
            left = depth(broker, queue)
            if left == 0 and (not results or results_db.dbsize() >= count):
                done = time.monotonic()
                break
            time.sleep(0.05)
        if done is None:
            raise RuntimeError(f"{system} did not drain {queue} in 900 s")
        cpu = meter.seconds(settled(meter, "worker"))
    delete_queue(broker, queue)
    seconds = done - began
    return {"per_second": count / seconds, "seconds": seconds, "peak_rss_mb": max(trace), "rss_trace": trace,
            "cpu": cpu, "cpu_tasks": cpu_tasks,
            "logs": [worker_log(f"{system}-{i}", queue) for i in range(processes)]}


def sized(rate_guess: float, plan: Plan) -> int:
    """Tasks for a run of about ``plan.seconds`` at ``rate_guess`` tasks/s."""
    return int(min(400_000, max(500, rate_guess * plan.seconds)))


# --------------------------------------------------------------------------------------------
# The benchmarks


def bench_throughput(rec: Recorder, plan: Plan, broker: str) -> None:
    """1. Worker throughput, results ignored and stored: Rust (-c 8) vs each Python pool."""
    guesses: dict[str, float] = {}
    systems = [("rust", 8)] + [(f"python-{pool}", c) for pool, c in plan.python_pools]
    for results in (False, True):
        mode = "stored" if results else "ignored"
        for rep in range(plan.reps):
            for system, concurrency in systems:
                key = f"{system}-{mode}"
                count = sized(guesses.get(key, 6_000 if system == "rust" else 800), plan)
                run = drain(broker, system, concurrency, results, count)
                guesses[key] = run["per_second"]
                rec.add("throughput", broker, system, run["per_second"], results=mode, rep=rep,
                        tasks=count, concurrency=concurrency, peak_rss_mb=round(run["peak_rss_mb"], 1))
                cpu = per(run["cpu"], run["cpu_tasks"], 10_000, "cpu_per_10k")
                rec.add("worker_cpu_per_10k", broker, system, cpu.pop("worker_cpu_per_10k"), results=mode,
                        rep=rep, cpu_s=round(run["cpu"]["worker"], 3), cpu_tasks=run["cpu_tasks"], **cpu)


# The worker's prefetch (-c 8, `worker_prefetch_multiplier` 4): the ceilings consume with it.
CEILING_PREFETCH = "32"


def bench_ceiling(rec: Recorder, plan: Plan, broker: str) -> None:
    """2. The ceiling: raw messages consumed and acked through our transport layer (no task
    logic), and a queue of real ``tasks.add`` messages drained by the broker's client crate
    alone (``ceiling``, nothing of ours)."""
    count = sized(8_000, plan)
    for rep in range(plan.reps):
        run = loadgen(broker, f"bench-ceiling-{uuid.uuid4().hex[:8]}", count, "ceiling", "--prefetch", CEILING_PREFETCH)
        rec.add("ceiling_consume", broker, "transport", run["consumed_per_second"], rep=rep,
                body_bytes=run["body_bytes"])
        rec.add("ceiling_publish", broker, "transport", run["published_per_second"], rep=rep)
        queue = f"bench-bare-{uuid.uuid4().hex[:8]}"
        loadgen(broker, queue, count, "publish", "--ignore-result")
        run = bare_ceiling(broker, queue, count)
        rec.add("ceiling_consume", broker, "bare-client", run["consumed_per_second"], rep=rep,
                message_bytes=run["message_bytes"], cpu_per_10k=round(run["cpu_s"] * 10_000 / count, 3))
        delete_queue(broker, queue)


def children_cpu_s() -> float:
    """CPU-seconds of this process's children that have ended and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bare_ceiling(broker: str, queue: str, count: int) -> dict:
    """The ``ceiling`` binary's figures, with the CPU-seconds it used (``cpu_s``)."""
    before = children_cpu_s()
    out = subprocess.run([str(BIN / "ceiling"), "--broker-url", BROKERS[broker], "--queue", queue,
                          "--count", str(count), "--prefetch", CEILING_PREFETCH,
                          "amqp" if broker == "rabbitmq" else "redis"],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"ceiling failed: {out.stderr[-2000:]}")
    return {**json.loads(out.stdout), "cpu_s": children_cpu_s() - before}


def bench_rtt(rec: Recorder, plan: Plan, broker: str) -> None:
    """3. ``send_task(...).get()`` round trips on an idle system, from a Python client."""
    from celery import Celery
    client = Celery("bench-client", broker=BROKERS[broker], backend=RESULTS_URL)
    client.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    for system, concurrency in [("rust", 8), ("python-prefork", 2)]:
        queue = f"bench-rtt-{uuid.uuid4().hex[:8]}"
        with worker(system, broker, queue, concurrency, True, f"rtt-{system}"):
            for _ in range(20):  # warm up connections and pools
                client.send_task("tasks.add", (1, 1), queue=queue).get(timeout=30)
            samples = []
            for i in range(plan.rtt_calls):
                began = time.perf_counter()
                assert client.send_task("tasks.add", (i, 1), queue=queue).get(timeout=30) == i + 1
                samples.append((time.perf_counter() - began) * 1000)
        delete_queue(broker, queue)
        samples.sort()
        rec.add("rtt_p50_ms", broker, system, statistics.median(samples))
        rec.add("rtt_p99_ms", broker, system, samples[int(len(samples) * 0.99) - 1])
        (RESULTS / f"rtt-{broker}-{system}.json").write_text(json.dumps(samples))
    client.close()


def bench_publish(rec: Recorder, plan: Plan, broker: str) -> None:
    """4. Publishing: our client vs Celery's ``apply_async`` loop (one at a time), and ours
    with 256 publishes in flight. One at a time, ours awaits each send and its confirmations in
    the background, all in by a flush at the end; Celery's publishes without confirms."""
    from celery import Celery
    client = Celery("bench-client", broker=BROKERS[broker])
    client.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)
    for rep in range(plan.reps):
        queue = f"bench-pub-{uuid.uuid4().hex[:8]}"
        run = loadgen(broker, queue, plan.publish_count, "--in-flight", "1", "publish", "--ignore-result")
        rec.add("publish_loop", broker, "rust", run["per_second"], rep=rep)
        run = loadgen(broker, queue, plan.publish_count * 4, "--in-flight", "256", "publish", "--ignore-result")
        rec.add("publish_pipelined", broker, "rust", run["per_second"], rep=rep)
        client.send_task("tasks.add", (0, 0), queue=queue)  # connect first
        began = time.perf_counter()
        for i in range(plan.publish_count):
            client.send_task("tasks.add", (i, i), queue=queue, ignore_result=True)
        rec.add("publish_loop", broker, "python", plan.publish_count / (time.perf_counter() - began), rep=rep)
        delete_queue(broker, queue)
    client.close()


def bench_scaling(rec: Recorder, plan: Plan, broker: str) -> None:
    """7. Rust worker throughput (results stored) by concurrency, and by worker processes."""
    count = sized(2_500, plan)  # half a throughput run's length: the scan has many points
    for rep in range(plan.reps):
        for concurrency in plan.concurrencies:
            run = drain(broker, "rust", concurrency, True, count)
            rec.add("scale_concurrency", broker, "rust", run["per_second"], concurrency=concurrency, rep=rep)
        for processes in plan.processes:
            run = drain(broker, "rust", 8, True, count, processes=processes)
            rec.add("scale_processes", broker, "rust", run["per_second"], processes=processes, rep=rep)


def bench_idle_memory(rec: Recorder, broker: str) -> None:
    """6. Resident memory of an idle worker, 3 s after it started."""
    for system, concurrency in [("rust", 8), ("python-prefork", 2)]:
        queue = f"bench-idle-{uuid.uuid4().hex[:8]}"
        with worker(system, broker, queue, concurrency, True, f"idle-{system}") as proc:
            time.sleep(3)
            rec.add("idle_rss_mb", broker, system, rss_mb(proc.pid))
        delete_queue(broker, queue)


def bench_loaded_memory(rec: Recorder, plan: Plan, broker: str) -> None:
    """6. Rust worker RSS over a drain of ``plan.loaded_queue`` messages (results stored): it
    stays flat when prefetch bounds what the worker holds."""
    run = drain(broker, "rust", 8, True, plan.loaded_queue)
    trace = run["rss_trace"]
    at = {f"at_{tenth}0pct_mb": trace[len(trace) * tenth // 10] for tenth in (1, 5, 9)}
    rec.add("loaded_rss_mb", broker, "rust", run["peak_rss_mb"], queued=plan.loaded_queue,
            per_second=run["per_second"], **at)


# 5. POST /receive under wrk

FLASK_JOBS_TABLE = """CREATE TABLE jobs (
    task_id UUID PRIMARY KEY, task_name TEXT NOT NULL, args JSONB NOT NULL,
    state TEXT NOT NULL DEFAULT 'PENDING', created_at TIMESTAMPTZ NOT NULL DEFAULT now())"""

WRK_SCRIPT = """wrk.method = "POST"
wrk.body = '{"task": "tasks.add", "args": [1, 2]}'
wrk.headers["Content-Type"] = "application/json"
"""


def wrk(port: int, connections: int, seconds: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT + 'done = function(summary, latency, requests)\n'
                     '  io.write(string.format("JSON {\\"requests\\": %d, \\"errors\\": %d, \\"p50\\": %f, \\"p99\\": %f}\\n",'
                     ' summary.requests, summary.errors.status + summary.errors.connect + summary.errors.read'
                     ' + summary.errors.write + summary.errors.timeout, latency:percentile(50), latency:percentile(99)))\n'
                     'end\n')
    out = subprocess.run(["wrk", "-t", str(min(2, connections)), "-c", str(connections), "-d", f"{seconds}s",
                          "-s", script.name, f"http://127.0.0.1:{port}/receive"],
                         capture_output=True, text=True, timeout=seconds + 60)
    os.unlink(script.name)
    line = next(l for l in out.stdout.splitlines() if l.startswith("JSON "))
    result = json.loads(line[5:])
    result["per_second"] = result["requests"] / seconds
    return result


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def psql(sql: str, database: str = "postgres") -> None:
    subprocess.run(["psql", f"{POSTGRES}/{database}", "-X", "-q", "-c", sql], check=True, capture_output=True)


def http_ok(port: int, path: str) -> bool:
    import http.client
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        connection.request("GET", path)
        return connection.getresponse().status < 500
    except OSError:
        return False


@contextmanager
def web_app(system: str, broker: str, queue: str, extra_env: dict[str, str] | None = None,
            database: str | None = None) -> Iterator[tuple[subprocess.Popen, int]]:
    """Our web app (``rust``) or the Flask twin (``python-flask``) on a database of its own,
    publishing to ``queue``; yields the process and its port. Ours with ``extra_env`` added to
    its environment, and on ``database`` when given (one the caller made, and drops)."""
    own = database is None
    database = database or f"rcelery_bench_{system.replace('-', '_')}_{uuid.uuid4().hex[:6]}"
    port = free_port()
    if own:
        psql(f"CREATE DATABASE {database}")
    if system == "rust":
        env = base_env(**{"CELERY_BROKER_URL": BROKERS[broker], "CELERY_RESULT_BACKEND": RESULTS_URL,
                          "CELERY_DATABASE_URL": f"{POSTGRES}/{database}", "CELERY_TASK_DEFAULT_QUEUE": queue,
                          "ROCKET_PORT": str(port), "ROCKET_ADDRESS": "127.0.0.1", "ROCKET_LOG_LEVEL": "critical",
                          "RUST_LOG": "warn", **(extra_env or {})})
        argv = [str(BIN / "web"), "--config", str(REPO / "celeryconfig.toml")]
        cwd = None
    else:
        psql(FLASK_JOBS_TABLE, database)
        env = base_env(BENCH_BROKER_URL=BROKERS[broker], BENCH_DATABASE_URL=f"{POSTGRES}/{database}",
                       BENCH_QUEUE=queue)
        argv = [str(VENV_BIN / "gunicorn"), "-w", str(2 * (os.cpu_count() or 1) + 1), "-b",
                f"127.0.0.1:{port}", "--log-level", "warning", "flask_app:web"]
        cwd = BENCH_DIR
    try:
        with process(argv, env, lambda _: http_ok(port, "/health"), RESULTS / "logs" / f"web-{system}.log",
                     cwd=cwd) as proc:
            yield proc, port
    finally:
        if own:
            psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def bench_receive(rec: Recorder, plan: Plan, broker: str) -> None:
    """5. ``POST /receive`` under wrk at 1, 16 and 64 connections: requests/s, latency, and the
    CPU-seconds of the web app's processes (and each service's) per 1,000 requests."""
    queue = f"bench-web-{uuid.uuid4().hex[:8]}"
    for system in ("rust", "python-flask"):
        with web_app(system, broker, queue) as (proc, port):
            for connections in (1, 16, 64):
                for rep in range(plan.reps):
                    meter = CpuMeter({"web": [proc.pid], **server_pids()})
                    run = wrk(port, connections, plan.http_seconds)
                    cpu_s = meter.seconds()
                    rec.add("receive_rps", broker, system, run["per_second"], connections=connections, rep=rep,
                            p50_ms=run["p50"] / 1000, p99_ms=run["p99"] / 1000, errors=run["errors"],
                            rss_mb=round(rss_mb(proc.pid), 1))
                    cpu = per(cpu_s, run["requests"], 1_000, "cpu_per_1k")
                    rec.add("receive_cpu_per_1k", broker, system, cpu.pop("web_cpu_per_1k"),
                            connections=connections, rep=rep, cpu_s=round(cpu_s["web"], 3),
                            requests=run["requests"], **cpu)
                    # Every run starts on an empty queue: a long one slows the broker down.
                    purge_queue(broker, queue)
    delete_queue(broker, queue)


# --------------------------------------------------------------------------------------------
# The report


def report(rec: Recorder, plan: Plan, quick: bool, started: float) -> str:
    versions = subprocess.run([str(VENV_BIN / "python"), "-c",
                               "import celery, kombu; print(celery.__version__, kombu.__version__)"],
                              capture_output=True, text=True).stdout.split()
    lines = [
        "# make bench: results",
        "",
        f"Generated by `make {'bench-quick' if quick else 'bench'}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}, "
        f"Celery {versions[0] if versions else '?'} / kombu {versions[1] if len(versions) > 1 else '?'}, "
        f"our binaries built `--release`. {plan.reps} repetition(s) each, Rust and Python alternating; "
        f"cells are median (min–max). Whole run {time.monotonic() - started:.0f} s. Raw samples: "
        "[results/samples.jsonl](results/samples.jsonl).",
        "",
    ]
    for broker in BROKERS:
        lines += [f"## {broker}", ""]
        lines += ["### 1. Worker throughput, `tasks.add`, tasks/s (queue pre-filled)", "",
                  "| system | results ignored | results stored | peak RSS MB |", "|---|---|---|---|"]
        systems = ["rust"] + [f"python-{p}" for p, _ in plan.python_pools]
        for system in systems:
            peaks = [s["peak_rss_mb"] for s in rec.samples if s["bench"] == "throughput" and s["broker"] == broker
                     and s["system"] == system]
            lines.append(f"| {system} | {spread(rec.values('throughput', broker, system, results='ignored'))} | "
                         f"{spread(rec.values('throughput', broker, system, results='stored'))} | "
                         f"{max(peaks) if peaks else '–'} |")
        for mode in ("ignored", "stored"):
            best = max(systems[1:], key=lambda s: median(rec.values("throughput", broker, s, results=mode)) or 0)
            ratio = median(rec.values("throughput", broker, "rust", results=mode)) / median(
                rec.values("throughput", broker, best, results=mode))
            lines.append(f"\nResults {mode}: Rust is **{ratio:.1f}×** Python's best pool ({best}).")
        lines += worker_cpu_section(rec, broker, systems)
        lines += ceiling_section(rec, broker)
        lines += ["### 3. Round trip, Python `send_task(...).get()` on an idle system, ms", "",
                  "| worker | p50 | p99 |", "|---|---|---|"]
        for system in ("rust", "python-prefork"):
            lines.append(f"| {system} | {spread(rec.values('rtt_p50_ms', broker, system))} | "
                         f"{spread(rec.values('rtt_p99_ms', broker, system))} |")
        lines += ["", "### 4. Publishing, messages/s", "", "| client | one at a time | 256 in flight |", "|---|---|---|",
                  f"| rust (`loadgen`, our client, confirmed) | {spread(rec.values('publish_loop', broker, 'rust'))} | "
                  f"{spread(rec.values('publish_pipelined', broker, 'rust'))} |",
                  f"| python (`send_task` loop, unconfirmed) | {spread(rec.values('publish_loop', broker, 'python'))} | – |", ""]
        lines += ["### 5. `POST /receive` (insert row + publish), requests/s under wrk", "",
                  "| connections | rust (Rocket) | python (Flask + gunicorn) | ratio | rust p50 / p99 ms | python p50 / p99 ms |",
                  "|---|---|---|---|---|---|"]
        for connections in (1, 16, 64):
            def of(system, key="value"):
                return [s[key] for s in rec.samples if s["bench"] == "receive_rps" and s["broker"] == broker
                        and s["system"] == system and s["connections"] == connections]
            ratio = median(of("rust")) / median(of("python-flask")) if of("python-flask") else float("nan")
            lines.append(f"| {connections} | {spread(of('rust'))} | {spread(of('python-flask'))} | {ratio:.1f}× | "
                         f"{median(of('rust', 'p50_ms')):.2f} / {median(of('rust', 'p99_ms')):.2f} | "
                         f"{median(of('python-flask', 'p50_ms')):.2f} / {median(of('python-flask', 'p99_ms')):.2f} |")
        lines += receive_cpu_section(rec, broker)
        web_rss = [s["rss_mb"] for s in rec.samples if s["bench"] == "receive_rps" and s["broker"] == broker
                   and s["system"] == "rust"]
        lines += ["", "### 6. Memory, MB", "",
                  f"Idle worker RSS: rust {spread(rec.values('idle_rss_mb', broker, 'rust'))}, python prefork -c 2 "
                  f"(all processes) {spread(rec.values('idle_rss_mb', broker, 'python-prefork'))}. Under load (the "
                  f"throughput runs, queue pre-filled): see the peak RSS column above. Web app RSS under wrk: "
                  f"{max(web_rss) if web_rss else '–'} MB at most.", ""]
        for run in (s for s in rec.samples if s["bench"] == "loaded_rss_mb" and s["broker"] == broker):
            lines += [f"Rust worker draining {run['queued']:,} queued tasks (results stored, "
                      f"{run['per_second']:,.0f}/s): RSS {run['at_10pct_mb']:.1f} MB a tenth of the way through, "
                      f"{run['at_50pct_mb']:.1f} halfway, {run['at_90pct_mb']:.1f} at nine tenths, "
                      f"{run['value']:.1f} at most; it grew {run['at_90pct_mb'] - run['at_10pct_mb']:+.1f} MB "
                      f"from a tenth to nine tenths (prefetch bounds what the worker holds).", ""]
        lines += ["### 7. Scaling of the Rust worker (results stored), tasks/s", "",
                  "| -c | tasks/s |", "|---|---|"]
        for c in plan.concurrencies:
            lines.append(f"| {c} | {spread(rec.values('scale_concurrency', broker, 'rust', concurrency=c))} |")
        lines += ["", "| worker processes (-c 8 each) | tasks/s |", "|---|---|"]
        for p in plan.processes:
            lines.append(f"| {p} | {spread(rec.values('scale_processes', broker, 'rust', processes=p))} |")
        lines += ["", f"![throughput](results/throughput-{broker}.png) ![CPU per task](results/cpu-{broker}.png) "
                  f"![round trips](results/rtt-{broker}.png)", ""]
    return "\n".join(lines) + "\n"


def worker_cpu_section(rec: Recorder, broker: str, systems: list[str]) -> list[str]:
    """1b. CPU-seconds per 10,000 tasks of each worker over the throughput runs, and ours as a
    fraction of Python's cheapest pool."""
    def cell(key: str, system: str, mode: str) -> str:
        return spread([s[key] for s in rec.samples if s["bench"] == "worker_cpu_per_10k"
                       and s["broker"] == broker and s["system"] == system and s["results"] == mode and key in s])
    lines = ["", "### 1b. Worker CPU, CPU-seconds per 10,000 tasks (same runs as above)", "",
             "The worker's processes (all of them: a prefork pool's children too), from the start of the timing "
             f"until the worker is idle again; beside it, the {broker} server's over the same interval "
             "(it serves whatever else runs on this machine too; with results stored, the Redis results "
             "backend's CPU is in the raw samples).", "",
             f"| system | results ignored | results stored | {broker} server, ignored | {broker} server, stored |",
             "|---|---|---|---|---|"]
    for system in systems:
        lines.append(f"| {system} | {cell('value', system, 'ignored')} | {cell('value', system, 'stored')} | "
                     f"{cell(f'{broker}_cpu_per_10k', system, 'ignored')} | "
                     f"{cell(f'{broker}_cpu_per_10k', system, 'stored')} |")
    for mode in ("ignored", "stored"):
        cost = {s: median(rec.values("worker_cpu_per_10k", broker, s, results=mode)) for s in systems}
        best = lowest({s: cost[s] for s in systems[1:]})
        if best:
            lines.append(f"\nResults {mode}, our worker's CPU per task against Python's cheapest pool's ({best}): "
                         f"{fraction(cost['rust'], cost[best], 20)}.")
    return lines + [""]


def ceiling_section(rec: Recorder, broker: str) -> list[str]:
    """2. What consuming costs with nothing of ours, with our transport, and with our worker."""
    client = "`lapin`" if broker == "rabbitmq" else "`redis` crate"
    bare = rec.values("ceiling_consume", broker, "bare-client")
    transport = rec.values("ceiling_consume", broker, "transport")
    worker = rec.values("throughput", broker, "rust", results="ignored")
    bare_samples = [s for s in rec.samples if s["bench"] == "ceiling_consume"
                    and s["broker"] == broker and s["system"] == "bare-client"]
    sizes = [s.get("message_bytes") for s in bare_samples]
    bare_cpu = [s["cpu_per_10k"] for s in bare_samples if "cpu_per_10k" in s]
    worker_cpu = rec.values("worker_cpu_per_10k", broker, "rust", results="ignored")
    what = "AMQP body" if broker == "rabbitmq" else "Redis envelope"
    return ["### 2. Ceiling, consume + ack, messages/s (queue pre-filled, prefetch 32, one ack per message)", "",
            "| consumer | messages/s | CPU-seconds per 10,000 |", "|---|---|---|",
            f"| bare {client} client, nothing of ours (`ceiling`), real `tasks.add` messages | {spread(bare)} | "
            f"{spread(bare_cpu)} |",
            f"| our transport layer, no task logic (`loadgen ceiling`) | {spread(transport)} | – |",
            f"| our worker, `tasks.add`, results ignored (section 1) | {spread(worker)} | {spread(worker_cpu)} |", "",
            f"Our transport against the bare client: {share(median(transport), median(bare), 80)}; the worker "
            f"against our transport: {share(median(worker), median(transport), 90)}. Publishing through our transport: "
            f"{spread(rec.values('ceiling_publish', broker, 'transport'))} msg/s. The bare client's messages: "
            f"{max(sizes) if sizes else '–'} bytes ({what}).", ""]


def receive_cpu_section(rec: Recorder, broker: str) -> list[str]:
    """5b. CPU-seconds per 1,000 ``POST /receive`` of each web app over the wrk runs above."""
    def of(system: str, connections: int, key: str = "value") -> list[float]:
        return [s[key] for s in rec.samples if s["bench"] == "receive_cpu_per_1k" and s["broker"] == broker
                and s["system"] == system and s["connections"] == connections and key in s]
    lines = ["", "### 5b. `POST /receive` CPU, CPU-seconds per 1,000 requests (same runs as above)", "",
             "Our web process against gunicorn's master and workers; PostgreSQL's (all its processes) beside "
             "each, over the same interval.", "",
             "| connections | rust (Rocket) | python (Flask + gunicorn) | ours / Flask's | "
             "PostgreSQL with rust | PostgreSQL with python |", "|---|---|---|---|---|---|"]
    for connections in (1, 16, 64):
        lines.append(f"| {connections} | {spread(of('rust', connections))} | "
                     f"{spread(of('python-flask', connections))} | "
                     f"{fraction(median(of('rust', connections)), median(of('python-flask', connections)), 10)} | "
                     f"{spread(of('rust', connections, 'postgres_cpu_per_1k'))} | "
                     f"{spread(of('python-flask', connections, 'postgres_cpu_per_1k'))} |")
    return lines


def charts(rec: Recorder, plan: Plan) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def per_system_bars(broker: str, metric: str, ylabel: str, title: str, name: str,
                        label: str | None = None) -> None:
        """One bar per system and results mode: the medians of `metric`."""
        systems = ["rust"] + [f"python-{p}" for p, _ in plan.python_pools]
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.38
        for i, mode in enumerate(("ignored", "stored")):
            bars = ax.bar([x + i * width for x in range(len(systems))],
                          [median(rec.values(metric, broker, s, results=mode)) for s in systems],
                          width, label=f"results {mode}")
            if label:
                ax.bar_label(bars, fmt=label, fontsize=8)
        ax.set_xticks([x + width / 2 for x in range(len(systems))], systems)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / f"{name}-{broker}.png", dpi=100)
        plt.close(fig)

    for broker in BROKERS:
        per_system_bars(broker, "throughput", "tasks/s (median)",
                        f"Worker throughput, tasks.add, {broker}", "throughput")
        per_system_bars(broker, "worker_cpu_per_10k", "CPU-seconds per 10,000 tasks (median)",
                        f"Worker CPU per task, tasks.add, {broker} (lower is better)", "cpu", "%.2f")
        fig, ax = plt.subplots(figsize=(7, 4))
        for system in ("rust", "python-prefork"):
            path = RESULTS / f"rtt-{broker}-{system}.json"
            if path.exists():
                samples = json.loads(path.read_text())
                ax.plot(samples, [(i + 1) / len(samples) for i in range(len(samples))], label=system)
        ax.set_xscale("log")
        ax.set_xlabel("send_task().get() round trip, ms (log)")
        ax.set_ylabel("fraction of calls")
        ax.set_title(f"Round-trip latency CDF, {broker}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / f"rtt-{broker}.png", dpi=100)
        plt.close(fig)


def with_sections(text: str, sections: list[list[str]]) -> str:
    """The report ``text`` with each of ``sections`` in place of its section of the same title
    (its first line, a ``## `` heading), or after the others if it has none."""
    blocks = re.split(r"(?m)^(?=## )", text)
    for section in sections:
        titled = [i for i, block in enumerate(blocks) if block.split("\n", 1)[0] == section[0]]
        if titled:
            blocks[titled[0]] = "\n".join(section) + "\n"
        else:
            blocks[-1] = blocks[-1].rstrip("\n") + "\n\n"
            blocks.append("\n".join(section) + "\n")
    return "".join(blocks)


# What `--only` picks from: the side-by-side benches above, and issue #20's parts, each in a
# module of its own with `run(rec, plan)` and `section(rec, measured)`.
PARTS = ("workers", "tracing", "monitor", "history")


def parts_of(text: str) -> list[str]:
    parts = text.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise argparse.ArgumentTypeError(f"no part {', '.join(sorted(unknown))}; parts: {', '.join(PARTS)}")
    return parts


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", type=parts_of, default=list(PARTS), metavar="PART,...",
                        help=f"run only these of {', '.join(PARTS)}. Without `workers`, their sections take "
                             "the place of the same sections in RESULTS.md, the rest of it kept, and the samples "
                             "go to results/samples-<parts>.jsonl")
    args = parser.parse_args()
    # The parts' modules import this one by name: let them have it, not a second copy of it.
    sys.modules.setdefault("bench", sys.modules[__name__])
    import history
    import monitor
    import tracing
    modules = {"tracing": tracing, "monitor": monitor, "history": history}
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
    whole = "workers" in args.only
    rec = Recorder(RESULTS / ("samples.jsonl" if whole else f"samples-{'-'.join(args.only)}.jsonl"))
    for db in (REDIS_BROKER_DB, REDIS_RESULTS_DB):
        redis.Redis(db=db).flushdb()
    if whole:
        for broker in BROKERS:
            print(f"== {broker}", flush=True)
            bench_idle_memory(rec, broker)
            bench_loaded_memory(rec, plan, broker)
            bench_ceiling(rec, plan, broker)
            bench_throughput(rec, plan, broker)
            bench_rtt(rec, plan, broker)
            bench_publish(rec, plan, broker)
            bench_receive(rec, plan, broker)
            bench_scaling(rec, plan, broker)
    sections = []
    for part in (part for part in PARTS if part in modules and part in args.only):
        began = utc_now()
        modules[part].run(rec, plan)
        measured = f"{began}–{utc_now()[11:]} UTC by `{' '.join(['bench.py', *sys.argv[1:]])}`"
        sections.append(modules[part].section(rec, measured))
    path = BENCH_DIR / "RESULTS.md"
    if whole:
        charts(rec, plan)
        path.write_text(with_sections(report(rec, plan, args.quick, started), sections))
    else:
        path.write_text(with_sections(path.read_text() if path.exists() else "", sections))
    print(f"bench: wrote {path} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
