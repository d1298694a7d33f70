"""`Idempotency-Key` on `POST /receive`, against two web replicas sharing one database.

Every test runs once per broker setup (``[rabbitmq]`` / ``[redis]``). Each starts two web
processes of its own on one database of its own (``rcelery_interop_idem_<id8>_<test>``, dropped
at the end) and fires requests at both at once: the key must make one job whichever replica a
request reaches, and that job must be published once and run once.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from interop_helpers import Reply, psql, wait_for
from web_process import JOB_TIMEOUT, WebApp, fire_together, replicas

# Requests fired at once: half at each replica.
BURST = 32


def post_keyed(app: WebApp, key: str, body: bytes) -> Reply:
    return app.request("POST", "/receive", body=body,
                       headers={"Content-Type": "application/json", "Idempotency-Key": key})


def rows(app: WebApp, sql: str) -> str:
    return psql(sql, database=app.database, server=app.server)


def burst(a: WebApp, b: WebApp, key: str, body: bytes) -> list[Reply]:
    """``BURST`` requests with one key and body, half at each replica, released together."""
    return fire_together([a, b], lambda app: post_keyed(app, key, body), BURST)


@pytest.mark.timeout(180)
def test_a_key_fired_at_two_replicas_at_once_makes_one_job_that_runs_once(broker, spawn_rust_worker):
    queue = broker.new_queue("idem")
    with replicas(broker, "idem", "burst") as (a, b):
        key = f"interop-{uuid.uuid4()}"
        body = json.dumps({"task": "tasks.add", "args": [40, 2], "queue": queue}).encode()
        replies = burst(a, b, key, body)

        statuses = sorted(reply.status for reply in replies)
        assert statuses == [200] * (BURST - 1) + [202], replies
        answers = {reply.body for reply in replies}
        assert len(answers) == 1, f"the answers differ: {answers}"
        task_id = replies[0].json()["task_id"]
        assert all(reply.headers.get("location") == f"/status/{task_id}" for reply in replies), replies
        assert rows(a, "SELECT count(*) FROM tasks") == "1"
        assert rows(a, "SELECT count(*) FROM idempotency_keys") == "1"

        # Published once: with no consumer yet, the queue holds that one message once its
        # publish is on record, and no other row exists that could be published.
        wait_for(lambda: rows(a, "SELECT count(*) FROM tasks WHERE published_at IS NOT NULL") == "1",
                 JOB_TIMEOUT, describe=f"job {task_id} marked published")
        backlog = broker.backlog(queue)
        assert backlog.ready == 1, backlog
        if backlog.ready_ids is not None:
            assert backlog.ready_ids == [task_id], backlog

        # Run once: a worker takes it, the result is stored, and the queue is left empty.
        spawn_rust_worker([queue], tag="idem")
        done = a.wait_final(task_id)
        assert (done["state"], done["result"]) == ("SUCCESS", 42), done
        assert b.status(task_id)["result"] == 42
        assert broker.result_meta(task_id)["result"] == 42
        wait_for(lambda: broker.backlog(queue).ready == 0, JOB_TIMEOUT,
                 describe=lambda: f"{queue} emptied; backlog {broker.backlog(queue)}")
        assert rows(a, "SELECT count(*) FROM tasks") == "1"

        # The same key with another body is refused at either replica.
        other = json.dumps({"task": "tasks.add", "args": [1, 1], "queue": queue}).encode()
        for app in (a, b):
            reply = post_keyed(app, key, other)
            assert reply.status == 422 and "another request body" in reply.json()["error"], reply


@pytest.mark.timeout(180)
def test_a_chain_fired_at_two_replicas_at_once_is_one_workflow(broker, rust):
    with replicas(broker, "idem", "chain") as (a, b):
        key = f"interop-chain-{uuid.uuid4()}"
        body = json.dumps({"chain": [{"task": "tasks.add", "args": [2, 3]},
                                     {"task": "tasks.mul", "args": [10]}]}).encode()
        replies = burst(a, b, key, body)
        assert sorted(reply.status for reply in replies) == [200] * (BURST - 1) + [202], replies
        answers = [reply.json() for reply in replies]
        assert all(answer == answers[0] for answer in answers), answers
        workflow = answers[0]
        assert len(workflow["task_ids"]) == 2, workflow
        assert rows(a, "SELECT count(*) FROM tasks") == "2"
        done = wait_for(lambda: (view := b.get(workflow["status_url"]).json())["state"] == "SUCCESS" and view,
                        JOB_TIMEOUT, describe=f"chain {workflow['workflow_id']} to succeed")
        assert done["result"] == 50, done


# The TTL of the window test: short, so that the test waits it out.
SHORT_TTL = 2.0


@pytest.mark.timeout(120)
def test_a_key_answers_its_job_for_web_idempotency_ttl_then_makes_a_new_one(broker):
    """Repeats alternate between the replicas every 20 ms: each is answered 200 until the key is
    `web_idempotency_ttl` old (by PostgreSQL's clock, one for both replicas), then the first
    repeat after that makes a new job. The window in which a repeat makes a second job opens
    exactly at the TTL; the figures are printed (``-s``) for the README."""
    with replicas(broker, "idem", "ttl", extra_env={"CELERY_WEB_IDEMPOTENCY_TTL": str(int(SHORT_TTL))}) as apps:
        a = apps[0]
        key = f"interop-ttl-{uuid.uuid4()}"
        body = json.dumps({"task": "tasks.add", "args": [1, 2]}).encode()
        sent = time.monotonic()
        first = post_keyed(a, key, body)
        first_answered = time.monotonic()
        assert first.status == 202, first
        last_repeat = None
        deadline = sent + SHORT_TTL + 5.0
        replica = 0
        while True:
            replica ^= 1
            asked = time.monotonic()
            reply = post_keyed(apps[replica], key, body)
            answered = time.monotonic()
            if reply.status == 202:
                break
            assert reply.status == 200 and reply.body == first.body, reply
            # The key's clock starts between the first's sending and its answer: a repeat asked
            # later than the TTL after that answer cannot be answered from the key.
            assert asked - first_answered < SHORT_TTL, \
                f"a repeat asked {asked - first_answered:.3f} s after the first answer still got 200"
            last_repeat = answered - sent
            assert answered < deadline, f"no new job {SHORT_TTL} s after the first: {reply}"
            time.sleep(0.02)
        # A new job only once the TTL had passed since the first request was sent.
        assert answered - sent >= SHORT_TTL, f"a new job after {answered - sent:.3f} s"
        assert reply.json()["task_id"] != first.json()["task_id"]
        print(f"\n[{broker.name}] web_idempotency_ttl={SHORT_TTL} s: last 200 answered "
              f"{last_repeat:.3f} s after the first request was sent, the new job (202) asked "
              f"{asked - sent:.3f} s and answered {answered - sent:.3f} s after it")
        assert rows(a, "SELECT count(*) FROM tasks") == "2"
        assert rows(a, "SELECT count(*) FROM idempotency_keys") == "1"
