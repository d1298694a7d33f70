"""``bench/ab.py OLD NEW``: two builds of our worker, A/B, in one run.

A change to the worker's hot path is judged against the build before it, on the same machine in
the same hour: each repetition drains the same queue size with one build, then the other
(alternating which goes first), results ignored and stored, on each broker asked for. It prints
the median tasks/s and CPU-seconds per 10,000 tasks of each build (``make bench``'s drain, so the
same measure as its section 1b), the broker's own CPU-seconds per 10,000 over the same drains, and
the ratios NEW / OLD. ``OLD`` and ``NEW`` are directories
holding a release ``worker`` and ``loadgen`` each (the same ``loadgen`` in both, so only the
worker differs).

    cargo build --release --workspace --bins && cp target/release/{worker,loadgen} /tmp/new/
    .venv/bin/python bench/ab.py /tmp/old /tmp/new --broker rabbitmq --reps 5
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import harness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--broker", choices=list(harness.BROKERS), action="append")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=60_000)
    args = parser.parse_args()
    builds = {"old": args.old, "new": args.new}
    (harness.RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    for broker in args.broker or list(harness.BROKERS):
        for results in (False, True):
            runs: dict[str, list[dict]] = {name: [] for name in builds}
            for rep in range(args.reps):
                order = list(builds) if rep % 2 == 0 else list(reversed(builds))
                for name in order:
                    harness.BIN = builds[name]
                    runs[name].append(harness.drain(broker, "rust", 8, results, args.tasks))
            mode = "stored" if results else "ignored"
            figures = {}
            for name, done in runs.items():
                rate = statistics.median(run["per_second"] for run in done)
                cpu, server = (statistics.median(run["cpu"].get(part, 0.0) / run["cpu_tasks"] * 10_000 for run in done)
                               for part in ("worker", broker))
                figures[name] = (rate, cpu, server)
                print(f"{broker} results {mode} {name}: {rate:,.0f} tasks/s, {cpu:.3f} CPU-s per 10,000 "
                      f"({broker} itself {server:.3f}; median of {len(done)})", flush=True)
            (old_rate, old_cpu, old_server), (new_rate, new_cpu, new_server) = figures["old"], figures["new"]
            print(f"{broker} results {mode} new/old: rate {new_rate / old_rate:.2f}, CPU per task "
                  f"{new_cpu / old_cpu:.2f} (worker), {new_server / old_server:.2f} ({broker})", flush=True)


if __name__ == "__main__":
    main()
