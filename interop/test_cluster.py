"""A RabbitMQ cluster that loses a node: the failover URL list carries every client over.

On the 3-node cluster of ``scripts/cluster.sh`` (nodes rc1..rc3 on 127.0.0.1:5701-5703, apart
from the main RabbitMQ), with ``broker_url`` the failover list of the three nodes:

* a quorum queue (``x-queue-type=quorum``, durable), declared by Python as Celery 5.5+ declares
  it with ``task_default_queue_type = "quorum"``, replicated on the three nodes;
* our Rust worker (``task_acks_late``, ``-c 8``) consuming it;
* publishing to it at once: a stock Python Celery client (publisher confirms), ``call``
  processes (the Rust client, one connect each) and ``POST /receive`` of our web app (its
  outbox);
* a third of the way in, the node the worker is connected to (the port of its last
  ``connected to the broker`` log line, cross-checked with ``rabbitmqctl list_connections``) is
  stopped; once the worker has moved to another node and runs tasks again, it is started again;
* ``inspect stats`` and ``conf`` of the worker name every node of the list, no password.

Then it counts: tasks sent, tasks with the right result, lost (must be 0), completed more than
once, and why each repeat happened. With ``task_acks_late`` a message is acked after its run, so
the messages the worker held on the dead connection (running, finished but not yet acked, or
prefetched) go back to the queue and run again on the new connection: each repeat must have run
first between the stop (less a second, for an ack still in flight) and the reconnect, or have
been published twice by a client that retried a publish whose confirmation the dying node never
sent. Time to resume: from the stop to the worker's reconnect and to its first task after it.
Figures are printed (``-rP``) and written to ``interop/artifacts/cluster.json``.

Size: ``CLUSTER_TASKS`` (default 300, ``make chaos`` 2,000) Python tasks, a tenth as many
``call`` tasks (at least 10) and ``CLUSTER_WEB_JOBS`` (default a fifth of the tasks) web jobs.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
from kombu import Connection, Exchange, Queue

from conftest import REDIS_URL, BrokerSetup, start_rust_worker, stop_rust_worker
from interop_app import create_app
from interop_helpers import (
    ARTIFACTS_DIR,
    REPO_DIR,
    inspect_node,
    logged_task_ids,
    psql,
    publish_until_taken,
    run_call,
    strip_ansi,
    wait_for,
)
from web_process import own_database, start_web, stop_web

CLUSTER_TASKS = int(os.environ.get("CLUSTER_TASKS", "300"))
CLUSTER_CALLS = max(10, CLUSTER_TASKS // 10)
CLUSTER_WEB_JOBS = int(os.environ.get("CLUSTER_WEB_JOBS", str(CLUSTER_TASKS // 5)))
PUBLISH_SECONDS = max(12.0, CLUSTER_TASKS / 150)  # the pace, so the stop meets a live stream
CONCURRENCY, PREFETCH_MULTIPLIER = 8, 4
SCRIPT = REPO_DIR / "scripts" / "cluster.sh"
PORTS = {1: 5701, 2: 5702, 3: 5703}
NODE_URLS = {n: f"amqp://guest:guest@127.0.0.1:{port}//" for n, port in PORTS.items()}
BROKER_URL = ";".join(NODE_URLS.values())
ACK_SLACK = 1.0  # seconds before the stop in which an ack may still have been in flight
_STAMP = r"^(\S+Z)\s"
_LOST = re.compile(_STAMP + r".*\bbroker connection (lost)\b")
_CONNECTED = re.compile(_STAMP + r".*\bconnected to the broker\b.*\burl=\S+:(\d+)/")
_SUCCEEDED = re.compile(_STAMP + r".*\btask succeeded\b.*\bid=([0-9a-f-]{36})\b")


def cluster(*args: str, timeout: float = 180.0) -> str:
    """``scripts/cluster.sh ARGS``; fails the test with its output if it fails."""
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        pytest.fail(f"cluster.sh {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}",
                    pytrace=False)
    return proc.stdout


def ctl_json(node: int, *args: str) -> list:
    return json.loads(cluster("ctl", str(node), *args, "--formatter", "json"))


def stamped(log: str, pattern: re.Pattern[str]) -> list[tuple[float, str]]:
    """(time, group 2) of each log line ``pattern`` matches, in order."""
    out = []
    for line in strip_ansi(log).splitlines():
        match = pattern.match(line)
        if match:
            out.append((datetime.fromisoformat(match.group(1)).timestamp(), match.group(2)))
    return out


@pytest.fixture(scope="module")
def rabbit_cluster():
    began = time.monotonic()
    cluster("start")
    started = time.monotonic() - began
    try:
        yield started
    finally:
        cluster("stop")


@pytest.mark.timeout(int(240 + CLUSTER_TASKS / 10))
def test_a_node_dies_under_the_worker_and_nothing_is_lost(rabbit_cluster):
    began = time.monotonic()
    session_id = uuid.uuid4().hex[:8]
    queue = f"cluster-{session_id}"
    app = create_app(BROKER_URL, REDIS_URL, default_queue=queue, main="cluster",
                     strict_control=True, transport_options={"confirm_publish": True})
    app.conf.task_default_queue_type = "quorum"
    setup = BrokerSetup(name="cluster", broker_url=BROKER_URL, result_backend=REDIS_URL, session_id=session_id,
                        queue=queue, py_queue=f"{queue}-py", app=app)
    with Connection(NODE_URLS[1], connect_timeout=5) as conn:
        Queue(queue, Exchange(queue), routing_key=queue, durable=True,
              queue_arguments={"x-queue-type": "quorum"}).bind(conn.default_channel).declare()
    declared = {q["name"]: q for q in ctl_json(1, "list_queues", "name", "type", "members", "durable")}[queue]
    assert declared["type"] == "quorum" and declared["durable"], declared
    assert sorted(declared["members"]) == [f"rc{n}@localhost" for n in PORTS], declared

    plan = []  # (task id, name, args, expected result), Python's
    for i in range(CLUSTER_TASKS):
        if i % 3 == 0:
            seconds = round(random.uniform(0.01, 0.1), 3)
            plan.append((str(uuid.uuid4()), "tasks.sleep", [seconds], seconds))
        else:
            plan.append((str(uuid.uuid4()), "tasks.add", [i, i], 2 * i))
    expected = {task_id: value for task_id, _, _, value in plan}
    published: list[str] = []
    publish_errors: Counter = Counter()
    republished: set[str] = set()
    call_failures: list[str] = []
    web_accepted: dict[str, int] = {}
    sent_at: dict[str, list[float]] = {"python": [], "call": [], "web": []}  # time.time() of each send
    figures: dict = {"cluster_start_seconds": round(rabbit_cluster, 1)}
    failover: dict = {}
    rust_env = setup.rust_env(CELERY_TASK_DEFAULT_QUEUE_TYPE="quorum")

    def noting_retries(task_id: str) -> dict:
        """A retry policy (Celery's default, merged in) that records the publishes kombu tries
        again by itself: one whose confirmation was lost with the node is a second message."""
        return {"errback": lambda exc, interval: republished.add(task_id)}

    def publish_python() -> None:
        pause = PUBLISH_SECONDS / len(plan)
        for task_id, name, args, _ in plan:
            publish_until_taken(app, name, args, queue=queue, task_id=task_id, attempts=100, errors=publish_errors,
                                republished=republished, retry_policy=noting_retries(task_id))
            published.append(task_id)
            sent_at["python"].append(time.time())
            time.sleep(pause)

    def publish_rust() -> None:
        pause = PUBLISH_SECONDS / CLUSTER_CALLS
        for i in range(CLUSTER_CALLS):
            x = 100_000 + i
            for _ in range(5):
                result = run_call(rust_env, "tasks.add", args=[x, 1], queue=queue)
                if result.returncode == 0:
                    expected[result.task_id] = x + 1
                    published.append(result.task_id)
                    sent_at["call"].append(time.time())
                    break
                call_failures.append(result.stderr)
            time.sleep(pause)

    def post_web(web) -> None:
        pause = PUBLISH_SECONDS / max(1, CLUSTER_WEB_JOBS)
        conn = web.connection()
        for i in range(CLUSTER_WEB_JOBS):
            x = 200_000 + i
            task_id = web.submit({"task": "tasks.add", "args": [x, 1]}, conn=conn)
            web_accepted[task_id] = x + 1
            sent_at["web"].append(time.time())
            time.sleep(pause)

    def fail_over(worker) -> None:
        """Stops the worker's node a third of the way in; starts it again once the worker runs
        tasks on another node."""
        wait_for(lambda: len(published) >= CLUSTER_TASKS // 3, PUBLISH_SECONDS * 2,
                 describe="a third of the tasks to be published")
        _, port = stamped(worker.process.log_text(), _CONNECTED)[-1]
        node = next(n for n, p in PORTS.items() if p == int(port))
        failover["node_stopped"] = f"rc{node}@localhost"
        failover["connections_on_it_before"] = len(ctl_json(node, "list_connections", "name"))
        stopped_at = time.time()
        cluster("stop-node", str(node))

        def moved():
            after = [(at, p) for at, p in stamped(worker.process.log_text(), _CONNECTED) if at > stopped_at]
            return after and after[0]

        reconnected_at, new_port = wait_for(moved, 60, describe="the worker to connect to another node")
        failover["worker_moved_to"] = f"rc{next(n for n, p in PORTS.items() if p == int(new_port))}@localhost"

        def resumed():
            return next((at for at, _ in stamped(worker.process.log_text(), _SUCCEEDED) if at > reconnected_at),
                        None)

        resumed_at = wait_for(resumed, 60, describe="a task to succeed after the reconnect")
        lost_at = next(at for at, _ in stamped(worker.process.log_text(), _LOST) if at > stopped_at)
        failover.update(stopped_at=stopped_at, reconnected_at=reconnected_at,
                        connection_lost_after_seconds=round(lost_at - stopped_at, 2),
                        reconnect_seconds=round(reconnected_at - stopped_at, 2),
                        reconnect_after_loss_seconds=round(reconnected_at - lost_at, 2),
                        resume_seconds=round(resumed_at - stopped_at, 2))
        cluster("start-node", str(node))
        failover["restarted_at"] = time.time()
        failover["node_down_seconds"] = round(failover["restarted_at"] - stopped_at, 1)

    database = f"rcelery_cluster_{session_id}"
    with own_database(database):
        worker = start_rust_worker(setup, [queue], tag="cluster", concurrency=CONCURRENCY, extra_env={
            "CELERY_TASK_ACKS_LATE": "true",
            "CELERY_WORKER_PREFETCH_MULTIPLIER": str(PREFETCH_MULTIPLIER),
            "CELERY_TASK_DEFAULT_QUEUE_TYPE": "quorum",
        })
        web = start_web(setup, database, tag="cluster")
        try:
            with ThreadPoolExecutor(4) as pool:
                jobs = [pool.submit(publish_python), pool.submit(publish_rust), pool.submit(post_web, web),
                        pool.submit(fail_over, worker)]
                for job in jobs:
                    job.result()
            figures["publishing_seconds"] = round(time.monotonic() - began, 1)
            ids = list(published)
            done: dict[str, int] = {}

            def all_ended() -> bool:
                metas = setup.result_metas(ids)
                done["count"] = sum(m is not None and m["status"] in ("SUCCESS", "FAILURE") for m in metas)
                return done["count"] == len(ids)

            wait_for(all_ended, 60 + CLUSTER_TASKS / 20, interval=0.5,
                     describe=lambda: f"every sent task to end ({done.get('count')}/{len(ids)})")

            def rows() -> dict[str, tuple[str, str]]:
                out = psql("SELECT task_id, state, coalesce(result::text, '') FROM tasks", database=database)
                return {line.split("|")[0]: tuple(line.split("|")[1:]) for line in out.splitlines() if line}

            final_rows = wait_for(lambda: (current := rows()) and all(
                current.get(task_id, ("",))[0] in ("SUCCESS", "FAILURE") for task_id in web_accepted) and current,
                60, interval=0.5, describe="every accepted web job to be final")
            outbox_retried = set(logged_task_ids(web.process, "job not published yet"))
            # What the worker tells about its broker names every node and no password.
            stats = inspect_node(app, worker.hostname, "stats")
            shown = json.dumps([stats, inspect_node(app, worker.hostname, "conf")])
        finally:
            stop_web(web)
            stop_rust_worker(worker)
            app.close()
    members_after = {q["name"]: q for q in ctl_json(1, "list_queues", "name", "members", "online")}[queue]

    metas = dict(zip(ids, setup.result_metas(ids)))
    lost = [task_id for task_id in ids if metas[task_id] is None]
    wrong = [task_id for task_id in ids if metas[task_id] is not None
             and (metas[task_id]["status"] != "SUCCESS" or metas[task_id]["result"] != expected[task_id])]
    web_wrong = [task_id for task_id, value in web_accepted.items()
                 if final_rows[task_id][0] != "SUCCESS" or json.loads(final_rows[task_id][1]) != value]
    runs: dict[str, list[float]] = {}
    for at, task_id in stamped(worker.process.log_text(), _SUCCEEDED):
        runs.setdefault(task_id, []).append(at)
    repeats = {task_id: times for task_id, times in runs.items() if len(times) > 1}
    why = Counter()
    unexplained = []
    for task_id, times in repeats.items():
        if failover["stopped_at"] - ACK_SLACK <= times[0] <= failover["reconnected_at"]:
            why["held_on_the_dead_connection"] += 1
        elif task_id in republished:
            why["python_published_again"] += 1
        elif task_id in outbox_retried:
            why["outbox_published_twice"] += 1
        else:
            unexplained.append(task_id)
    down = (failover["stopped_at"], failover["restarted_at"])
    sent_while_down = {client: sum(down[0] <= at <= down[1] for at in times) for client, times in sent_at.items()}
    figures.update(
        queue_type=declared["type"],
        queue_members=sorted(declared["members"]),
        queue_members_online_after_restart=sorted(members_after["online"]),
        tasks_sent_python=len(plan),
        tasks_sent_rust_call=len(ids) - len(plan),
        tasks_sent=len(ids),
        tasks_done=len(ids) - len(lost),
        tasks_lost=len(lost),
        tasks_wrong=len(wrong),
        web_jobs_accepted=len(web_accepted),
        web_jobs_final=sum(final_rows.get(task_id, ("",))[0] == "SUCCESS" for task_id in web_accepted),
        web_jobs_wrong=len(web_wrong),
        web_jobs_published_by_outbox=len(outbox_retried),
        python_publish_errors_retried=dict(publish_errors),
        call_failures_retried=len(call_failures),
        # anyhow's report: the error and its causes come first, then any backtrace.
        call_failures_errors=[" | ".join([line.strip() for line in failure.splitlines() if line.strip()][:4])
                              for failure in call_failures[:3]],
        sent_while_node_down=sent_while_down,
        completed_more_than_once=len(repeats),
        repeats_by_reason=dict(why),
        repeats_unexplained=len(unexplained),
        prefetch_window=CONCURRENCY * PREFETCH_MULTIPLIER,
        **{k: v for k, v in failover.items() if not k.endswith("_at")},
        seconds=round(time.monotonic() - began + rabbit_cluster, 1),
    )
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS_DIR / "cluster.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"cluster figures: {json.dumps(figures)}")

    assert "guest:guest" not in shown, shown
    assert stats["broker"]["alternates"] == [url.replace(":guest@", ":********@") for url in NODE_URLS.values()], \
        stats["broker"]
    assert failover["connections_on_it_before"] >= 1, figures
    assert failover["worker_moved_to"] != failover["node_stopped"], figures
    # Every client went on publishing while the node was down (each one's connect walked on).
    assert all(sent_while_down.values()), figures
    assert not lost, f"{len(lost)} sent tasks never ended, e.g. {lost[:5]}: {figures}"
    assert not wrong, f"{len(wrong)} tasks ended wrong, e.g. {[metas[i] for i in wrong[:3]]}"
    assert not web_wrong, f"{len(web_wrong)} web jobs ended wrong: {[final_rows[i] for i in web_wrong[:3]]}"
    assert not unexplained, f"completed twice with no failover to explain it: {unexplained[:5]}: {figures}"
    # What was held on the dead connection is at most what the worker may hold unacked.
    assert why["held_on_the_dead_connection"] <= CONCURRENCY * PREFETCH_MULTIPLIER, figures
    assert len(members_after["online"]) == 3, f"the restarted node did not rejoin the queue: {members_after}"
