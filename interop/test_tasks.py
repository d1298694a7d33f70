"""Stock Python Celery <-> Rust runtime, over RabbitMQ and over Redis.

Every test runs once per broker setup (``[rabbitmq]`` / ``[redis]``) through the ``broker``
fixture; see conftest.py. Values are always checked through Celery's own client API
(``AsyncResult``), and the stored meta is also read raw from Redis.
"""

from __future__ import annotations

import json
import re
import signal
import time
import uuid
from datetime import datetime, timedelta, timezone

import amqp
import pytest
import redis as redis_py
from celery.exceptions import NotRegistered
from celery.exceptions import TimeoutError as CeleryTimeoutError
from kombu import Connection

from interop_helpers import ALL_BROKER_SETUPS, run_call, wait_for

pytestmark = ALL_BROKER_SETUPS

GET_TIMEOUT = 20  # seconds for one AsyncResult.get()


def meta_of(setup, task_id: str) -> dict:
    raw = setup.redis_results().get(f"celery-task-meta-{task_id}")
    assert raw is not None, f"no result key celery-task-meta-{task_id}"
    return json.loads(raw)


def assert_worker_answers(worker) -> None:
    """The Rust worker is alive and still computes tasks.add."""
    assert worker.process.alive(), f"Rust worker died; log {worker.log_path}:\n{worker.process.tail()}"
    try:
        value = worker.app.send_task("tasks.add", (20, 22), queue=worker.queue).get(timeout=GET_TIMEOUT)
    except CeleryTimeoutError:
        state = "alive" if worker.process.alive() else f"exited with {worker.process.popen.returncode}"
        pytest.fail(f"worker ({state}) did not answer tasks.add within {GET_TIMEOUT}s; "
                    f"log {worker.log_path}:\n{worker.process.tail()}", pytrace=False)
    assert value == 42


# --------------------------------------------------------------------------------------------
# Harness sanity: the Python side alone (no Rust needed)


@pytest.mark.timeout(60)
def test_python_worker_runs_py_tasks(broker, py_worker):
    assert broker.app.send_task("py.mul", (6, 7), queue=py_worker.queue).get(timeout=GET_TIMEOUT) == 42
    result = broker.app.send_task("py.concat", kwargs={"a": "x", "b": "y"}, queue=py_worker.queue)
    assert result.get(timeout=GET_TIMEOUT) == "xy"
    assert meta_of(broker, result.id)["worker"] == py_worker.hostname


# --------------------------------------------------------------------------------------------
# Python client -> Rust worker: values

SEND_CASES = [
    ("tasks.add", (2, 3), {}, 5),
    ("tasks.add", (), {"x": 2, "y": 3}, 5),
    ("tasks.add", (1,), {"y": 2}, 3),
    ("tasks.add", (-7, 7), {}, 0),
    ("tasks.mul", (6, 7), {}, 42),
    ("tasks.mul", (), {"x": -3, "y": 4}, -12),
    ("tasks.mul", (5,), {"y": 5}, 25),
    ("tasks.xsum", ([1, 2, 3, 4],), {}, 10),
    ("tasks.xsum", (), {"numbers": [10, -2, 30]}, 38),
    ("tasks.xsum", ([],), {}, 0),
    ("tasks.echo", ("hello",), {}, "hello"),
    ("tasks.echo", (), {"value": [1, "two", None]}, [1, "two", None]),
    ("tasks.sleep", (0.2,), {}, 0.2),
    ("tasks.sleep", (), {"seconds": 0.1}, 0.1),
    ("tasks.progress", (2, 10), {}, 2),
    ("tasks.progress", (), {"total": 3, "step_ms": 10}, 3),
    ("tasks.progress", (1,), {"step_ms": 10}, 1),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "name,args,kwargs,expected",
    SEND_CASES,
    ids=[f"{n}-{'pos' if a and not k else 'kw' if k and not a else 'mixed'}-{i}" for i, (n, a, k, _) in enumerate(SEND_CASES)],
)
def test_send_task_returns_value(rust, name, args, kwargs, expected):
    result = rust.app.send_task(name, args=args, kwargs=kwargs)
    assert result.get(timeout=GET_TIMEOUT) == expected
    assert result.state == "SUCCESS"


@pytest.mark.timeout(60)
def test_signature_delay(rust):
    result = rust.app.signature("tasks.add", args=(2, 3)).delay()
    assert result.get(timeout=GET_TIMEOUT) == 5


ECHO_VALUES = {
    "dict": {"a": 1, "b": {"c": [1, 2, {"d": None}]}, "empty": {}, "list": []},
    "list": [1, -2, 3.5, "x", None, True, False, [], {}, [[["deep"]]]],
    "unicode": "héllo wörld – 日本語 🎉 \"quoted\" back\\slash\nnewline\ttab \u0000nul",
    "unicode-keys": {"ключ": "значение", "😀": ["ß", "ø"]},
    "null": None,
    "float": 3.141592653589793,
    "floats": [0.1, 0.2, 1e-300, -2.5e-8, 1.7976931348623157e308, 123456.789],
    "ints": [0, -1, 2**31, -(2**53), 2**62],
    "bools": [True, False],
    "string-that-looks-like-json": '{"not": "parsed"}',
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", list(ECHO_VALUES.values()), ids=list(ECHO_VALUES))
def test_echo_round_trips_json_exactly(rust, value):
    result = rust.app.send_task("tasks.echo", (value,))
    got = result.get(timeout=GET_TIMEOUT)
    assert got == value
    # Same JSON text, so types are preserved too (1 vs 1.0, True vs 1).
    assert json.dumps(got, sort_keys=True) == json.dumps(value, sort_keys=True)


@pytest.mark.timeout(60)
def test_countdown_from_python_is_honoured(rust):
    sent = time.monotonic()
    result = rust.app.send_task("tasks.add", (1, 2), countdown=1.5)
    assert result.get(timeout=GET_TIMEOUT) == 3
    assert time.monotonic() - sent >= 1.4, "task ran before its eta"


# --------------------------------------------------------------------------------------------
# Failures


@pytest.mark.timeout(60)
def test_fail_reraises_runtime_error(rust):
    message = f"boom-{uuid.uuid4().hex[:6]}"
    result = rust.app.send_task("tasks.fail", (message,))
    with pytest.raises(RuntimeError) as excinfo:
        result.get(timeout=GET_TIMEOUT)
    assert type(excinfo.value) is RuntimeError, f"expected builtins.RuntimeError, got {type(excinfo.value)!r}"
    assert message in str(excinfo.value)
    assert result.state == "FAILURE"
    assert result.failed()


@pytest.mark.timeout(60)
def test_a_named_exception_class_reraises_as_that_class(rust):
    """A Rust task raising ``interop_app.QuotaExceeded("over", 3)`` by name: Python's ``get()``
    re-raises the application's own class, with the task's arguments."""
    import interop_app

    result = rust.app.send_task("tasks.raise_exception", ("interop_app", "QuotaExceeded", ["over", 3]))
    with pytest.raises(interop_app.QuotaExceeded) as excinfo:
        result.get(timeout=GET_TIMEOUT)
    assert type(excinfo.value) is interop_app.QuotaExceeded
    assert excinfo.value.args == ("over", 3)
    meta = rust.app.backend.get_task_meta(result.id)
    assert meta["status"] == "FAILURE"


@pytest.mark.timeout(60)
def test_a_result_over_result_max_bytes_reraises_value_error(rust):
    """The worker runs with the default result_max_bytes (1 MiB of JSON): an echo one byte over
    it is stored as ValueError, which Python re-raises as its own."""
    result = rust.app.send_task("tasks.echo", ("x" * ((1 << 20) - 1),))  # 2 quotes: 1 MiB + 1
    with pytest.raises(ValueError) as excinfo:
        result.get(timeout=GET_TIMEOUT)
    assert type(excinfo.value) is ValueError, f"expected builtins.ValueError, got {type(excinfo.value)!r}"
    assert "over result_max_bytes (1048576)" in str(excinfo.value)
    assert result.state == "FAILURE"


@pytest.mark.timeout(60)
def test_unknown_task_is_not_registered(rust):
    name = f"tasks.does_not_exist_{uuid.uuid4().hex[:6]}"
    result = rust.app.send_task(name, (1, 2))
    with pytest.raises(NotRegistered) as excinfo:
        result.get(timeout=GET_TIMEOUT)
    assert name in str(excinfo.value)
    assert result.state == "FAILURE"
    assert_worker_answers(rust)


# name -> (args, kwargs, a word the error message must name, or None)
BAD_ARGUMENTS = {
    "wrong-type": (("a", 2), {}, None),
    "too-many": ((1, 2, 3), {}, None),
    "missing": ((1,), {}, "y"),
    "missing-all": ((), {}, None),
    "unexpected-kwarg": ((1, 2), {"z": 3}, "z"),
    "duplicate-x": ((1, 2), {"x": 1}, "x"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,kwargs,named", list(BAD_ARGUMENTS.values()), ids=list(BAD_ARGUMENTS))
def test_bad_arguments_fail_with_type_error(rust, args, kwargs, named):
    result = rust.app.send_task("tasks.add", args=args, kwargs=kwargs)
    with pytest.raises(TypeError) as excinfo:
        result.get(timeout=GET_TIMEOUT)
    message = str(excinfo.value)
    assert message.strip(), "TypeError without a message"
    if named:
        assert re.search(rf"\b{named}\b", message), f"message does not name {named!r}: {message!r}"
    assert result.state == "FAILURE"
    assert_worker_answers(rust)


# --------------------------------------------------------------------------------------------
# States and the stored meta


@pytest.mark.timeout(60)
def test_progress_states_are_visible(rust):
    total = 5
    result = rust.app.send_task("tasks.progress", kwargs={"total": total, "step_ms": 300})

    wait_for(lambda: result.state == "PROGRESS", timeout=15, interval=0.02,
             describe=lambda: f"state PROGRESS (last state {result.state})")
    seen = []
    while not result.ready():  # bounded by the test timeout; progress ends after ~1.5 s
        # One read of the stored meta, so state and info belong together.
        meta = result.backend.get_task_meta(result.id)
        state, info = meta["status"], meta["result"]
        if state == "PROGRESS":
            assert isinstance(info, dict), info
            assert info.get("total") == total, info
            assert 1 <= info.get("current", 0) <= total, info
            seen.append(info["current"])
        time.sleep(0.02)
    assert seen, "PROGRESS state seen once but never again with its meta"
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    assert result.get(timeout=GET_TIMEOUT) == total
    assert result.state == "SUCCESS"


@pytest.mark.timeout(60)
def test_result_meta_in_redis(rust):
    result = rust.app.send_task("tasks.add", (2,), {"y": 3})
    assert result.get(timeout=GET_TIMEOUT) == 5
    meta = meta_of(rust.setup, result.id)

    for key in ("status", "result", "traceback", "children", "date_done", "task_id"):
        assert key in meta, f"{key!r} missing from {meta}"
    assert meta["status"] == "SUCCESS"
    assert meta["result"] == 5
    assert meta["traceback"] is None
    assert meta["children"] == []
    assert meta["task_id"] == result.id
    assert meta["date_done"].endswith("+00:00"), meta["date_done"]
    done = datetime.fromisoformat(meta["date_done"])
    assert abs((datetime.now(timezone.utc) - done).total_seconds()) < 120, meta["date_done"]
    # result_extended
    assert meta.get("name") == "tasks.add", meta
    assert meta.get("args") == [2], meta
    assert meta.get("kwargs") == {"y": 3}, meta
    assert meta.get("worker") == rust.hostname, meta
    assert meta.get("retries") == 0, meta
    assert meta.get("queue") == rust.queue, meta


@pytest.mark.timeout(60)
def test_failure_meta_in_redis(rust):
    result = rust.app.send_task("tasks.fail", kwargs={"message": "stored boom"})
    with pytest.raises(RuntimeError):
        result.get(timeout=GET_TIMEOUT)
    meta = meta_of(rust.setup, result.id)
    assert meta["status"] == "FAILURE"
    assert meta["result"]["exc_type"] == "RuntimeError", meta
    assert meta["result"]["exc_module"] == "builtins", meta
    assert "stored boom" in json.dumps(meta["result"]["exc_message"]), meta
    assert "traceback" in meta
    assert meta["date_done"].endswith("+00:00"), meta
    assert meta.get("name") == "tasks.fail" and meta.get("kwargs") == {"message": "stored boom"}, meta


# --------------------------------------------------------------------------------------------
# Malformed messages
#
# Three groups, so a failure says which kind broke the worker:
#   bad-content    a normal kombu message whose body/headers cannot be a task (stock Celery 5.7
#                  logs and drops each of these);
#   bad-shape      a JSON body or headers of the wrong shape (stock Celery 5.7 dies on some:
#                  "Unrecoverable error: not enough values to unpack");
#   bad-transport  not even a valid broker envelope (stock Celery 5.7 on Redis dies on these).
# The contract asks more of the Rust worker than Celery manages: log, reject, keep running.

_VALID_BODY = b'[[1, 2], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'


def _v2(**extra) -> dict:
    return {"task": "tasks.add", "id": str(uuid.uuid4()), **extra}


# group -> [(description, body, content_type, content_encoding, headers)]
KOMBU_MALFORMED = {
    "bad-content": lambda: [
        ("task header, body not JSON", b"{this is not json", "application/json", "utf-8", _v2()),
        ("no headers, garbage body", b"\x00\xff\xfe garbage", "application/json", "utf-8", {}),
        ("task header, pickle content type", b"\x80\x04K\x01.", "application/x-python-serialize", "binary", _v2()),
        ("task header not a string", _VALID_BODY, "application/json", "utf-8", _v2(task=42)),
    ],
    "bad-shape": lambda: [
        ("JSON object without args", b'{"hello": "world"}', "application/json", "utf-8", _v2()),
        ("JSON array too short", b"[1]", "application/json", "utf-8", _v2()),
        ("args not an array", b'["notalist", {}, {}]', "application/json", "utf-8", _v2()),
        ("task header without id", _VALID_BODY, "application/json", "utf-8", {"task": "tasks.add"}),
    ],
}


def _publish_kombu(setup, queue: str, group: str) -> list[str]:
    cases = KOMBU_MALFORMED[group]()
    with Connection(setup.broker_url) as conn:
        producer = conn.Producer()
        for _, body, content_type, encoding, headers in cases:
            producer.publish(body, exchange="", routing_key=queue, content_type=content_type,
                             content_encoding=encoding, headers=headers, retry=True)
    return [c[0] for c in cases]


def _publish_raw_transport_garbage(setup, queue: str) -> list[str]:
    """Messages kombu itself would never produce (no envelope / no properties at all)."""
    if setup.broker_url.startswith("redis"):
        client = redis_py.Redis.from_url(setup.broker_url)
        bogus_id = str(uuid.uuid4())
        envelopes = {
            "not an envelope": "this is not an envelope",
            "envelope without body": json.dumps({"headers": {"task": "tasks.add", "id": bogus_id}, "properties": {}}),
            "body not base64": json.dumps({
                "body": "!!!not base64!!!", "content-type": "application/json", "content-encoding": "utf-8",
                "headers": {"task": "tasks.add", "id": bogus_id},
                "properties": {"body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
                               "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0},
            }),
        }
        for payload in envelopes.values():
            client.lpush(queue, payload)
        return list(envelopes)
    with Connection(setup.broker_url) as conn, conn.channel() as channel:
        channel.basic_publish(amqp.Message(b"\x00raw bytes, no properties"), exchange="", routing_key=queue)
        channel.basic_publish(
            amqp.Message(b"plain text", content_type="text/plain", application_headers={"task": "tasks.add"}),
            exchange="", routing_key=queue,
        )
    return ["no properties at all", "text/plain with a task header and no id"]


def _queue_depth(setup, queue: str) -> int:
    if setup.broker_url.startswith("redis"):
        return redis_py.Redis.from_url(setup.broker_url).llen(queue)
    with Connection(setup.broker_url) as conn, conn.channel() as channel:
        return channel.queue_declare(queue=queue, passive=True).message_count


@pytest.mark.timeout(120)
@pytest.mark.parametrize("group", ["bad-content", "bad-shape", "bad-transport"])
def test_malformed_messages_are_logged_and_rejected(broker, spawn_rust_worker, group):
    # A worker of its own, so a crash here does not take the shared worker's tests down with it.
    worker = spawn_rust_worker([broker.new_queue(f"malformed-{group}")], tag=group, concurrency=2)
    queue = worker.queue
    offset = worker.process.log_size()
    if group == "bad-transport":
        descriptions = _publish_raw_transport_garbage(broker, queue)
    else:
        descriptions = _publish_kombu(broker, queue, group)

    # Queues are FIFO: once this add (sent after the garbage) succeeds, the garbage was consumed.
    assert_worker_answers(worker)
    wait_for(lambda: _queue_depth(broker, queue) == 0, timeout=10,
             describe=lambda: f"queue {queue} to drain (depth {_queue_depth(broker, queue)})")
    logged = worker.process.log_since(offset)
    assert len(logged.splitlines()) >= len(descriptions), (
        f"expected at least one log line per malformed message ({descriptions}); new log:\n{logged}")

    # Rejected means dropped, not requeued: no redelivery loop spamming the log.
    settled = worker.process.log_size()
    time.sleep(2)  # an observation window, not a wait for a condition
    storm = worker.process.log_since(settled).splitlines()
    assert len(storm) < 20, "worker keeps logging after the malformed messages (requeue loop?):\n" + "\n".join(storm[-20:])
    assert worker.process.alive(), f"Rust worker died; log {worker.log_path}:\n{worker.process.tail()}"


# --------------------------------------------------------------------------------------------
# Concurrency


@pytest.mark.timeout(90)
def test_eight_tasks_run_at_once(rust):
    started = time.monotonic()
    results = [rust.app.send_task("tasks.sleep", (3,)) for _ in range(8)]
    last: list[str] = []

    def all_started():
        last[:] = [r.state for r in results]
        return all(state == "STARTED" for state in last)

    wait_for(all_started, timeout=20, interval=0.05,
             describe=lambda: f"all 8 tasks STARTED at once (last states {last})")
    info = results[0].info
    assert isinstance(info, dict) and info.get("hostname") == rust.hostname, f"STARTED meta: {info}"
    assert [r.get(timeout=GET_TIMEOUT) for r in results] == [3] * 8
    assert time.monotonic() - started < 12, "8 x sleep(3) took too long to be concurrent"


# --------------------------------------------------------------------------------------------
# Worker process: queues and signals


@pytest.mark.timeout(120)
def test_worker_consumes_several_queues(broker, spawn_rust_worker):
    q1, q2 = broker.new_queue("multi-a"), broker.new_queue("multi-b")
    worker = spawn_rust_worker([q1, q2], tag="multi", concurrency=2)
    assert broker.app.send_task("tasks.add", (1, 2), queue=q1).get(timeout=GET_TIMEOUT) == 3
    result = broker.app.send_task("tasks.mul", (3, 4), queue=q2)
    assert result.get(timeout=GET_TIMEOUT) == 12
    assert meta_of(broker, result.id).get("queue") == q2
    assert worker.process.alive()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_worker_exits_cleanly_on_signal(broker, spawn_rust_worker, sig):
    queue = broker.new_queue(f"sig-{sig.name.lower()}")
    worker = spawn_rust_worker([queue], tag=sig.name.lower(), concurrency=2)
    assert broker.app.send_task("tasks.add", (1, 1), queue=queue).get(timeout=GET_TIMEOUT) == 2
    code = worker.process.stop(sig, timeout=20)
    assert code == 0, f"worker exit code after {sig.name}: {code}; log {worker.log_path}:\n{worker.process.tail()}"


# --------------------------------------------------------------------------------------------
# Rust client (`call`) -> Python worker


@pytest.mark.timeout(90)
def test_call_python_mul(broker, py_worker):
    out = run_call(broker.rust_env(), "py.mul", args=[6, 7], queue=py_worker.queue, wait=True, timeout=30)
    assert out.returncode == 0, out
    uuid.UUID(out.task_id)
    assert out.value == 42, out
    assert meta_of(broker, out.task_id).get("worker") == py_worker.hostname


@pytest.mark.timeout(90)
def test_call_python_concat_kwargs(broker, py_worker):
    out = run_call(broker.rust_env(), "py.concat", kwargs={"a": "x", "b": "y"}, queue=py_worker.queue,
                   wait=True, timeout=30)
    assert out.returncode == 0, out
    assert out.value == "xy", out
    meta = meta_of(broker, out.task_id)
    assert meta.get("args") == [] and meta.get("kwargs") == {"a": "x", "b": "y"}, meta


def _eta_in(seconds: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat()


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "options,min_seconds",
    [
        (lambda: ["--countdown", "1"], 1.0),
        (lambda: ["--eta", _eta_in(1.5)], 1.0),
        (lambda: ["--expires", "60"], 0.0),
    ],
    ids=["countdown", "eta", "expires"],
)
def test_call_python_with_options(broker, py_worker, options, min_seconds):
    out = run_call(broker.rust_env(), "py.mul", args=[6, 7], queue=py_worker.queue, wait=True, timeout=30,
                   extra=options())
    assert out.returncode == 0, out
    assert out.value == 42, out
    assert out.elapsed >= min_seconds, f"result came before the eta/countdown\n{out}"


# --------------------------------------------------------------------------------------------
# Rust client (`call`) -> Rust worker


@pytest.mark.timeout(90)
def test_call_rust_add(rust):
    out = run_call(rust.setup.rust_env(), "tasks.add", args=[2, 3], queue=rust.queue, wait=True, timeout=30)
    assert out.returncode == 0, out
    assert out.value == 5, out


@pytest.mark.timeout(90)
def test_call_rust_fail(rust):
    # No --queue: goes to task_default_queue (CELERY_TASK_DEFAULT_QUEUE = the worker's queue).
    out = run_call(rust.setup.rust_env(), "tasks.fail", args=["boom"], wait=True, timeout=30)
    assert out.returncode == 1, out
    assert "RuntimeError: boom" in out.stderr, out


@pytest.mark.timeout(90)
def test_call_without_wait_then_python_reads_result(rust):
    out = run_call(rust.setup.rust_env(), "tasks.mul", kwargs={"x": 3, "y": 4}, queue=rust.queue)
    assert out.returncode == 0, out
    assert len(out.lines) == 1, f"without --wait only the id is printed\n{out}"
    assert rust.app.AsyncResult(out.task_id).get(timeout=GET_TIMEOUT) == 12


@pytest.mark.timeout(60)
def test_call_wait_timeout_exits_2(broker):
    nobody = broker.new_queue("nobody")
    out = run_call(broker.rust_env(), "tasks.add", args=[1, 2], queue=nobody, wait=True, timeout=2,
                   process_timeout=30)
    assert out.returncode == 2, out
    uuid.UUID(out.task_id)
