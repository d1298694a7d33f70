"""Unique tasks from Python: a caller that takes the lock itself (``SET rcelery-unique:<key>
<task id> NX EX <seconds>`` on the result backend) and sends with ``headers={"unique_key": key}``
has the lock given back by our worker when the task ends, in success or failure; while it is
queued or running, another caller's take is refused and names the holder."""

from __future__ import annotations

import time
import uuid

import pytest

GET_TIMEOUT = 20
PREFIX = "rcelery-unique:"


def take(broker, key: str, task_id: str, seconds: int = 60) -> str | None:
    """Takes lock ``key`` for ``task_id``; ``None`` when taken, else the holder's task id."""
    results = broker.redis_results()
    if results.set(PREFIX + key, task_id, nx=True, ex=seconds):
        return None
    return results.get(PREFIX + key)


def wait_given_back(broker, key: str, seconds: float = 5.0) -> float:
    """Seconds until lock ``key`` is gone (fails after ``seconds``)."""
    began = time.monotonic()
    while broker.redis_results().exists(PREFIX + key):
        assert time.monotonic() - began < seconds, f"lock {key} still held after {seconds} s"
        time.sleep(0.005)
    return time.monotonic() - began


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,args,fails", [("tasks.sleep", (0.5,), False), ("tasks.fail", ("on purpose",), True)])
def test_our_worker_gives_back_a_python_callers_lock_when_the_task_ends(broker, rust, name, args, fails):
    key = f"py-{uuid.uuid4().hex}"
    task_id = str(uuid.uuid4())
    assert take(broker, key, task_id) is None
    # A second caller is refused and learns which task holds the lock.
    assert take(broker, key, str(uuid.uuid4())) == task_id
    result = broker.app.send_task(name, args, task_id=task_id, headers={"unique_key": key})
    if fails:
        with pytest.raises(RuntimeError, match="on purpose"):
            result.get(timeout=GET_TIMEOUT)
    else:
        # Still held while it runs (it sleeps half a second).
        assert take(broker, key, str(uuid.uuid4())) == task_id
        assert result.get(timeout=GET_TIMEOUT) == 0.5
    wait_given_back(broker, key)
    assert take(broker, key, str(uuid.uuid4())) is None


@pytest.mark.timeout(60)
def test_our_worker_gives_back_only_the_lock_its_task_holds(broker, rust):
    """A lock that expired and was taken by another send stays that send's."""
    key = f"py-{uuid.uuid4().hex}"
    other = str(uuid.uuid4())
    assert take(broker, key, other) is None
    result = broker.app.send_task("tasks.add", (1, 2), headers={"unique_key": key})
    assert result.get(timeout=GET_TIMEOUT) == 3
    time.sleep(0.2)
    assert broker.redis_results().get(PREFIX + key) == other
    broker.redis_results().delete(PREFIX + key)
