"""Small helpers shared by the fixtures and the tests: waiting, processes, the `call` binary."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import pytest

INTEROP_DIR = Path(__file__).resolve().parent
REPO_DIR = INTEROP_DIR.parent
ARTIFACTS_DIR = INTEROP_DIR / "artifacts"
BIN_DIR = Path(os.environ.get("RCELERY_BIN_DIR") or REPO_DIR / "target" / "debug")
CONFIG_PATH = Path(os.environ.get("RCELERY_CONFIG") or REPO_DIR / "celeryconfig.toml")
# The PostgreSQL server of the web app's tests (each session creates and drops its own database).
# `pytestmark = ALL_BROKER_SETUPS`: a module's tests run on every broker set-up of conftest,
# RabbitMQ with quorum queues and native delayed delivery too, not only the default two.
ALL_BROKER_SETUPS = pytest.mark.parametrize("broker", ["rabbitmq", "rabbitmq-quorum", "redis"], indirect=True)
POSTGRES_URL = os.environ.get("INTEROP_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432").rstrip("/")

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


# --------------------------------------------------------------------------------------------
# Waiting


def wait_for(
    condition: Callable[[], Any],
    timeout: float,
    interval: float = 0.05,
    describe: Callable[[], str] | str = "condition",
) -> Any:
    """Poll ``condition`` until it returns a truthy value (which is returned) or fail.

    ``describe`` (a string or a callable, evaluated only on failure) says what was awaited and
    what was last seen, so a timeout reads as a useful assertion message.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = describe() if callable(describe) else describe
            pytest.fail(f"timed out after {timeout:.1f}s waiting for {text}", pytrace=False)
        time.sleep(interval)


def wait_state(result: Any, states: str | Iterable[str], timeout: float = 15.0, interval: float = 0.05) -> str:
    """Poll ``result.state`` (an ``AsyncResult``) until it is one of ``states``; returns it."""
    wanted = {states} if isinstance(states, str) else set(states)
    seen: list[str] = []

    def check() -> str | None:
        state = result.state
        if not seen or seen[-1] != state:
            seen.append(state)
        return state if state in wanted else None

    return wait_for(check, timeout, interval=interval,
                    describe=lambda: f"task {result.id} to be {' or '.join(sorted(wanted))} (states seen: {seen})")


# --------------------------------------------------------------------------------------------
# Brokers


@dataclass
class Backlog:
    """What a broker holds for one queue (``BrokerSetup.backlog``): ``ready`` messages; on RabbitMQ
    the ``consumers`` count, on Redis the ids waiting (``ready_ids``) and the ids delivered but
    never acked (``unacked_ids``, re-queued once older than a consumer's visibility timeout)."""

    ready: int
    consumers: int | None = None
    ready_ids: list[str] | None = None
    unacked_ids: list[str] | None = None


def task_id_of(envelope: bytes | str | Mapping[str, Any]) -> str | None:
    """The task id in a kombu (Redis) message envelope, raw JSON or parsed."""
    if not isinstance(envelope, Mapping):
        envelope = json.loads(envelope)
    return (envelope.get("headers") or {}).get("id")


def with_redis_db(url: str, db: int) -> str:
    """``url`` (``redis://host:port/<db>``) pointing at database ``db``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


# --------------------------------------------------------------------------------------------
# Rust binaries and their environment


def rust_binary(name: str) -> Path:
    """Path of a Rust binary; fails the test (never skips) when it has not been built."""
    path = BIN_DIR / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"Rust binary {name!r} not found at {path}. Build the workspace first "
            f"(e.g. `cargo build --workspace --bins`) or point RCELERY_BIN_DIR at the binaries.",
            pytrace=False,
        )
    return path


def rust_config() -> Path:
    if not CONFIG_PATH.is_file():
        pytest.fail(
            f"Rust config {CONFIG_PATH} not found (the contract passes <repo>/celeryconfig.toml); "
            f"set RCELERY_CONFIG to use another file.",
            pytrace=False,
        )
    return CONFIG_PATH


def rust_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """The process environment with every inherited ``CELERY_*`` removed and ``overrides`` set.

    Dropping inherited overrides keeps a developer's shell from changing what the suite tests.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
    env.update({"NO_COLOR": "1", "RUST_BACKTRACE": "1"})
    env.update(overrides)
    return env


# --------------------------------------------------------------------------------------------
# Long-running processes (workers)


@dataclass
class ManagedProcess:
    """A subprocess whose stdout+stderr go to ``log_path``."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    _log_file: Any = field(repr=False, default=None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return strip_ansi(self.log_path.read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return strip_ansi(f.read().decode("utf-8", errors="replace"))

    def tail(self, lines: int = 40) -> str:
        text = self.log_text().splitlines()[-lines:]
        return "\n".join(text) if text else "<empty log>"

    def wait_for_log(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Poll the log until ``pattern`` matches; fail early if the process exits."""

        def check():
            if not self.alive():
                pytest.fail(
                    f"{self.name} exited with code {self.popen.returncode} before logging "
                    f"{pattern.pattern!r}; log {self.log_path}:\n{self.tail()}",
                    pytrace=False,
                )
            return pattern.search(self.log_text())

        return wait_for(
            check,
            timeout,
            interval=0.1,
            describe=lambda: f"{self.name} to log {pattern.pattern!r}; log {self.log_path}:\n{self.tail()}",
        )

    def kill(self, timeout: float = 10.0) -> int | None:
        """SIGKILL (a crash: nothing is settled, nothing is given back) and reap it; returns the
        exit code (``-9``)."""
        return self.stop(signal.SIGKILL, timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Send ``sig``, wait up to ``timeout``, then kill. Returns the exit code seen after ``sig``
        (``None`` if the process had to be killed)."""
        code: int | None = None
        try:
            if self.alive():
                self.popen.send_signal(sig)
                try:
                    code = self.popen.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(timeout=10)
            else:
                code = self.popen.returncode
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
        return code


def start_process(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path | None = None,
) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "wb")
    log_file.write(f"# {' '.join(map(str, argv))}\n".encode())
    log_file.flush()
    popen = subprocess.Popen(
        [str(a) for a in argv],
        env=dict(env),
        cwd=str(cwd) if cwd else None,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    return ManagedProcess(name=name, popen=popen, log_path=log_path, _log_file=log_file)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it; the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


_LOGGED_ID = re.compile(r"\bid=([0-9a-fA-F-]{36})\b")


def logged_task_ids(process: ManagedProcess, message: str) -> list[str]:
    """The ``id=`` of every line of a Rust worker's log that contains ``message`` (e.g.
    ``"task succeeded"``), in order, repeats kept."""
    return [m.group(1) for line in process.log_text().splitlines() if message in line
            for m in [_LOGGED_ID.search(line)] if m]


def panic_lines(process: ManagedProcess) -> list[str]:
    """Lines of a Rust process's log that report a panic (a panic in a spawned task can leave the
    process running, so its answers alone may miss it)."""
    return [line for line in process.log_text().splitlines() if "panicked at" in line]


def ready_pattern(node_prefix: str) -> re.Pattern[str]:
    """Matches the ``<hostname> ready.`` line of a worker named ``<node_prefix>@%h``."""
    return re.compile(rf"(?P<hostname>{re.escape(node_prefix)}@\S+) ready\.")


# --------------------------------------------------------------------------------------------
# The `call` binary


@dataclass
class CallResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    elapsed: float

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.strip()]

    @property
    def task_id(self) -> str:
        assert self.lines, f"`call` printed nothing on stdout\n{self}"
        return self.lines[0].strip()

    @property
    def value(self) -> Any:
        assert len(self.lines) >= 2, f"`call --wait` printed no result line\n{self}"
        return json.loads(self.lines[1])

    def json(self) -> Any:
        """The whole of stdout as JSON (e.g. ``celery inspect ... --json``)."""
        try:
            return json.loads(self.stdout)
        except ValueError:
            pytest.fail(f"stdout is not JSON\n{self}", pytrace=False)

    def __str__(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\nexit code: {self.returncode} after {self.elapsed:.2f}s\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{strip_ansi(self.stderr)}"
        )


def publish_until_taken(app: Any, name: str, args: Any, *, task_id: str, attempts: int,
                        errors: Counter[str], republished: set[str], **options: Any) -> None:
    """``app.send_task`` until the broker takes it, through a disruption: each failed publish is
    counted in ``errors`` by exception type, and the task id noted in ``republished`` (the
    broker may have taken a message whose confirmation was lost: a task run twice is then
    explained). Fails after ``attempts`` tries, 0.1 s apart."""
    for _ in range(attempts):
        try:
            app.send_task(name, args, task_id=task_id, **options)
            return
        except Exception as exc:  # noqa: BLE001 - any publish error is retried, then counted
            errors[type(exc).__name__] += 1
            republished.add(task_id)
            time.sleep(0.1)
    raise AssertionError(f"could not publish {task_id} in {attempts} attempts: {dict(errors)}")

def run_call(
    env: Mapping[str, str],
    task: str,
    *,
    args: Iterable[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    queue: str | None = None,
    wait: bool = False,
    timeout: float | None = None,
    extra: Sequence[str] = (),
    process_timeout: float = 90.0,
) -> CallResult:
    """Run ``call <task> --config ...`` with the given options and capture everything."""
    argv = [str(rust_binary("call")), task, "--config", str(rust_config())]
    if args is not None:
        argv += ["--args", json.dumps(list(args))]
    if kwargs is not None:
        argv += ["--kwargs", json.dumps(dict(kwargs))]
    if queue is not None:
        argv += ["--queue", queue]
    if wait:
        argv.append("--wait")
    if timeout is not None:
        argv += ["--timeout", f"{timeout:g}"]
    argv += list(extra)
    return run_command(argv, env, process_timeout=process_timeout)


def run_command(
    argv: Sequence[Any],
    env: Mapping[str, str],
    cwd: Path | None = None,
    process_timeout: float = 90.0,
) -> CallResult:
    """Run a short-lived command to completion, capturing stdout/stderr (fails the test if it
    outlives ``process_timeout``). ``CallResult`` serves any command, not only `call`."""
    argv = [str(a) for a in argv]
    started = time.monotonic()
    try:
        proc = subprocess.run(
            argv,
            env=dict(env),
            cwd=str(cwd) if cwd else None,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=process_timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"`{argv[0]}` did not finish within {process_timeout}s: {' '.join(argv)}\n"
            f"stdout: {exc.stdout!r}\nstderr: {exc.stderr!r}",
            pytrace=False,
        )
    return CallResult(argv, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


# --------------------------------------------------------------------------------------------
# PostgreSQL (the web app's database)


def database_url(name: str, server: str = POSTGRES_URL) -> str:
    return f"{server}/{name}"


def psql(sql: str, database: str = "postgres", timeout: float = 30.0, server: str = POSTGRES_URL) -> str:
    """Run one SQL command with `psql` (unaligned, tuples only) on ``server`` and return its
    stdout; fails the test with psql's message when the command fails."""
    argv = ["psql", database_url(database, server), "-v", "ON_ERROR_STOP=1", "-X", "-A", "-t", "-c", sql]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        pytest.fail("`psql` not found on PATH (needed to inspect and drop the web app's database)", pytrace=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"psql did not answer within {timeout}s: {sql}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"psql failed ({proc.returncode}) on {sql!r}: {proc.stderr.strip()}", pytrace=False)
    return proc.stdout.strip()


def drop_database(name: str) -> None:
    """``DROP DATABASE ... WITH (FORCE)`` (closes the connections still open to it)."""
    quoted = name.replace('"', '""')
    psql(f'DROP DATABASE IF EXISTS "{quoted}" WITH (FORCE)')


# --------------------------------------------------------------------------------------------
# Remote control (pidbox) and the `celery` command line
#
# RabbitMQ and Redis are shared with other runs and developers: every broadcast names its
# destination, the node names of workers this session started (interop_app.GuardedControl
# refuses undirected ones on the fixtures' client apps).


def run_celery(env: Mapping[str, str], *args: Any, process_timeout: float = 60.0) -> CallResult:
    """``python -m celery -A interop_app <args>`` with the venv's interpreter, cwd ``interop/``.

    ``env`` is a broker setup's ``python_env(...)``; ``INTEROP_CONTROL_STRICT=1`` is added so a
    control/inspect command without ``-d`` fails instead of reaching every worker.
    """
    env = {**env, "INTEROP_CONTROL_STRICT": "1"}
    argv = [sys.executable, "-m", "celery", "-A", "interop_app", *args]
    return run_command(argv, env, cwd=INTEROP_DIR, process_timeout=process_timeout)


def celery_json(env: Mapping[str, str], *args: Any, node: str, timeout: float = 10.0) -> Any:
    """``celery <inspect|control> <args> -d <node> --json``: checks the exit code and that
    ``node`` (only) answered; returns its reply."""
    out = run_celery(env, *args, "-d", node, "--timeout", f"{timeout:g}", "--json")
    assert out.returncode == 0, out
    replies = out.json()
    if isinstance(replies, list):  # `control` prints [{node: reply}, ...], `inspect` {node: reply}
        replies = {name: reply for item in replies for name, reply in item.items()}
    assert isinstance(replies, dict) and list(replies) == [node], f"expected a reply from {node} only\n{out}"
    return replies[node]


def _destination(nodes: str | Sequence[str]) -> list[str]:
    destination = [nodes] if isinstance(nodes, str) else list(nodes)
    if not destination or not all(destination):
        raise ValueError(f"a destination is required (shared broker), got {nodes!r}")
    return destination


def inspect_nodes(app: Any, nodes: str | Sequence[str], method: str, *args: Any, timeout: float = 5.0,
                  **kwargs: Any) -> dict[str, Any]:
    """``app.control.inspect(destination=nodes).<method>(...)``; fails unless every node answered.
    Returns ``{node: reply}`` (the call returns as soon as all of them have)."""
    destination = _destination(nodes)
    inspect = app.control.inspect(destination=destination, timeout=timeout, limit=len(destination))
    replies = getattr(inspect, method)(*args, **kwargs) or {}
    missing = [n for n in destination if n not in replies]
    if missing:
        pytest.fail(f"inspect {method}: no reply from {missing} within {timeout}s (got {replies})", pytrace=False)
    return replies


def inspect_node(app: Any, node: str, method: str, *args: Any, timeout: float = 5.0, **kwargs: Any) -> Any:
    """One node's reply to an inspect command."""
    return inspect_nodes(app, [node], method, *args, timeout=timeout, **kwargs)[node]


def control_node(app: Any, node: str, command: str, timeout: float = 5.0, reply: bool = True,
                 **arguments: Any) -> Any:
    """Broadcast ``command`` to ``node`` only; returns its reply (``None`` if ``reply=False``)."""
    replies = app.control.broadcast(command, arguments=arguments, destination=_destination(node),
                                    reply=reply, timeout=timeout, limit=1)
    if not reply:
        return None
    for item in replies or []:
        if node in item:
            return item[node]
    pytest.fail(f"control {command}: no reply from {node} within {timeout}s (got {replies})", pytrace=False)


class EventCapture:
    """Collects the events (``celeryev``) of the given worker nodes in a background thread.

    ``with EventCapture(app, [node]) as events: events.wait_live(); ...``, then
    ``events.of_type("task-succeeded", uuid)`` / ``events.types(uuid)``. Its queue is an
    auto-delete one of its own; it only listens (never wakes workers up).
    """

    def __init__(self, app: Any, nodes: Sequence[str]):
        self.app = app
        self.nodes = set(nodes)
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._receiver = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _on_event(self, event: dict) -> None:
        if event.get("hostname") in self.nodes:
            with self._lock:
                self.events.append(event)

    def _run(self) -> None:
        try:
            with self.app.connection_for_read() as conn:
                receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
                receiver.on_iteration = self._ready.set  # called once the consumer is set up
                self._receiver = receiver
                # wakeup=False: wakeup_workers() would broadcast `heartbeat` to every worker.
                for _ in receiver.consume(limit=None, timeout=None, wakeup=False):
                    pass
        except BaseException as exc:  # noqa: BLE001 - reported by snapshot()
            self._error = exc
        finally:
            self._ready.set()

    def __enter__(self) -> "EventCapture":
        self._thread = threading.Thread(target=self._run, name="event-capture", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            pytest.fail("event receiver did not start within 15 s", pytrace=False)
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        if self._thread is not None:
            self._thread.join(10)

    def snapshot(self) -> list[dict]:
        if self._error:
            raise self._error
        with self._lock:
            return list(self.events)

    def wait_live(self, timeout: float = 15.0) -> None:
        """Until an event of one of the nodes arrived (on Redis the PUB/SUB subscription starts
        with the first poll, so "consumer set up" alone does not prove it)."""
        wait_for(self.snapshot, timeout, interval=0.1,
                 describe=f"any event (e.g. a worker-heartbeat) from {sorted(self.nodes)}")

    def of_type(self, event_type: str, uuid: str | None = None) -> list[dict]:
        return [e for e in self.snapshot() if e.get("type") == event_type and (uuid is None or e.get("uuid") == uuid)]

    def types(self, uuid: str | None = None) -> list[str]:
        return [e["type"] for e in self.snapshot() if uuid is None or e.get("uuid") == uuid]


# --------------------------------------------------------------------------------------------
# HTTP (plain http.client: the web app and Flower)


@dataclass(repr=False)
class Reply:
    method: str
    path: str
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            pytest.fail(f"{self.method} {self.path} answered {self.status} with a body that is not JSON: "
                        f"{self.body[:500]!r}", pytrace=False)

    def __repr__(self) -> str:  # pytest shows assertion messages through repr
        return f"{self.method} {self.path} -> {self.status} {self.headers.get('content-type')} {self.body[:1000]!r}"


PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def scrape(port: int, host: str = "127.0.0.1") -> dict[tuple[str, frozenset], float]:
    """``GET /metrics`` parsed as Prometheus' text format: ``{(sample name, labels): value}``,
    labels as a frozenset of ``(name, value)`` pairs. Checks the status and the content type."""
    from prometheus_client.parser import text_string_to_metric_families

    reply = http_request(host, port, "GET", "/metrics", timeout=10)
    assert reply.status == 200, reply
    assert reply.headers.get("content-type") == PROMETHEUS_TEXT, reply
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(reply.body.decode())
        for sample in family.samples
    }


def sample(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """The value of one series of a scrape; 0 when it is absent (a labelled counter appears
    at its first increment)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def http_request(host: str, port: int, method: str, path: str, body: bytes | None = None,
                 headers: Mapping[str, str] | None = None, timeout: float = 30.0,
                 conn: http.client.HTTPConnection | None = None) -> Reply:
    """One request; on ``conn`` (kept alive) when given, else on a connection of its own."""
    own = conn is None
    conn = conn or http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        data = response.read()
        return Reply(method, path, response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        if own:
            conn.close()


# --------------------------------------------------------------------------------------------
# Flower


def start_flower(setup: Any, scope: Sequence[str], tag: str = "") -> tuple[int, ManagedProcess]:
    """Flower 2.x (``-A interop_app``) on a free port for broker setup ``setup``; waits (bounded)
    for its ``/healthcheck``. Its own remote-control broadcasts go to the nodes of ``scope`` only
    (``INTEROP_CONTROL_DESTINATION``); ``tag`` tells its log apart from other Flowers' of the
    session. Returns the port and the process."""
    port = free_port()
    argv = [
        sys.executable, "-m", "celery", "-A", "interop_app", f"--broker={setup.broker_url}",
        f"--result-backend={setup.result_backend}", "flower", "--address=127.0.0.1", f"--port={port}",
        "--inspect_timeout=3000",
    ]
    env = setup.python_env(setup.queue)
    env.update(FLOWER_UNAUTHENTICATED_API="1", INTEROP_CONTROL_DESTINATION=",".join(scope))
    env.pop("INTEROP_CONTROL_STRICT", None)
    log_path = ARTIFACTS_DIR / f"flower-{setup.name}-{setup.session_id}{f'-{tag}' if tag else ''}.log"
    process = start_process(f"Flower ({setup.name})", argv, env, log_path, cwd=INTEROP_DIR)

    def healthy():
        if not process.alive():
            pytest.fail(f"Flower exited with {process.popen.returncode}; log {log_path}:\n{process.tail()}",
                        pytrace=False)
        try:
            return http_request("127.0.0.1", port, "GET", "/healthcheck", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 30, interval=0.2, describe=lambda: f"Flower /healthcheck; log {log_path}:\n{process.tail()}")
    except BaseException:
        process.stop()
        raise
    return port, process


# --------------------------------------------------------------------------------------------
# Headless Chromium (screenshots; scripts/chromium.sh installs it)

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_binary() -> str | None:
    """Path of a Chromium/Chrome binary (``CHROMIUM`` env first), or ``None``."""
    candidates = [os.environ.get("CHROMIUM", ""), *CHROMIUM_NAMES, "/usr/bin/chromium"]
    for name in candidates:
        if name and (path := shutil.which(name)):
            return path
    return None


def run_chromium(binary: str, profile_dir: Path, *args: str, timeout: float = 90.0) -> CallResult:
    """Headless Chromium with a throw-away profile and no background traffic, plus ``args``."""
    argv = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile_dir}", *args,
    ]
    return run_command(argv, dict(os.environ), process_timeout=timeout)


def chromium_screenshot(binary: str, url: str, png: Path, profile_dir: Path, size: str = "1400,900",
                        virtual_time_ms: int = 5000) -> CallResult:
    """Screenshot of ``url`` into ``png``; the page's JS gets ``virtual_time_ms`` to run first."""
    png.parent.mkdir(parents=True, exist_ok=True)
    return run_chromium(binary, profile_dir, "--hide-scrollbars", f"--window-size={size}",
                        f"--virtual-time-budget={virtual_time_ms}", f"--screenshot={png}", url)


def chromium_dom(binary: str, url: str, profile_dir: Path, virtual_time_ms: int = 5000) -> str:
    """The DOM of ``url`` after its JS ran for ``virtual_time_ms`` (what a screenshot shows, as text)."""
    out = run_chromium(binary, profile_dir, f"--virtual-time-budget={virtual_time_ms}", "--dump-dom", url)
    assert out.returncode == 0, out
    return out.stdout
