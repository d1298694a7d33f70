"""Rate limits across workers (``task_rate_limit_scope = "cluster"``): four Rust worker
processes with ``tasks.add`` limited to ``RATE_LIMIT`` start ``RATE_TASKS`` tasks sent by a
stock Python client, and together keep the limit, as one worker would.

The shared limiter is GCRA with a burst of one (the per-worker token bucket's shape): starts are
spaced ``1 / rate`` apart on the Redis server's clock, so any window of the limit's period holds
at most the limit plus one. A start is read as the ``date_done`` of the task's SUCCESS
(``tasks.add`` takes microseconds; the worker's clock, all on this machine), which trails the
reserved start by a varying few milliseconds: the windows are allowed one start more for that.
Per worker, the same four workers would start four times the limit.

Default: ``20/s`` and 200 tasks (about 10 s). The issue's size, ``60/m`` and 200 tasks (over three
minutes), runs with ``make chaos`` (``RATE_LIMIT=60/m``). Figures are printed (``-rP``).
"""

from __future__ import annotations

import json
import os
from datetime import datetime

import pytest

from interop_helpers import wait_for
from test_reliability import figure

RATE_LIMIT = os.environ.get("RATE_LIMIT", "20/s")
RATE_TASKS = int(os.environ.get("RATE_TASKS", "200"))
WORKERS = 4
PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def limit_and_period(rate: str) -> tuple[int, float]:
    """``"60/m"`` -> (60, 60.0): starts allowed per period, and the period in seconds."""
    count, unit = rate.split("/")
    return int(count), PERIODS[unit]


LIMIT, PERIOD = limit_and_period(RATE_LIMIT)
EXPECTED = (RATE_TASKS - 1) * PERIOD / LIMIT  # seconds from the first start to the last


def most_in_window(starts: list[float], window: float) -> int:
    """Most of the sorted ``starts`` within any half-open window of ``window`` seconds."""
    most, last = 0, 0
    for first, start in enumerate(starts):
        last = max(last, first)
        while last < len(starts) and starts[last] - start < window:
            last += 1
        most = max(most, last - first)
    return most


def test_most_in_window_counts_sliding_windows():
    assert most_in_window([0.0, 0.5, 0.99, 1.0, 1.2], 1.0) == 4
    assert most_in_window([0.0, 1.0, 2.0], 1.0) == 1
    assert most_in_window([], 1.0) == 0


@pytest.mark.timeout(int(120 + 3 * EXPECTED))
def test_four_workers_keep_one_cluster_limit(broker, spawn_rust_worker):
    limit, period, expected = LIMIT, PERIOD, EXPECTED
    per_second = limit / period
    queue = broker.new_queue("rate")
    env = {
        "CELERY_TASK_RATE_LIMIT_SCOPE": "cluster",
        "CELERY_TASK_ANNOTATIONS": json.dumps({"tasks.add": {"rate_limit": RATE_LIMIT}}),
    }
    workers = [spawn_rust_worker([queue], tag=f"rate{i}", concurrency=2, extra_env=env) for i in range(WORKERS)]
    results = [broker.app.send_task("tasks.add", (i, 1), queue=queue) for i in range(RATE_TASKS)]
    wait_for(lambda: all(meta and meta["status"] == "SUCCESS" for meta in broker.result_metas([r.id for r in results])),
             timeout=60 + 2 * expected, interval=0.5, describe=f"{RATE_TASKS} tasks at {RATE_LIMIT}")
    metas = broker.result_metas([r.id for r in results])
    assert [meta["result"] for meta in metas] == [i + 1 for i in range(RATE_TASKS)]
    starts = sorted(datetime.fromisoformat(meta["date_done"]).timestamp() for meta in metas)
    by_worker = {w.hostname: sum(meta["worker"] == w.hostname for meta in metas) for w in workers}
    span = starts[-1] - starts[0]
    most = most_in_window(starts, period)
    figure(broker, f"rate: {RATE_TASKS} tasks at {RATE_LIMIT} across {WORKERS} workers took {span:.1f} s "
                   f"({(RATE_TASKS - 1) / span:.2f}/s against {per_second:.2f}/s); most in any {period:g} s "
                   f"window: {most} (limit {limit}); per worker: {sorted(by_worker.values())}")
    # Every worker took its share: the limit held across them, not through one doing all.
    assert all(count > 0 for count in by_worker.values()), by_worker
    # n starts take n - 1 spacings; a few ms of the first and last date_done's lag allowed.
    assert span >= expected - 0.1, f"{span:.2f} s, at least {expected:.2f} s"
    assert most <= limit + 2, f"{most} starts within {period:g} s"
    # Not starved: the limiter's pace, not far below it.
    assert span <= expected * 1.2 + 2, f"{span:.2f} s, about {expected:.2f} s"
