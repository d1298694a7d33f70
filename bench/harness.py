"""What every part of ``make bench`` runs on: the services and binaries it measures, the plan of
a run's sizes, the recorder of samples, and the processes under test (our worker and web app,
Python's, ``loadgen``, ``wrk``) with the CPU they and the services spend. ``bench.py`` (ours
against Python Celery) and the parts of issue #20 (``tracing.py``, ``monitor.py``,
``history.py``) import it, and ``bench.py`` runs them.
"""

from __future__ import annotations

import functools
import json
import os
import signal
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


# The web apps (ours or the Flask twin) and wrk

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
