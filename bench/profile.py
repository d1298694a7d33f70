"""``make profile``: where the CPU time goes while our worker drains a queue and while our web
app takes ``POST /receive`` under wrk, on each broker.

For each case it records two things over the same interval:
- the CPU seconds each program on the machine used (``/proc/<pid>/stat``): ours, the broker,
  PostgreSQL, the load tool; on 2 cores this says who the bottleneck is;
- a ``perf`` profile of our process (DWARF call stacks, ``cpu-clock`` sampling, so it works where
  hardware counters do not), drawn as a flame graph with inferno, and summed by component.

Writes ``bench/PROFILE.md`` and ``bench/results/profile/*.svg``. Binaries come from the
``profiling`` cargo profile (release with line tables). Bounded: one drain of ``--tasks`` and
one wrk run of ``--seconds`` per broker.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

BENCH_DIR = Path(__file__).resolve().parent
os.environ.setdefault("BENCH_BIN_DIR", str(BENCH_DIR.parent / "target" / "profiling"))
sys.path.insert(0, str(BENCH_DIR))

import harness  # noqa: E402  (needs BENCH_BIN_DIR set first)

OUT = harness.RESULTS / "profile"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Where a sampled leaf frame belongs, by the first pattern it holds (order matters).
COMPONENTS = [
    ("kernel (syscalls, network, scheduling)", ("_[k]",)),
    ("JSON (serde_json)", ("serde_json::", "serde::")),
    ("AMQP client (lapin, amq-protocol)", ("lapin::", "amq_protocol", "pinky_swear", "flume::", "nom::")),
    ("Redis client", ("redis::", "combine::")),
    ("PostgreSQL client (diesel, tokio-postgres)", ("diesel", "tokio_postgres", "postgres_protocol",
                                                    "deadpool")),
    ("HTTP (Rocket, hyper)", ("rocket", "hyper", "http::")),
    ("logging (tracing)", ("tracing", "nu_ansi_term", "sharded_slab")),
    ("tokio runtime", ("tokio::",)),
    ("our code (runtime, tasks, web)", ("runtime::", "tasks::", "web::", "worker::")),
    ("memory (malloc, memcpy)", ("malloc", "free", "memmove", "memcpy", "memset", "memcmp", "realloc",
                                  "_int_", "cfree", "unlink_chunk", "tcache_", "GlobalAlloc", "drop_slow",
                                  "finish_grow")),
    ("Rust collections and hashing", ("alloc::collections", "alloc::vec", "core::hash", "hashbrown", "bytes::")),
]

# What our process was doing in the kernel, by the last frame of ours before it entered it.
KERNEL_CAUSES = [
    ("waking or parking threads (futex)", ("syscall", "futex", "lll_lock", "pthread_cond")),
    ("writing to sockets and pipes", ("writev", "write", "send")),
    ("reading from sockets", ("recv", "read")),
    ("waiting for events (epoll)", ("epoll",)),
]


def program_cpu() -> Counter:
    """CPU seconds (user + system) so far of every live process, summed by program name."""
    seconds: Counter = Counter()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        seconds[name] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return seconds


@contextmanager
def recorded(pid: int, name: str) -> Iterator[dict]:
    """Profiles ``pid`` and times every program while the block runs; fills the yielded dict
    with ``wall``, ``cpu`` (by program) and ``stacks`` (folded, with counts)."""
    OUT.mkdir(parents=True, exist_ok=True)
    data = OUT / f"{name}.perf.data"
    perf = subprocess.Popen(["perf", "record", "-q", "-F", "499", "-e", "cpu-clock",
                             "--call-graph", "dwarf,16384", "-p", str(pid), "-o", str(data)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # perf attaches
    found: dict = {}
    before, began = program_cpu(), time.monotonic()
    try:
        yield found
    finally:
        found["wall"] = time.monotonic() - began
        found["cpu"] = program_cpu() - before
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=120)
    script = subprocess.run(["perf", "script", "-i", str(data)], capture_output=True, timeout=600)
    folded = subprocess.run(["inferno-collapse-perf", "--all"], input=script.stdout, capture_output=True,
                            timeout=600).stdout
    (OUT / f"{name}.folded").write_bytes(folded)
    # Frames narrower than 2 px are left out: they cannot be read, and they make the file large.
    svg = subprocess.run(["inferno-flamegraph", "--title", name, "--minwidth", "2"], input=folded,
                         capture_output=True, timeout=600).stdout
    (OUT / f"{name}.svg").write_bytes(svg)
    data.unlink()
    stacks = Counter()
    for line in folded.decode(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        stacks[stack] += int(count)
    found["stacks"] = stacks


def component(leaf: str) -> str:
    for name, patterns in COMPONENTS:
        if any(p in leaf for p in patterns):
            return name
    return "other"


def kernel_cause(frames: list[str]) -> str:
    ours = [f for f in frames if not f.endswith("_[k]")]
    last = ours[-1] if ours else ""
    for name, patterns in KERNEL_CAUSES:
        if any(p in last for p in patterns):
            return name
    return "interrupts and other"


def summary(title: str, found: dict, work: str) -> str:
    stacks: Counter = found["stacks"]
    total = sum(stacks.values()) or 1  # perf's cpu-clock weights each sample by its period, in ns
    leaves, parts, kernel = Counter(), Counter(), Counter()
    for stack, count in stacks.items():
        frames = stack.split(";")
        leaf = frames[-1]
        leaves[leaf] += count
        parts[component(leaf)] += count
        if leaf.endswith("_[k]"):
            kernel[kernel_cause(frames)] += count
    wall = found["wall"]
    busy = sorted(((s, p) for p, s in found["cpu"].items() if s >= 0.05 * wall), reverse=True)
    lines = [f"### {title}", "", f"{work} in {wall:.1f} s.", "",
             "CPU used by each program in that time (2 cores = 2.0 s per second):", "",
             "| program | CPU s | cores busy |", "|---|---|---|"]
    lines += [f"| {p} | {s:.1f} | {s / wall:.2f} |" for s, p in busy]
    lines += ["", f"Our process, {total / 1e9:.1f} CPU s sampled, by the component of the sampled frame:", "",
              "| component | share |", "|---|---|"]
    lines += [f"| {name} | {100 * n / total:.1f} % |" for name, n in parts.most_common()]
    lines += ["", "Its time in the kernel, by what it asked for:", "", "| cause | share of all |", "|---|---|"]
    lines += [f"| {name} | {100 * n / total:.1f} % |" for name, n in kernel.most_common()]
    lines += ["", "Hottest frames:", "", "| frame | share |", "|---|---|"]
    lines += [f"| `{leaf[:110]}` | {100 * n / total:.1f} % |" for leaf, n in leaves.most_common(12)]
    lines += ["", f"![{title}](results/profile/{found['name']}.svg)", ""]
    return "\n".join(lines)


def profile_worker(broker: str, tasks: int) -> str:
    queue = f"profile-{uuid.uuid4().hex[:8]}"
    harness.redis.Redis.from_url(harness.RESULTS_URL).flushdb()
    harness.loadgen(broker, queue, tasks, "publish")
    name = f"worker-{broker}"
    results = harness.redis.Redis.from_url(harness.RESULTS_URL)
    with harness.worker("rust", broker, queue, 8, True, "profile") as proc:
        with recorded(proc.pid, name) as found:
            done_before = results.dbsize()  # while perf attached
            deadline = time.monotonic() + 600
            while harness.depth(broker, queue) or results.dbsize() < tasks:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not drain {queue}")
                time.sleep(0.05)
    harness.delete_queue(broker, queue)
    found["name"] = name
    timed = tasks - done_before
    return summary(f"Worker on {broker}, results stored", found,
                   f"Ran {timed:,} `tasks.add` ({timed / found['wall']:,.0f}/s, -c 8, acks late), the last of "
                   f"{tasks:,} queued,")


def profile_receive(broker: str, seconds: int) -> str:
    queue = f"profile-web-{uuid.uuid4().hex[:8]}"
    name = f"receive-{broker}"
    with harness.web_app("rust", broker, queue) as (proc, port):
        with recorded(proc.pid, name) as found:
            run = harness.wrk(port, 64, seconds)
    harness.delete_queue(broker, queue)
    found["name"] = name
    return summary(f"`POST /receive` on {broker}", found,
                   f"{run['requests']:,} requests at 64 connections ({run['per_second']:,.0f}/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=60_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--broker", choices=list(harness.BROKERS), action="append",
                        help="profile on this broker only (repeatable; default: each)")
    args = parser.parse_args()
    sections = [
        "# make profile: where the time goes",
        "",
        f"Generated by `make profile` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores. `perf record -e cpu-clock --call-graph dwarf` on our process; "
        "CPU seconds per program from `/proc`. Open a flame graph in a browser to zoom in. "
        "What the figures mean: [docs/performance.md](../docs/performance.md).",
        "",
    ]
    for broker in args.broker or harness.BROKERS:
        print(f"== {broker}", flush=True)
        sections.append(f"## {broker}\n")
        sections.append(profile_worker(broker, args.tasks))
        sections.append(profile_receive(broker, args.seconds))
    (BENCH_DIR / "PROFILE.md").write_text("\n".join(sections))
    print(f"profile: wrote {BENCH_DIR / 'PROFILE.md'}")


if __name__ == "__main__":
    main()
