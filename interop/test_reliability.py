"""Reliability of the Rust worker, seen from stock Python Celery: crashes (SIGKILL) with late and
early acks, warm shutdown (SIGTERM), retries, hard time limits. Every test runs once per broker
setup (``[rabbitmq]`` / ``[redis]``).

How a killed worker's unacked messages come back depends on the broker:

* RabbitMQ re-queues them as soon as it notices the dead connection (at once for a SIGKILL:
  the kernel closes the socket).
* Redis has no acks. kombu (and the Rust worker, with the same keys) records each delivered
  message in the ``unacked`` hash / ``unacked_index`` sorted set and drops the record on ack;
  a *consumer* re-queues records older than its ``visibility_timeout``. The Rust worker checks
  every max(1, timeout/2) s. kombu 5.7 checks once when a consumer starts (``on_poll_init``),
  then every ``unacked_restore_interval`` s (default 10) but only scans on every
  ``unacked_restore_throttle``-th call (default 10): about every 100 s by default, too rarely
  for a bounded test, so the Python worker here runs with both set to 1 (a scan every ~1 s).

The crash tests give their workers ``visibility_timeout`` 5 s and so use ``isolated_broker``
(on Redis a database of its own, see conftest). Figures (time to redelivery, duplicates) are
printed; run with ``-rP`` (or ``-s``) to see them.

A gap of kombu's that the Rust worker does not share: kombu takes a message with BRPOP, which
removes it from the queue, and records it in ``unacked`` with a later command, so a consumer
that dies in between loses it (stock Celery 5.7 does, checked with a SIGSTOPped Python worker).
The Rust worker takes and records in one server-side script; the batch and in-flight tests
below hold it to zero lost.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import pytest
from celery.exceptions import TimeLimitExceeded

from interop_helpers import ALL_BROKER_SETUPS, logged_task_ids, wait_for, wait_state

pytestmark = ALL_BROKER_SETUPS

GET_TIMEOUT = 20  # seconds for one AsyncResult.get()
VISIBILITY_TIMEOUT = 5  # seconds (Redis)
ACKS_LATE = {"CELERY_TASK_ACKS_LATE": "true"}
SHORT_VISIBILITY = {"CELERY_BROKER_TRANSPORT_OPTIONS": json.dumps({"visibility_timeout": VISIBILITY_TIMEOUT})}
# A stock Python worker that can finish the Rust worker's `tasks.sleep` and restores abandoned
# Redis messages within ~1 s of their visibility timeout (see the module docstring).
PY_RESCUER_ENV = {
    "INTEROP_TWIN_TASKS": "1",
    "INTEROP_BROKER_TRANSPORT_OPTIONS": json.dumps(
        {"visibility_timeout": VISIBILITY_TIMEOUT, "unacked_restore_interval": 1, "unacked_restore_throttle": 1}
    ),
}
# A killed worker's message is back with a new worker within this (Redis: visibility timeout
# plus one restore period after the first delivery; RabbitMQ: at once).
REDELIVERY_WITHIN = 30.0


def figure(setup, text: str) -> None:
    print(f"[{setup.name}] {text}")


def is_redis(setup) -> bool:
    return setup.broker_url.startswith("redis")


def start_then_kill(setup, spawn_rust_worker, queue: str, tag: str, extra_env: dict):
    """A one-slot Rust worker takes ``tasks.sleep(3)``; once it is STARTED the worker is
    SIGKILLed. Returns ``(worker, result)``."""
    worker = spawn_rust_worker([queue], tag=tag, concurrency=1, extra_env=extra_env, setup=setup)
    result = setup.app.send_task("tasks.sleep", (3,), queue=queue)
    wait_state(result, "STARTED", timeout=15)
    code = worker.process.kill()
    assert code == -signal.SIGKILL, f"exit code {code}; log {worker.log_path}:\n{worker.process.tail()}"
    meta = setup.result_meta(result.id)
    assert meta["status"] == "STARTED" and meta["worker"] == worker.hostname, meta
    return worker, result


def settled_backlog(setup, queue: str):
    """The queue's backlog once the broker has let go of a stopped or killed consumer (RabbitMQ:
    no consumer left, its unacked messages re-queued)."""
    if not is_redis(setup):
        wait_for(lambda: setup.backlog(queue).consumers == 0, 15, interval=0.1,
                 describe=lambda: f"RabbitMQ to drop the consumer of {queue} ({setup.backlog(queue)})")
    return setup.backlog(queue)


def wait_worker(setup, result, hostname: str, timeout: float = REDELIVERY_WITHIN) -> float:
    """Until the stored meta of ``result`` names ``hostname`` (STARTED or later); returns when."""
    def check():
        meta = setup.result_meta(result.id)
        return meta is not None and meta.get("worker") == hostname and time.monotonic()

    return wait_for(check, timeout, interval=0.05,
                    describe=lambda: f"{hostname} to take task {result.id} (meta {setup.result_meta(result.id)})")


# --------------------------------------------------------------------------------------------
# 1. Crash with acks_late: the task runs again on the next worker; with early acks its run is lost


@pytest.mark.timeout(90)
def test_acks_late_task_of_killed_worker_runs_again(isolated_broker, spawn_rust_worker):
    setup = isolated_broker
    queue = setup.new_queue("crash-late")
    env = {**ACKS_LATE, **SHORT_VISIBILITY}
    first, result = start_then_kill(setup, spawn_rust_worker, queue, "late-1", env)
    killed = time.monotonic()

    backlog = settled_backlog(setup, queue)
    if is_redis(setup):  # never acked: still recorded as delivered, for a restore to re-queue
        assert backlog.ready_ids == [] and backlog.unacked_ids == [result.id], backlog
    else:  # re-queued by RabbitMQ
        assert backlog.ready == 1, backlog
    assert result.state == "STARTED"

    second = spawn_rust_worker([queue], tag="late-2", concurrency=1, extra_env=env, setup=setup)
    ready = time.monotonic()
    taken = wait_worker(setup, result, second.hostname)
    assert result.get(timeout=GET_TIMEOUT) == 3
    meta = setup.result_meta(result.id)
    assert meta["status"] == "SUCCESS" and meta["worker"] == second.hostname, meta
    assert result.id in logged_task_ids(second.process, "task succeeded")
    assert result.id not in logged_task_ids(first.process, "task succeeded")
    figure(setup, f"acks_late kill -> Rust: run again {taken - killed:.1f}s after the kill "
                  f"({taken - ready:.1f}s after the second worker was ready)")


@pytest.mark.timeout(90)
def test_early_ack_kill_loses_the_run(isolated_broker, spawn_rust_worker):
    """Celery's documented default: the message is acked just before the task starts, so a
    worker killed while running it loses that run; nobody runs it again, its state stays STARTED.

    Deterministic here, not a race: the Rust worker acks (Redis: the broker answered; AMQP: the
    frame is written) before it stores STARTED, and the kill comes after STARTED was seen. The
    broker's backlog shows that nothing is left to redeliver (on Redis, not even for a restore);
    a task sent after the kill shows that the next worker consumes the queue."""
    setup = isolated_broker
    queue = setup.new_queue("crash-early")
    # Early acks, whatever the shipped config says; a Redis restore would bring back anything
    # left unacked.
    env = {"CELERY_TASK_ACKS_LATE": "false", **SHORT_VISIBILITY}
    first, result = start_then_kill(setup, spawn_rust_worker, queue, "early-1", env)

    backlog = settled_backlog(setup, queue)
    if is_redis(setup):
        assert backlog.ready_ids == [] and backlog.unacked_ids == [], backlog
    else:
        assert backlog.ready == 0, backlog

    second = spawn_rust_worker([queue], tag="early-2", concurrency=1, extra_env=env, setup=setup)
    probe = setup.app.send_task("tasks.add", (1, 2), queue=queue)
    assert probe.get(timeout=GET_TIMEOUT) == 3
    time.sleep(0.5)  # anything given back would have been taken by now
    meta = setup.result_meta(result.id)
    assert meta["status"] == "STARTED" and meta["worker"] == first.hostname, meta
    assert result.state == "STARTED"
    assert result.id not in logged_task_ids(second.process, "task succeeded")


# --------------------------------------------------------------------------------------------
# 2. Crash with acks_late, and a stock Python worker finishes the Rust worker's task


@pytest.mark.timeout(120)
def test_acks_late_task_of_killed_rust_worker_runs_on_python_worker(isolated_broker, spawn_rust_worker,
                                                                   spawn_py_worker):
    setup = isolated_broker
    queue = setup.new_queue("crash-to-py")
    first, result = start_then_kill(setup, spawn_rust_worker, queue, "to-py-1",
                                          {**ACKS_LATE, **SHORT_VISIBILITY})
    killed = time.monotonic()
    rescuer = spawn_py_worker([queue], tag="rescue", extra_env=PY_RESCUER_ENV, setup=setup)
    ready = time.monotonic()
    taken = wait_worker(setup, result, rescuer.hostname)
    assert result.get(timeout=GET_TIMEOUT) == 3
    meta = setup.result_meta(result.id)
    assert meta["status"] == "SUCCESS" and meta["worker"] == rescuer.hostname, meta
    assert result.id not in logged_task_ids(first.process, "task succeeded")
    figure(setup, f"acks_late kill -> Python: run again {taken - killed:.1f}s after the kill "
                  f"({taken - ready:.1f}s after the Python worker was ready)")


# --------------------------------------------------------------------------------------------
# 3. Nothing lost when an acks_late worker is killed in the middle of a batch

BATCH = 200
KILL_AFTER = 50


@pytest.mark.timeout(150)
def test_no_task_lost_when_acks_late_worker_is_killed(isolated_broker, spawn_rust_worker):
    setup = isolated_broker
    queue = setup.new_queue("batch")
    env = {**ACKS_LATE, **SHORT_VISIBILITY}
    # 20 ms each (4 at a time: about a second for the batch), so the kill lands in the middle of
    # it; each task's own duration is its result.
    durations = [0.02 + i / 1e6 for i in range(BATCH)]
    results = [setup.app.send_task("tasks.sleep", (d,), queue=queue) for d in durations]
    ids = [r.id for r in results]

    def succeeded_ids() -> set[str]:
        return {i for i, meta in zip(ids, setup.result_metas(ids)) if meta and meta["status"] == "SUCCESS"}

    def succeeded() -> int:
        return len(succeeded_ids())

    first = spawn_rust_worker([queue], tag="batch-1", concurrency=4, extra_env=env, setup=setup)
    wait_for(lambda: succeeded() >= KILL_AFTER, 60, interval=0.01,
             describe=lambda: f"{KILL_AFTER} results SUCCESS (have {succeeded()})")
    first.process.kill()
    done = succeeded_ids()
    done_at_kill = len(done)
    assert done_at_kill < BATCH, "the whole batch ran before the kill: nothing was tested"
    backlog = settled_backlog(setup, queue)
    if is_redis(setup):
        # Every task is done, waiting, or recorded unacked (to be restored); anything else is gone.
        lost = set(ids) - done - set(backlog.ready_ids) - set(backlog.unacked_ids)
        assert not lost, f"{len(lost)} tasks gone at the kill: {lost}"
    else:
        assert done_at_kill + backlog.ready >= BATCH, f"{done_at_kill} done + {backlog}: tasks gone at the kill"

    second = spawn_rust_worker([queue], tag="batch-2", concurrency=4, extra_env=env, setup=setup)
    wait_for(lambda: succeeded() == BATCH, 90, interval=0.2,
             describe=lambda: f"all {BATCH} results SUCCESS (have {succeeded()}; "
                              f"backlog {setup.backlog(queue)}; log {second.log_path})")
    assert [r.get(timeout=GET_TIMEOUT) for r in results] == durations

    runs = Counter(logged_task_ids(first.process, "task succeeded") + logged_task_ids(second.process, "task succeeded"))
    assert set(runs) == set(ids), "every task ran (each SUCCESS was stored after its log line)"
    twice = sorted(task_id for task_id, n in runs.items() if n > 1)
    by_first = sum(1 for meta in setup.result_metas(ids) if meta and meta["worker"] == first.hostname)
    left = (backlog.ready if backlog.unacked_ids is None
            else f"{backlog.ready} waiting + {len(backlog.unacked_ids)} unacked")
    figure(setup, f"batch: {done_at_kill}/{BATCH} SUCCESS at the kill, backlog after it {left}; "
                  f"final results by the killed worker {by_first}, by the second {BATCH - by_first}; "
                  f"ran twice: {len(twice)} ({max(runs.values())} runs at most); lost: 0")


@pytest.mark.timeout(60)
def test_task_in_flight_to_a_killed_worker_is_not_lost(isolated_broker, spawn_rust_worker):
    """A task the broker has handed to a worker that dies before doing anything with it goes to
    the next worker. Made deterministic by freezing (SIGSTOP) the idle worker while it waits for
    work, publishing, checking that the broker gave the task away, then SIGKILL. On Redis the
    frozen consumer holds the task recorded as unacked or not at all (it takes and records in one
    step), so one try is the test: the task must still be queued or recorded."""
    setup = isolated_broker
    queue = setup.new_queue("in-flight")
    env = {**ACKS_LATE, **SHORT_VISIBILITY}
    first = spawn_rust_worker([queue], tag="frozen", concurrency=1, extra_env=env, setup=setup)
    try:
        for _ in range(5):  # bounded: RabbitMQ may not have pushed the task to the frozen worker yet
            time.sleep(0.3)  # idle, waiting for work
            os.kill(first.process.pid, signal.SIGSTOP)
            result = setup.app.send_task("tasks.add", (2, 3), queue=queue)
            time.sleep(0.3)
            if is_redis(setup) or setup.backlog(queue).ready == 0:
                break  # handed to the frozen worker
            os.kill(first.process.pid, signal.SIGCONT)  # let it run that one normally, try again
            assert result.get(timeout=GET_TIMEOUT) == 5
        else:
            pytest.fail("the broker never handed a task to the frozen worker in 5 attempts")
    finally:
        first.process.kill()  # SIGKILL works on a stopped process

    backlog = settled_backlog(setup, queue)
    if is_redis(setup):
        assert result.id in backlog.ready_ids + backlog.unacked_ids, \
            f"task {result.id} handed to the killed worker is gone from the broker: {backlog}"
    else:
        assert backlog.ready == 1, backlog
    spawn_rust_worker([queue], tag="after-frozen", concurrency=1, extra_env=env, setup=setup)
    assert result.get(timeout=REDELIVERY_WITHIN) == 5


# --------------------------------------------------------------------------------------------
# 4. Warm shutdown: running tasks finish, prefetched ones go back to the queue


@pytest.mark.timeout(90)
def test_warm_shutdown_gives_back_tasks_not_started(broker, spawn_rust_worker):
    queue = broker.new_queue("warm")
    total = 10
    results = [broker.app.send_task("tasks.sleep", (1,), queue=queue) for _ in range(total)]
    ids = [r.id for r in results]
    # -c 2, worker_prefetch_multiplier 4: it runs 2 and holds others. The shipped config acks
    # late, so the 2 running are acked as they finish, after the consumer was cancelled: that
    # ack must still reach the broker, or they would run again.
    first = spawn_rust_worker([queue], tag="warm-1", concurrency=2)

    def started() -> set[str]:
        return {i for i, meta in zip(ids, broker.result_metas(ids)) if meta and meta["status"] == "STARTED"}

    running = wait_for(lambda: len(s := started()) >= 2 and s, 15, interval=0.02,
                       describe=lambda: f"2 tasks STARTED (have {started()})")
    assert len(running) == 2, running
    sigterm = time.monotonic()
    code = first.process.stop(signal.SIGTERM, timeout=15)
    stopped_in = time.monotonic() - sigterm
    assert code == 0, f"exit code after SIGTERM: {code}; log {first.log_path}:\n{first.process.tail()}"

    metas = dict(zip(ids, broker.result_metas(ids)))
    for task_id in running:  # finished before the exit, by this worker
        assert metas[task_id]["status"] == "SUCCESS" and metas[task_id]["worker"] == first.hostname, metas[task_id]
    not_started = [task_id for task_id in ids if task_id not in running]
    assert all(metas[task_id] is None for task_id in not_started), {t: metas[t] for t in not_started}
    backlog = settled_backlog(broker, queue)
    assert backlog.ready == total - 2, backlog  # given back, none lost, none held
    given_back = len(logged_task_ids(first.process, "giving back a task not started"))

    second = spawn_rust_worker([queue], tag="warm-2", concurrency=4)
    assert [r.get(timeout=GET_TIMEOUT) for r in results] == [1] * total
    metas = dict(zip(ids, broker.result_metas(ids)))
    assert {t for t, meta in metas.items() if meta["worker"] == first.hostname} == running
    assert set(logged_task_ids(second.process, "task succeeded")) == set(not_started)
    figure(broker, f"warm shutdown: exit 0 {stopped_in:.1f}s after SIGTERM, {len(running)} finished, "
                   f"{total - 2} back in the queue ({given_back} logged as given back)")


# --------------------------------------------------------------------------------------------
# 5. Retries, as Python sees them


@pytest.mark.timeout(60)
def test_retries_seen_from_python(rust):
    app = rust.app
    recovers = app.send_task("tasks.flaky", (2,), queue=rust.queue)
    gives_up = app.send_task("tasks.flaky", (9,), queue=rust.queue)
    seen: dict[str, list[str]] = {recovers.id: [], gives_up.id: []}

    def poll() -> bool:
        for result in (recovers, gives_up):
            state = result.state
            if not seen[result.id] or seen[result.id][-1] != state:
                seen[result.id].append(state)
        return all(result.ready() for result in (recovers, gives_up))

    # flaky retries with a backoff of at most 1 s (+ up to 1 s jitter), 3 retries at most.
    wait_for(poll, 30, interval=0.05, describe=lambda: f"both flaky tasks to end (states seen {seen})")
    assert "RETRY" in seen[recovers.id], seen
    assert recovers.get(timeout=GET_TIMEOUT) == 2
    assert recovers.state == "SUCCESS"

    assert "RETRY" in seen[gives_up.id], seen
    with pytest.raises(RuntimeError) as excinfo:
        gives_up.get(timeout=GET_TIMEOUT)
    assert "failing on purpose, attempt 4" in str(excinfo.value)  # the run after the 3rd retry
    assert gives_up.state == "FAILURE"
    assert gives_up.traceback, "FAILURE stored without a traceback"
    meta = rust.setup.result_meta(gives_up.id)
    assert meta.get("retries") == 3, meta


# --------------------------------------------------------------------------------------------
# 6. Hard time limit from Python's apply_async(time_limit=...)


@pytest.mark.timeout(60)
def test_hard_time_limit_from_python(broker, spawn_rust_worker):
    queue = broker.new_queue("limits")
    spawn_rust_worker([queue], tag="limits", concurrency=2)
    app = broker.app
    sent = time.monotonic()
    # busy blocks its thread for 4 s; the worker abandons it at the limit (it cannot be stopped).
    limited = [app.send_task("tasks.sleep", (30,), queue=queue, time_limit=1),
               app.send_task("tasks.busy", (4,), queue=queue, time_limit=1)]
    for result in limited:
        with pytest.raises(TimeLimitExceeded):
            result.get(timeout=10)
        assert result.state == "FAILURE"
    took = time.monotonic() - sent
    assert took < 5, f"time limit of 1 s enforced only after {took:.1f}s"

    # Both slots are free again: two tasks run at once (while the abandoned thread still blocks).
    pair = [app.send_task("tasks.busy", (2,), queue=queue) for _ in range(2)]
    wait_for(lambda: all(r.state == "STARTED" for r in pair), 10, interval=0.05,
             describe=lambda: f"both tasks STARTED at once ({[r.state for r in pair]})")
    assert [r.get(timeout=GET_TIMEOUT) for r in pair] == [2, 2]
    figure(broker, f"time limit 1 s: both FAILURE TimeLimitExceeded {took:.1f}s after sending")
