"""Ways to hurt the services without hurting anybody else's use of them.

The local RabbitMQ, Redis and PostgreSQL are shared by every test of the run (and by a
developer's other work), so nothing here restarts them or cuts everyone's connections:

* :class:`PrivatePostgres`: a PostgreSQL server of the test's own (``initdb`` in a temporary
  folder, a free port) that it may stop, start and restart.
* :func:`rabbitmq_vhost` and :func:`close_rabbitmq_connections`: a RabbitMQ virtual host of the
  test's own, and closing every connection to that vhost alone (``rabbitmqctl``).
* :func:`kill_redis_clients`: ``CLIENT KILL`` of the connections to given Redis databases,
  which the test keeps for itself.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import quote

import pytest
import redis as redis_py

from interop_helpers import free_port

COMMAND_TIMEOUT = 60.0


def _run(argv: list[str], what: str, timeout: float = COMMAND_TIMEOUT) -> str:
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        pytest.fail(f"{what}: `{argv[0]}` not found", pytrace=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: `{' '.join(argv)}` did not finish within {timeout:.0f}s", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"{what}: `{' '.join(argv)}` exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}",
                    pytrace=False)
    return proc.stdout


# --------------------------------------------------------------------------------------------
# PostgreSQL


def _postgres_bindir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` are: Debian keeps them off PATH, under
    /usr/lib/postgresql/<version>/bin (``pg_config --bindir`` names it)."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
        candidates.append(Path(out))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    pytest.fail("initdb and pg_ctl not found (Debian package postgresql); `make services` installs it",
                pytrace=False)


class PrivatePostgres:
    """A PostgreSQL server of this test alone, on 127.0.0.1 and a free port, trust auth, user
    ``postgres``; fsync off (its data is thrown away). Root runs it as the ``postgres`` user, since
    the server refuses to run as root."""

    def __init__(self) -> None:
        self.bindir = _postgres_bindir()
        self.folder = Path(tempfile.mkdtemp(prefix="rcelery-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.url = f"postgres://postgres@127.0.0.1:{self.port}"
        self._as_owner: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.folder, user="postgres", group="postgres")
            self._as_owner = ["runuser", "-u", "postgres", "--"]

    def _pg(self, *args: str, what: str) -> str:
        return _run([*self._as_owner, *args], what)

    def init(self) -> "PrivatePostgres":
        self._pg(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                 "--no-sync", what="initdb of a private PostgreSQL")
        return self

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                   f"-c fsync=off -c full_page_writes=off")
        self._pg(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "server.log"),
                 "-o", options, "-w", "-t", "60", "start", what="start of the private PostgreSQL")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: clients are disconnected, the server shuts down cleanly (a restart's first half)."""
        self._pg(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop",
                 what="stop of the private PostgreSQL")

    def log_text(self) -> str:
        try:
            return (self.folder / "server.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def remove(self) -> None:
        subprocess.run([*self._as_owner, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                        "stop"], capture_output=True, timeout=COMMAND_TIMEOUT)
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A running :class:`PrivatePostgres`, removed (data and all) on the way out."""
    server = PrivatePostgres()
    try:
        server.init().start()
        yield server
    finally:
        server.remove()


# --------------------------------------------------------------------------------------------
# RabbitMQ


@contextmanager
def rabbitmq_vhost(name: str, host: str = "127.0.0.1", port: int = 5672) -> Iterator[str]:
    """A vhost of this test (``guest`` may use it), deleted with all it holds on the way out.
    Yields its broker URL."""
    _run(["rabbitmqctl", "add_vhost", name], "creating a RabbitMQ vhost")
    try:
        _run(["rabbitmqctl", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
             "letting guest use the test's vhost")
        yield f"amqp://guest:guest@{host}:{port}/{quote(name, safe='')}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=COMMAND_TIMEOUT)


def close_rabbitmq_connections(vhost: str, reason: str = "chaos test") -> None:
    """Closes every client connection to ``vhost`` (other vhosts are untouched)."""
    _run(["rabbitmqctl", "close_all_connections", "--vhost", vhost, "--limit", "10000", reason],
         "closing RabbitMQ connections")


# --------------------------------------------------------------------------------------------
# Redis


def kill_redis_clients(url: str, databases: Iterable[int]) -> int:
    """``CLIENT KILL`` of every connection whose current database is one of ``databases``, except
    the one doing it; returns how many were killed."""
    wanted = set(databases)
    killer = redis_py.Redis.from_url(url)
    try:
        me = killer.client_id()
        killed = 0
        for client in killer.client_list():
            if int(client["db"]) in wanted and int(client["id"]) != me:
                killed += int(killer.client_kill_filter(_id=client["id"]) or 0)
        return killed
    finally:
        killer.close()
