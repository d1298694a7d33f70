"""``beat``, the binary, on each broker: 1 s entries sent on time to a Rust task and to a Python
task, across a restart of beat, with a second beat started by mistake beside the first.

The check is a count over a time window, as the issue states it: N seconds of beat give N±1 runs
(less the first second: a new entry starts its schedule when beat first sees it).
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from interop_helpers import ARTIFACTS_DIR, logged_task_ids, rust_binary, rust_config, start_process, wait_for


def start_beat(setup, schedule: dict, prefix: str, tag: str):
    env = setup.rust_env(CELERY_BEAT_SCHEDULE=json.dumps(schedule), CELERY_BEAT_KEY_PREFIX=prefix)
    argv = [rust_binary("beat"), "--config", rust_config(), "--loglevel", "info"]
    return start_process(f"beat {tag}", argv, env, ARTIFACTS_DIR / f"beat-{setup.name}-{prefix}-{tag}.log")


@pytest.mark.timeout(90)
def test_beat_sends_on_time_across_a_restart_and_a_rival_beat(broker, spawn_rust_worker, spawn_py_worker):
    rust_queue, py_queue = broker.new_queue("beat-rust"), broker.new_queue("beat-py")
    rust_worker = spawn_rust_worker([rust_queue], tag="beat")
    py_worker = spawn_py_worker([py_queue], tag="beat")
    schedule = {
        "to-rust": {"task": "tasks.add", "schedule": 1.0, "args": [1, 2], "queue": rust_queue},
        "to-python": {"task": "py.mul", "schedule": 1.0, "args": [6, 7], "queue": py_queue},
    }
    prefix = f"interop-beat-{uuid.uuid4().hex[:8]}"
    began = time.monotonic()
    first = start_beat(broker, schedule, prefix, "first")
    time.sleep(4)  # the window being measured
    first.stop()
    # Restarted, and by mistake twice.
    again = [start_beat(broker, schedule, prefix, tag) for tag in ("again", "rival")]
    time.sleep(3)
    for beat in again:
        beat.stop()
    elapsed = time.monotonic() - began

    def rust_runs() -> int:
        return len(logged_task_ids(rust_worker.process, "task succeeded"))

    def python_runs() -> int:
        return py_worker.process.log_text().count("succeeded in")

    expected = int(elapsed) - 1
    for runs in (rust_runs, python_runs):
        # Runs sent at the end of the window may still be on their way to the worker.
        wait_for(lambda: runs() >= expected - 1, 15, describe=lambda: f"{runs.__name__}: {runs()}")
        count = runs()
        assert expected - 1 <= count <= expected + 1, f"{runs.__name__}: {count} in {elapsed:.1f} s"
    senders = [line for beat in [first, *again] for line in beat.log_text().splitlines() if "holding the lock" in line]
    assert len(senders) == 2, f"one beat at a time sends: {senders}"
