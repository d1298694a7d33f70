"""Small helpers shared by the fixtures and the tests: waiting, processes, the `call` binary."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pytest

INTEROP_DIR = Path(__file__).resolve().parent
REPO_DIR = INTEROP_DIR.parent
ARTIFACTS_DIR = INTEROP_DIR / "artifacts"
BIN_DIR = Path(os.environ.get("RCELERY_BIN_DIR") or REPO_DIR / "target" / "debug")
CONFIG_PATH = Path(os.environ.get("RCELERY_CONFIG") or REPO_DIR / "celeryconfig.toml")
# The PostgreSQL server of the web app's tests (each session creates and drops its own database).
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

    def __str__(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\nexit code: {self.returncode} after {self.elapsed:.2f}s\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{strip_ansi(self.stderr)}"
        )


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
    started = time.monotonic()
    try:
        proc = subprocess.run(
            argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=process_timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"`call` did not finish within {process_timeout}s: {' '.join(argv)}\n"
            f"stdout: {exc.stdout!r}\nstderr: {exc.stderr!r}",
            pytrace=False,
        )
    return CallResult(argv, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


# --------------------------------------------------------------------------------------------
# PostgreSQL (the web app's database)


def database_url(name: str) -> str:
    return f"{POSTGRES_URL}/{name}"


def psql(sql: str, database: str = "postgres", timeout: float = 30.0) -> str:
    """Run one SQL command with `psql` (unaligned, tuples only) and return its stdout; fails the
    test with psql's message when the command fails."""
    argv = ["psql", database_url(database), "-v", "ON_ERROR_STOP=1", "-X", "-A", "-t", "-c", sql]
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
