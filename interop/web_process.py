"""A `web` process for the tests: start it on a free port against a database (on the shared
PostgreSQL server or a private one), talk to it over HTTP, stop it checking for panics."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
import time
from typing import Any, Callable, Iterable, Iterator

import pytest

from interop_helpers import (
    ARTIFACTS_DIR,
    POSTGRES_URL,
    ManagedProcess,
    Reply,
    database_url,
    drop_database,
    free_port,
    http_request,
    panic_lines,
    psql,
    rust_binary,
    rust_config,
    start_process,
    wait_for,
)

HOST = "127.0.0.1"
READY_TIMEOUT = 60.0
BODY_LIMIT = 64 * 1024  # CELERY_WEB_BODY_LIMIT of the test processes (so 413 needs no megabyte)
SWEEP_INTERVAL = 5  # CELERY_WEB_SWEEP_INTERVAL (the repo default, pinned)
# CELERY_WEB_ALLOWED_TASKS: the shipped config's Rust demo tasks and two Python tasks.
ALLOWED_TASKS = "tasks.add,tasks.mul,tasks.xsum,tasks.fail,tasks.progress,py.mul,py.concat"
FINAL_STATES = {"SUCCESS", "FAILURE", "REVOKED"}
STATE_RANK = {"PENDING": 0, "STARTED": 1, "RETRY": 1, "SUCCESS": 3, "FAILURE": 3, "REVOKED": 3}  # else 2
STATUS_KEYS = {
    "task_id", "task", "state", "progress", "result", "error", "worker", "retries",
    "created_at", "started_at", "finished_at", "workflow_id", "result_truncated", "trace_id",
}
WORKFLOW_KEYS = {
    "workflow_id", "workflow", "state", "progress", "result", "result_truncated", "error",
    "created_at", "finished_at", "children",
}
JOB_TIMEOUT = 30.0  # seconds for one job to become final

# --------------------------------------------------------------------------------------------
# HTTP


@dataclass
class WebApp:
    """A running `web` process: its port, database and log."""

    name: str
    database: str
    port: int
    process: ManagedProcess
    server: str = POSTGRES_URL

    def connection(self, timeout: float = 30.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(HOST, self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                conn: http.client.HTTPConnection | None = None) -> Reply:
        """One request; on ``conn`` (kept alive) when given, else on a connection of its own."""
        return http_request(HOST, self.port, method, path, body=body, headers=headers, conn=conn)

    def get(self, path: str, conn: http.client.HTTPConnection | None = None) -> Reply:
        return self.request("GET", path, conn=conn)

    def post(self, payload: Any = None, *, raw: bytes | None = None, content_type: str | None = "application/json",
             conn: http.client.HTTPConnection | None = None) -> Reply:
        """POST /receive with ``payload`` as JSON (or the ``raw`` bytes) and ``content_type``
        (``None``: no Content-Type header at all)."""
        body = raw if raw is not None else json.dumps(payload).encode()
        headers = {"Content-Type": content_type} if content_type is not None else {}
        return self.request("POST", "/receive", body=body, headers=headers, conn=conn)

    def submit(self, payload: Any, conn: http.client.HTTPConnection | None = None) -> str:
        """POST a job that must be accepted; returns its task id after checking the 202 answer."""
        reply = self.post(payload, conn=conn)
        return accepted_task_id(reply)

    def status(self, task_id: str) -> dict:
        reply = self.get(f"/status/{task_id}")
        assert reply.status == 200, reply
        job = reply.json()
        assert set(job) == STATUS_KEYS, f"/status keys differ: {sorted(job)}"
        assert job["task_id"] == task_id, job
        return job

    def wait_final(self, task_id: str, timeout: float = JOB_TIMEOUT) -> dict:
        last: dict = {}

        def final():
            last.update(self.status(task_id))
            return last["state"] in FINAL_STATES and dict(last)

        return wait_for(final, timeout, interval=0.05,
                        describe=lambda: f"job {task_id} to become final; last /status {last}; log {self.process.log_path}")

    def health(self) -> Reply | None:
        try:
            return self.get("/health")
        except OSError:
            return None

    def count_rows(self) -> int:
        return int(psql("SELECT count(*) FROM tasks", database=self.database, server=self.server))


def post_until_accepted(port: int, numbers: Iterable[int], accepted: Callable[[str, int], None],
                        refused: Callable[[str, float], None], pause: float = 0.0, within: float = 120.0) -> None:
    """``POST /receive`` ``tasks.add(x, 1)`` for each ``x`` to the web app on ``port``, over one
    keep-alive connection, each retried until it is accepted (202): then ``accepted(task_id, x)``.
    Each refusal is ``refused(why, seconds)``, ``why`` being the HTTP status as text or the name
    of the exception that dropped the connection (made anew), and is retried 0.05 s later; a job
    refused is never accepted, so nothing is posted twice. ``pause`` s between jobs; fails once
    ``within`` s have passed."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    deadline = time.monotonic() + within
    for x in numbers:
        body = json.dumps({"task": "tasks.add", "args": [x, 1]}).encode()
        while True:
            assert time.monotonic() < deadline, f"a web job was not accepted within {within} s"
            sent = time.monotonic()
            try:
                conn.request("POST", "/receive", body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                refused(type(exc).__name__, time.monotonic() - sent)
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=30)
                time.sleep(0.05)
                continue
            if response.status == 202:
                accepted(json.loads(data)["task_id"], x)
                break
            refused(str(response.status), time.monotonic() - sent)
            time.sleep(0.05)
        time.sleep(pause)
    conn.close()

def accepted_task_id(reply: Reply) -> str:
    """Checks a 202 answer of POST /receive (body, Location header) and returns the task id."""
    assert reply.status == 202, reply
    assert reply.headers.get("content-type", "").startswith("application/json"), reply
    body = reply.json()
    assert set(body) == {"task_id", "status_url"}, body
    task_id = body["task_id"]
    assert str(uuid.UUID(task_id)) == task_id, f"task_id is not a lower-case hyphenated UUID: {task_id!r}"
    assert body["status_url"] == f"/status/{task_id}", body
    assert reply.headers.get("location") == body["status_url"], f"Location header differs from status_url: {reply}"
    return task_id


# --------------------------------------------------------------------------------------------
# The web process


def _web_env(setup, database: str, port: int, server: str, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    env = setup.rust_env(
        CELERY_DATABASE_URL=database_url(database, server),
        CELERY_WEB_ALLOWED_TASKS=ALLOWED_TASKS,
        CELERY_WEB_BODY_LIMIT=str(BODY_LIMIT),
        CELERY_WEB_SWEEP_INTERVAL=str(SWEEP_INTERVAL),
        **(extra_env or {}),
    )
    env = {k: v for k, v in env.items() if not k.startswith("ROCKET_")}
    env.update(ROCKET_ADDRESS=HOST, ROCKET_PORT=str(port), ROCKET_CLI_COLORS="false")
    return env


def start_web(setup, database: str, tag: str, server: str = POSTGRES_URL,
              extra_env: dict[str, str] | None = None) -> WebApp:
    """``web --migrate`` (creates ``database`` on PostgreSQL ``server``), then ``web`` on a free
    port until /health is 200; ``extra_env`` adds settings (``CELERY_*``)."""
    binary, config = rust_binary("web"), rust_config()
    name = f"web-{setup.name}-{setup.session_id}-{tag}"
    migrate = subprocess.run(
        [str(binary), "--config", str(config), "--migrate"],
        env=_web_env(setup, database, port=0, server=server, extra_env=extra_env), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=READY_TIMEOUT,
    )
    if migrate.returncode != 0:
        pytest.fail(f"`web --migrate` exited with {migrate.returncode}:\n{migrate.stdout}\n{migrate.stderr}",
                    pytrace=False)
    for attempt in range(3):  # the free port may be taken between choosing and binding it
        port = free_port(HOST)
        process = start_process(name, [binary, "--config", config], _web_env(setup, database, port, server, extra_env),
                                ARTIFACTS_DIR / f"{name}.log")
        app = WebApp(name=name, database=database, port=port, process=process, server=server)

        def healthy():
            if not process.alive():
                return "exited"
            reply = app.health()
            return reply is not None and reply.status == 200 and reply.json().get("status") == "ok"

        try:
            outcome = wait_for(healthy, READY_TIMEOUT, interval=0.1,
                               describe=lambda: f"{name} /health to answer 200; log {process.log_path}:\n{process.tail()}")
        except BaseException:
            process.stop()
            raise
        if outcome is True:
            return app
        process.stop()
        if "in use" not in process.log_text() or attempt == 2:
            pytest.fail(f"{name} exited with {process.popen.returncode} before answering /health; "
                        f"log {process.log_path}:\n{process.tail()}", pytrace=False)
    raise AssertionError("unreachable")


def stop_web(app: WebApp) -> int | None:
    """SIGTERM (then kill); fails if the process panicked at any point. Returns the exit code."""
    code = app.process.stop(signal.SIGTERM, timeout=20)
    panics = panic_lines(app.process)
    if panics:
        pytest.fail(f"{app.name} panicked; log {app.process.log_path}:\n" + "\n".join(panics[:10]), pytrace=False)
    return code


@contextmanager
def own_database(name: str) -> Iterator[str]:
    """Drops database ``name`` (which `web --migrate` creates) on the way out, whatever happened."""
    try:
        yield name
    finally:
        drop_database(name)


@contextmanager
def replicas(setup, prefix: str, tag: str, extra_env: dict[str, str] | None = None) -> Iterator[list[WebApp]]:
    """Two web processes on one new database (``rcelery_interop_<prefix>_<id8>_<tag>``), stopped
    (checked for panics) and the database dropped on the way out."""
    with own_database(f"rcelery_interop_{prefix}_{setup.session_id}_{tag}") as database, \
            running_web(setup, database, tag=f"{prefix}-{tag}-a", extra_env=extra_env) as a, \
            running_web(setup, database, tag=f"{prefix}-{tag}-b", extra_env=extra_env) as b:
        yield [a, b]


def fire_together(apps: list[WebApp], send: Callable[[WebApp], Reply], count: int) -> list[Reply]:
    """``count`` calls of ``send``, spread evenly over ``apps``, released together."""
    start = threading.Barrier(count)

    def fire(app: WebApp) -> Reply:
        start.wait(timeout=30)
        return send(app)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(fire, (apps * count)[:count]))


@contextmanager
def running_web(setup, database: str, tag: str, extra_env: dict[str, str] | None = None) -> Iterator[WebApp]:
    """A web process for the ``with`` block; stopped (and checked for panics) on the way out."""
    app = start_web(setup, database, tag, extra_env=extra_env)
    try:
        yield app
    finally:
        stop_web(app)

