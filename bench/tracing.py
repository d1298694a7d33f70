"""What tracing costs (issue #20): our worker draining a queue, and our web app under wrk, with
spans off, on to a live OTLP/HTTP receiver, and on to a port where nothing listens.

Tracing is switched on by the environment alone (``OTEL_EXPORTER_OTLP_ENDPOINT``), with our
default batching (no ``OTEL_BSP_*`` set: a queue of 32,768 spans, batches of 2,048, sent every
5 s or when a batch is full). The receiver is ``interop/otlp_receiver.py``'s, in this process: it
decodes every span, so it takes CPU on the same 2 cores. Each run counts the spans it got, and
each run against the closed port counts the warning and error lines in the log: a collector
that does not answer should cost those, not tasks or requests.
"""

from __future__ import annotations

import re
import sys
import uuid

import redis

from figures import median, spread
from harness import (BROKERS, REPO, RESULTS_URL, Plan, Recorder, delete_queue, drain, free_port, per, purge_queue,
                     server_pids, sized, web_app, wrk)
from proctree import CpuMeter

sys.path.insert(0, str(REPO / "interop"))
from otlp_receiver import Receiver  # noqa: E402

# Off, on to the receiver, on to a closed port: alternated within each repetition.
MODES = ("off", "receiver", "closed-port")
# The wrk runs' connections: where our web app batches its writes (section 5).
RECEIVE_CONNECTIONS = 16


def otel_env(mode: str, receiver: Receiver) -> dict[str, str]:
    if mode == "off":
        return {}
    # A port free a moment ago: nothing listens there (nothing of ours binds it meanwhile).
    endpoint = receiver.endpoint if mode == "receiver" else f"http://127.0.0.1:{free_port()}"
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}


def complaints(logs) -> tuple[int, int]:
    """The OpenTelemetry SDK's warning and error lines in ``logs`` (what an unreachable collector
    costs), and the spans it says it dropped (its queue full)."""
    lines = [line for log in logs for line in log.read_text(errors="replace").splitlines()
             if (" WARN " in line or " ERROR " in line) and " opentelemetry" in line]
    dropped = [int(m.group(1)) for line in lines for m in [re.search(r"dropped_span_count=(\d+)", line)] if m]
    return len(lines), sum(dropped)


def bench_tracing(rec: Recorder, plan: Plan, broker: str, receiver: Receiver) -> None:
    """Worker throughput and CPU per 10,000 tasks (``-c 8``, results ignored and stored) in each
    mode, with the spans the receiver got."""
    guesses: dict[str, float] = {}
    for results in (False, True):
        stored = "stored" if results else "ignored"
        for rep in range(plan.reps):
            for mode in MODES:
                count = sized(guesses.get(f"{mode}-{stored}", 6_000), plan)
                before = len(receiver.received())
                # The worker has sent its last spans when it exits (drain waits for that).
                run = drain(broker, "rust", 8, results, count, extra_env=otel_env(mode, receiver))
                guesses[f"{mode}-{stored}"] = run["per_second"]
                spans = len(receiver.received()) - before
                warnings, dropped = complaints(run["logs"])
                rec.add("tracing_throughput", broker, mode, run["per_second"], results=stored, rep=rep, tasks=count,
                        spans=spans, spans_per_task=round(spans / count, 3), complaints=warnings,
                        dropped_spans=dropped)
                cpu = per(run["cpu"], run["cpu_tasks"], 10_000, "cpu_per_10k")
                rec.add("tracing_cpu_per_10k", broker, mode, cpu.pop("worker_cpu_per_10k"), results=stored, rep=rep,
                        cpu_s=round(run["cpu"]["worker"], 3), cpu_tasks=run["cpu_tasks"], **cpu)


def bench_receive_tracing(rec: Recorder, plan: Plan, broker: str, receiver: Receiver) -> None:
    """``POST /receive`` under wrk at 16 connections with spans off and on to the receiver: a web
    app started afresh for each run (the environment is read at start), logging warnings only as
    in section 5 (the log level does not choose spans)."""
    queue = f"bench-web-{uuid.uuid4().hex[:8]}"
    redis.Redis.from_url(RESULTS_URL).flushdb()
    for rep in range(plan.reps):
        for mode in MODES[:2]:
            env = otel_env(mode, receiver)
            with web_app("rust", broker, queue, extra_env=env) as (proc, port):
                before = len(receiver.received())
                meter = CpuMeter({"web": [proc.pid], **server_pids()})
                run = wrk(port, RECEIVE_CONNECTIONS, plan.http_seconds)
                cpu_s = meter.seconds()
            spans = len(receiver.received()) - before  # the web app has exited: all sent
            rec.add("tracing_receive_rps", broker, mode, run["per_second"], rep=rep, p50_ms=run["p50"] / 1000,
                    p99_ms=run["p99"] / 1000, errors=run["errors"], requests=run["requests"], spans=spans,
                    spans_per_request=round(spans / max(run["requests"], 1), 3))
            cpu = per(cpu_s, run["requests"], 1_000, "cpu_per_1k")
            rec.add("tracing_receive_cpu_per_1k", broker, mode, cpu.pop("web_cpu_per_1k"), rep=rep,
                    cpu_s=round(cpu_s["web"], 3), **cpu)
            purge_queue(broker, queue)
    delete_queue(broker, queue)


def run(rec: Recorder, plan: Plan) -> None:
    receiver = Receiver()
    try:
        for broker in BROKERS:
            print(f"== tracing, {broker}", flush=True)
            bench_tracing(rec, plan, broker, receiver)
            bench_receive_tracing(rec, plan, broker, receiver)
    finally:
        receiver.close()


def section(rec: Recorder, measured: str) -> list[str]:
    def of(bench: str, broker: str, mode: str, key: str = "value", **match) -> list[float]:
        return [s[key] for s in rec.samples if s["bench"] == bench and s["broker"] == broker
                and s["system"] == mode and key in s and all(s.get(k) == v for k, v in match.items())]

    def ratio(bench: str, broker: str, mode: str, **match) -> str:
        return f"{median(of(bench, broker, mode, **match)) / median(of(bench, broker, 'off', **match)):.2f}×"

    lines = ["## Tracing's cost (issue #20)", "",
             f"Measured {measured}. Our worker (`-c 8`, section 1's drain) and web app with spans off (no "
             "`OTEL_*` variable), on to a live OTLP/HTTP receiver in the bench process "
             "(`interop/otlp_receiver.py`, which decodes every span on the same 2 cores), and on to a "
             "closed port (nothing listening); the modes alternate within each repetition. Our default "
             "batching (no `OTEL_BSP_*` set: queue 32,768 spans, batches of 2,048, every 5 s). "
             "Spans: what the receiver got, per task (a `run/tasks.add` span each; the tasks send nothing). "
             "Warnings: the SDK's warning and error lines in the worker's log over the run, and the spans it "
             "says it dropped (its queue full). Ratios: medians, on / off.", ""]
    for broker in BROKERS:
        lines += [f"### {broker}: worker draining `tasks.add`", "",
                  "| results | mode | tasks/s | ratio | CPU-s per 10,000 tasks | ratio | spans per task | warnings | "
                  "spans dropped |", "|---|---|---|---|---|---|---|---|---|"]
        for stored in ("ignored", "stored"):
            for mode in MODES:
                lines.append(
                    f"| {stored} | {mode} | {spread(of('tracing_throughput', broker, mode, results=stored))} | "
                    f"{ratio('tracing_throughput', broker, mode, results=stored)} | "
                    f"{spread(of('tracing_cpu_per_10k', broker, mode, results=stored))} | "
                    f"{ratio('tracing_cpu_per_10k', broker, mode, results=stored)} | "
                    f"{spread(of('tracing_throughput', broker, mode, 'spans_per_task', results=stored))} | "
                    f"{spread(of('tracing_throughput', broker, mode, 'complaints', results=stored), whole=True)} | "
                    f"{spread(of('tracing_throughput', broker, mode, 'dropped_spans', results=stored), whole=True)} |")
        lines += ["", f"### {broker}: `POST /receive` under wrk, {RECEIVE_CONNECTIONS} connections", "",
                  "The web app started afresh for each run, logging warnings only (section 5's `RUST_LOG=warn`) "
                  "in both modes.",
                  "",
                  "| mode | requests/s | ratio | p50 / p99 ms | web CPU-s per 1,000 | ratio | spans per request |",
                  "|---|---|---|---|---|---|---|"]
        for mode in MODES[:2]:
            lines.append(
                f"| {mode} | {spread(of('tracing_receive_rps', broker, mode))} | "
                f"{ratio('tracing_receive_rps', broker, mode)} | "
                f"{median(of('tracing_receive_rps', broker, mode, 'p50_ms')):.2f} / "
                f"{median(of('tracing_receive_rps', broker, mode, 'p99_ms')):.2f} | "
                f"{spread(of('tracing_receive_cpu_per_1k', broker, mode))} | "
                f"{ratio('tracing_receive_cpu_per_1k', broker, mode)} | "
                f"{spread(of('tracing_receive_rps', broker, mode, 'spans_per_request'))} |")
        lines.append("")
    return lines
