"""Long tasks on Redis run once while their worker lives, and come back when it dies.

kombu emulates acks on Redis: a delivered message is recorded in ``unacked`` / ``unacked_index``
(scored with the time it was taken) until acked, and any consumer, Python's or ours, puts back
every record older than its ``visibility_timeout``. A task running longer than the timeout with
``task_acks_late`` was therefore run a second time by whichever consumer restored it. The Rust
worker renews the score of every message it holds unsettled (a quarter of the timeout apart),
so nobody restores it while the worker lives; once the worker is dead the renewal stops and the
restore brings the message back as before.

Both tests give every worker ``visibility_timeout`` 5 s (so they use ``isolated_broker``, a
Redis database of their own) and run beside the Rust worker a stock Python worker that scans
for abandoned messages about every second (see test_reliability). Figures are printed (``-rP``).
"""

from __future__ import annotations

import signal
import time

import pytest

from interop_helpers import logged_task_ids
from test_reliability import ACKS_LATE, PY_RESCUER_ENV, SHORT_VISIBILITY, VISIBILITY_TIMEOUT, figure, wait_worker

pytestmark = pytest.mark.parametrize("broker", ["redis"], indirect=True)

LONG_TASK = 20  # seconds, four visibility timeouts


def python_received(worker, task_id: str) -> int:
    """How many times a Python worker's log says it received ``task_id``."""
    return worker.process.log_text().count(f"[{task_id}] received")


def started_on_rust_then_python_joins(setup, spawn_rust_worker, spawn_py_worker, tag: str):
    """A Rust worker (``-c 2``, acks late) takes ``tasks.sleep(LONG_TASK)``; once it runs, a
    Python worker joins on the same queue. Returns ``(rust, python, result)``."""
    queue = setup.new_queue(tag)
    rust = spawn_rust_worker([queue], tag=tag, concurrency=2, extra_env={**ACKS_LATE, **SHORT_VISIBILITY},
                             setup=setup)
    result = setup.app.send_task("tasks.sleep", (LONG_TASK,), queue=queue)
    wait_worker(setup, result, rust.hostname, timeout=15)
    python = spawn_py_worker([queue], tag=f"{tag}-py", extra_env=PY_RESCUER_ENV, setup=setup)
    return rust, python, result


@pytest.mark.timeout(60)
def test_a_long_task_runs_once_while_its_worker_lives(isolated_broker, spawn_rust_worker, spawn_py_worker):
    setup = isolated_broker
    rust, python, result = started_on_rust_then_python_joins(setup, spawn_rust_worker, spawn_py_worker, "lease")
    queue = rust.queue
    sent = time.monotonic()
    assert result.get(timeout=LONG_TASK + 15) == LONG_TASK
    took = time.monotonic() - sent
    meta = setup.result_meta(result.id)
    assert meta["status"] == "SUCCESS" and meta["worker"] == rust.hostname, meta
    # A restored copy would by now be running or waiting somewhere: taken by the Python worker
    # (its log), or by the Rust worker (recorded unacked until it ends), or still queued.
    assert python_received(python, result.id) == 0, python.process.tail()
    assert logged_task_ids(rust.process, "task succeeded").count(result.id) == 1
    backlog = setup.backlog(queue)
    assert result.id not in backlog.ready_ids + backlog.unacked_ids, backlog
    figure(setup, f"lease: a {LONG_TASK} s task with visibility_timeout {VISIBILITY_TIMEOUT} s ran once "
                  f"(SUCCESS {took:.1f}s after the Python worker joined)")


@pytest.mark.timeout(60)
def test_a_long_task_of_a_killed_worker_comes_back(isolated_broker, spawn_rust_worker, spawn_py_worker):
    setup = isolated_broker
    rust, python, result = started_on_rust_then_python_joins(setup, spawn_rust_worker, spawn_py_worker, "lease-kill")
    # Past the visibility timeout while the Rust worker lives: nobody took the task from it.
    time.sleep(VISIBILITY_TIMEOUT + 1)
    assert python_received(python, result.id) == 0, python.process.tail()
    assert setup.result_meta(result.id)["worker"] == rust.hostname
    code = rust.process.kill()
    assert code == -signal.SIGKILL, code
    killed = time.monotonic()
    taken = wait_worker(setup, result, python.hostname, timeout=3 * VISIBILITY_TIMEOUT)
    assert python_received(python, result.id) == 1
    assert result.id not in logged_task_ids(rust.process, "task succeeded")
    # The last renewal came at most a quarter of the timeout before the kill.
    assert taken - killed >= 0.75 * VISIBILITY_TIMEOUT - 0.5, f"restored {taken - killed:.1f}s after the kill"
    figure(setup, f"lease: the task of the killed Rust worker ran again on the Python worker "
                  f"{taken - killed:.1f}s after the kill")
    # It would run its 20 s out on the Python worker, which does not renew: not waited for.
    python.process.kill()
