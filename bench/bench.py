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
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import uuid

import redis

import history
import monitor
import tracing
from figures import fraction, lowest, median, share, spread
from harness import (BENCH_DIR, BIN, BROKERS, FULL, QUICK, REDIS_BROKER_DB, REDIS_RESULTS_DB, RESULTS, RESULTS_URL,
                     VENV_BIN, Plan, Recorder, delete_queue, drain, loadgen, per, purge_queue, server_pids, sized,
                     web_app, worker, wrk)
from proctree import CpuMeter, rss_mb

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
