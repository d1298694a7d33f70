"""Unique tasks from Python: a caller that takes the lock itself (``SET rcelery-unique:<key>
<task id> NX EX <seconds>`` on the result backend) and sends with ``headers={"unique_key": key}``
has the lock given back by our worker when the task ends, in success or failure; while it is
queued or running, another caller's take is refused and names the holder.

And from the web app: ``POST /receive`` with ``unique_for`` fired at two replicas at once is
accepted once (202) and refused (409 naming the holder) everywhere else, until the job ends."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from interop_helpers import psql
from web_process import fire_together, replicas

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


# Requests fired at once: half at each replica.
BURST = 32


@pytest.mark.timeout(180)
def test_a_unique_job_fired_at_two_replicas_at_once_is_accepted_once(broker, spawn_rust_worker):
    queue = broker.new_queue("unique")
    with replicas(broker, "unique", "burst") as (a, b):
        key = f"interop-{uuid.uuid4().hex}"
        body = json.dumps({"task": "tasks.add", "args": [40, 2], "queue": queue,
                           "unique_for": 60, "unique_key": key}).encode()
        replies = fire_together([a, b], lambda app: app.post(raw=body), BURST)

        assert sorted(reply.status for reply in replies) == [202] + [409] * (BURST - 1), replies
        holder = next(reply for reply in replies if reply.status == 202).json()["task_id"]
        for reply in replies:
            if reply.status == 409:
                answer = reply.json()
                assert (answer["holder"], answer["status_url"]) == (holder, f"/status/{holder}"), answer
        assert psql("SELECT count(*) FROM tasks", database=a.database, server=a.server) == "1"
        assert broker.redis_results().get(PREFIX + key) == holder

        # No worker on the queue yet: queued, so still refused. Once it has run, taken again.
        assert b.post(raw=body).status == 409
        spawn_rust_worker([queue], tag="unique")
        done = a.wait_final(holder)
        assert (done["state"], done["result"]) == ("SUCCESS", 42), done
        wait_given_back(broker, key)
        again = b.post(raw=body)
        assert again.status == 202, again
        second = again.json()["task_id"]
        assert second != holder
        assert b.wait_final(second)["result"] == 42
        wait_given_back(broker, key)
