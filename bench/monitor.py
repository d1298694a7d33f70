"""What the monitor costs (issue #20): a web process with ``CELERY_MONITOR=true`` recording the
events of our worker (``-E``) while it runs ``plan.monitor_tasks`` tasks, on each broker.

A run starts the monitor and the worker, waits until the monitor has recorded the worker (its
heartbeat: from then on it hears the worker's events), then times from the first task sent
(``loadgen``, which sends no ``task-sent``) until every task's row is final. The events recorded
are counted from the rows (a ``received_at``, ``started_at``, ``finished_at`` or ``sent_at`` is an
event recorded), and the web process's CPU over the same interval gives CPU-seconds per 10,000
events. The lag is how long after the worker ended its last task (its ``finished_at``) the
monitor's row showed it: near zero when the monitor keeps up, and the rate is then the worker's.
Results are ignored, so events are the only way a task's end reaches the history.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import psycopg
import redis

from figures import median, spread
from harness import (BROKERS, POSTGRES, RESULTS_URL, Plan, Recorder, delete_queue, loadgen, per, psql, server_pids,
                     web_app, worker)
from proctree import CpuMeter

# A heartbeat a second, so that the monitor is seen hearing the worker soon after it starts.
WORKER_ENV = {"CELERY_WORKER_HEARTBEAT_INTERVAL": "1"}
# Events a row holds, one timestamp column each.
EVENT_COLUMNS = ("sent_at", "received_at", "started_at", "finished_at")
POLL_SECONDS = 0.1


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"monitor bench: {what} within {timeout:.0f} s")
        time.sleep(POLL_SECONDS)


def one_run(broker: str, count: int) -> dict:
    tag = uuid.uuid4().hex[:8]
    queue, events_queue, web_queue = f"bench-monitor-{tag}", f"bench-monitor-events-{tag}", f"bench-web-{tag}"
    database = f"rcelery_bench_monitor_{tag}"
    psql(f"CREATE DATABASE {database}")
    try:
        with web_app("rust", broker, web_queue, extra_env={"CELERY_MONITOR": "true",
                                                            "CELERY_MONITOR_QUEUE": events_queue},
                     database=database) as (web, _), \
                worker("rust", broker, queue, 8, False, "monitor", WORKER_ENV, ("-E",)), \
                psycopg.connect(f"{POSTGRES}/{database}", autocommit=True) as db:
            def scalar(sql: str):
                return db.execute(sql).fetchone()[0]

            wait_until(lambda: scalar("SELECT count(*) FROM workers") > 0, 30, "the worker's heartbeat recorded")
            meter = CpuMeter({"web": [web.pid], **server_pids()})
            began = time.monotonic()
            loadgen(broker, queue, count, "publish", "--ignore-result")
            deadline = began + max(60.0, count / 200)
            while scalar("SELECT count(*) FROM task_history WHERE state_rank = 5") < count:
                if time.monotonic() > deadline:
                    break
                time.sleep(POLL_SECONDS)
            ended, ended_at = time.monotonic(), datetime.now(timezone.utc)
            cpu = meter.seconds()
            final, events, last_finished = db.execute(
                "SELECT count(*) FILTER (WHERE state_rank = 5), "
                + " + ".join(f"count({column})" for column in EVENT_COLUMNS)
                + ", max(finished_at) FROM task_history").fetchone()
    finally:
        psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        for name in (queue, events_queue, web_queue):
            delete_queue(broker, name)
    seconds = ended - began
    return {"seconds": seconds, "final": final, "events": events, "cpu": cpu,
            "lag_s": (ended_at - last_finished).total_seconds() if last_finished else float("nan")}


def run(rec: Recorder, plan: Plan) -> None:
    redis.Redis.from_url(RESULTS_URL).flushdb()
    for broker in BROKERS:
        print(f"== monitor, {broker}", flush=True)
        for rep in range(plan.reps):
            result = one_run(broker, plan.monitor_tasks)
            rec.add("monitor_events_per_s", broker, "rust", result["events"] / result["seconds"], rep=rep,
                    tasks=plan.monitor_tasks, final=result["final"], events=result["events"],
                    events_per_task=round(result["events"] / plan.monitor_tasks, 3),
                    seconds=round(result["seconds"], 2), lag_s=round(result["lag_s"], 2),
                    cpu_s=round(result["cpu"]["web"], 3))
            cpu = per(result["cpu"], result["events"], 10_000, "cpu_per_10k_events")
            rec.add("monitor_cpu_per_10k_events", broker, "rust", cpu.pop("web_cpu_per_10k_events"), rep=rep, **cpu)


def section(rec: Recorder, measured: str) -> list[str]:
    lines = ["## The monitor (issue #20)", "",
             f"Measured {measured}. A web process with `CELERY_MONITOR=true` records the events of our worker "
             "(`-E`, `-c 8`, results ignored) running `tasks.add`, sent by `loadgen` (256 in flight, no "
             "`task-sent`). Timed from the first task sent until every task's row is final; the events are "
             "those the rows show recorded. Lag: from the worker's last `finished_at` until the monitor's row "
             "showed it (near zero: the monitor kept up, and the rate is the worker's). CPU: the web process "
             "(all of it: the monitor shares it with an idle HTTP server), and PostgreSQL's beside it.", "",
             "| broker | tasks | final rows | events per task | events/s | lag s | web CPU-s per 10,000 events | "
             "PostgreSQL CPU-s per 10,000 events |", "|---|---|---|---|---|---|---|---|"]
    for broker in BROKERS:
        runs = [s for s in rec.samples if s["bench"] == "monitor_events_per_s" and s["broker"] == broker]
        if not runs:
            continue
        cpu = [s for s in rec.samples if s["bench"] == "monitor_cpu_per_10k_events" and s["broker"] == broker]
        lines.append(f"| {broker} | {runs[0]['tasks']:,} | {spread([s['final'] for s in runs])} | "
                     f"{spread([s['events_per_task'] for s in runs])} | {spread([s['value'] for s in runs])} | "
                     f"{median([s['lag_s'] for s in runs]):.2f} | {spread([s['value'] for s in cpu])} | "
                     f"{spread([s['postgres_cpu_per_10k_events'] for s in cpu if 'postgres_cpu_per_10k_events' in s])} |")
    if any(s["final"] < s["tasks"] for s in rec.samples if s["bench"] == "monitor_events_per_s"):
        lines += ["", "Fewer final rows than tasks: events were lost before the monitor recorded them, and the wait "
                      "ran to its bound (the larger of 60 s and a second per 200 tasks); the rate counts the events recorded over "
                      "that whole wait. Whether the worker or the monitor lost them, this table cannot tell."]
    return lines + [""]
