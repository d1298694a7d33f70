"""Runs Celery's own integration suite against our worker: ``make celery-suite``.

Fetches the pinned ``celery`` sdist from PyPI into ``target/celery-suite`` (never committed),
then, for each broker asked for, runs the chosen files of its ``t/integration`` with pytest,
our ``rust_session_worker`` plugin in place of Celery's in-process worker. Each pytest session
gets places of its own, so that concurrent runs never meet: a ``redis-server`` started for it
(free local port, no persistence, stopped however the run ends) holding its results in database
0, which the suite's tests also read and write directly (``REDIS_HOST``/``REDIS_PORT``, under fixed
keys such as ``redis-echo``), and its tasks on the Redis broker; on RabbitMQ, a virtual host.
The files that look at the whole Redis server (``OWN_REDIS_FILES``) run in a session of their
own, with a worker of their own. pytest's own summary is printed as each session ends; with
``--results``, every test id and its outcome per broker are written to a Markdown table.

Exit status: 0 when every test passed or failed as ``not_run.toml`` expects; 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import celery
import redis

from processes import stop

CELERY_VERSION = "5.7.0"  # the sdist whose suite is run; the venv's celery must be the same
SUITE_DIR = Path(__file__).resolve().parent
CONFORMANCE_DIR = SUITE_DIR.parent
REPO = CONFORMANCE_DIR.parent
WORK_DIR = REPO / "target" / "celery-suite"
SDIST_ROOT = WORK_DIR / f"celery-{CELERY_VERSION}"
ALL_FILES = ["test_inspect.py", "test_tasks.py", "test_canvas.py", "test_redis_backend.py"]
BROKERS = ["rabbitmq", "redis"]

AMQP_HOST = os.environ.get("CONFORMANCE_AMQP_HOST", "127.0.0.1:5672")
MANAGEMENT_URL = os.environ.get("CONFORMANCE_RABBITMQ_API", "http://127.0.0.1:15672/api")
# Files whose tests count pub/sub channels server-wide (PUBSUB CHANNELS, on the suite's
# REDIS_HOST/REDIS_PORT): their results' channels must be on that server, and no one else's.
OWN_REDIS_FILES = {"test_redis_backend.py"}
REDIS_SERVER = os.environ.get("CONFORMANCE_REDIS_SERVER", "redis-server")
REDIS_START_WITHIN = 10.0  # seconds for a private redis-server to answer PING
NOTHING_COLLECTED = 5  # pytest's exit code when a session selects no test


def fetch_suite() -> None:
    """The sdist, downloaded and unpacked once."""
    if (SDIST_ROOT / "t" / "integration" / "tasks.py").is_file():
        return
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:",
                    "--no-deps", f"celery=={CELERY_VERSION}", "-d", str(WORK_DIR)], check=True)
    with tarfile.open(WORK_DIR / f"celery-{CELERY_VERSION}.tar.gz") as sdist:
        sdist.extractall(WORK_DIR, filter="data")


@contextmanager
def private_redis():
    """A ``redis-server`` of this run's own on a free local port, without persistence; its
    ``host:port``. Stopped, and its directory removed, however the run ends."""
    with socket.socket() as probe:  # a port free now; the server takes it a moment later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    directory = tempfile.mkdtemp(prefix="celery-suite-redis-")
    command = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", directory]
    try:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    except FileNotFoundError as error:
        shutil.rmtree(directory, ignore_errors=True)
        raise SystemExit(f"{REDIS_SERVER} is not installed (make services installs it)") from error
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + REDIS_START_WITHIN
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{' '.join(command)} did not come up "
                                     f"(exit code {server.poll()})") from None
                time.sleep(0.05)
        client.close()
        yield f"127.0.0.1:{port}"
    finally:
        stop(server, grace=10)
        shutil.rmtree(directory, ignore_errors=True)


def management(method: str, path: str, body: dict | None = None) -> None:
    request = urllib.request.Request(
        f"{MANAGEMENT_URL}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json",
                 "authorization": "Basic " + base64.b64encode(b"guest:guest").decode()})
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.URLError as error:
        raise SystemExit(f"RabbitMQ's management API at {MANAGEMENT_URL} answered {error} "
                         f"(make services enables it)") from error


@contextmanager
def rabbitmq_vhost():
    """A RabbitMQ virtual host of this run's own, deleted with everything in it at the end."""
    vhost = f"celery-suite-{uuid.uuid4().hex[:12]}"
    management("PUT", f"/vhosts/{vhost}")
    management("PUT", f"/permissions/{vhost}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
    try:
        yield f"amqp://guest:guest@{AMQP_HOST}/{vhost}"
    finally:
        management("DELETE", f"/vhosts/{vhost}")


def run_broker(broker: str, files: list[str], extra: list[str]) -> tuple[int, dict]:
    """Runs the suite's ``files`` on ``broker``; pytest's exit code and each test's outcome.
    The files of ``OWN_REDIS_FILES`` run in a session of their own on a private Redis."""
    log = WORK_DIR / f"worker-{broker}.log"
    log.unlink(missing_ok=True)
    shared = [name for name in files if name not in OWN_REDIS_FILES]
    own = [name for name in files if name in OWN_REDIS_FILES]
    codes, outcomes = [], {}
    if shared:
        # Results in database 0, where the suite's tests read them through REDIS_HOST/REDIS_PORT
        # (test_chord_on_error reads a chord's saved results so), and on Redis tasks in 1.
        with private_redis() as host, broker_place(broker, f"redis://{host}/1") as broker_url:
            code, found = run_session(broker, shared, extra, broker_url, f"redis://{host}/0", host, log)
        codes.append(code)
        outcomes.update(found)
    if own:
        # Results in database 1 and, on Redis, tasks in 2: database 0 takes the records.
        with private_redis() as host, broker_place(broker, f"redis://{host}/2") as broker_url:
            code, found = run_session(broker, own, extra, broker_url, f"redis://{host}/1", host, log)
        codes.append(code)
        outcomes.update(found)
    ran = [code for code in codes if code != NOTHING_COLLECTED] or codes
    return max(ran, default=0), outcomes


def broker_place(broker: str, redis_url: str):
    """This run's place on ``broker``: a virtual host of its own, or ``redis_url``."""
    return rabbitmq_vhost() if broker == "rabbitmq" else nullcontext(redis_url)


def run_session(broker: str, files: list[str], extra: list[str], broker_url: str, backend: str,
                records: str, log: Path) -> tuple[int, dict]:
    """One pytest session of ``files`` with our worker on ``broker_url``, results in
    ``backend``, and the suite's records (REDIS_HOST/REDIS_PORT) on the Redis at ``records``."""
    outcomes_path = WORK_DIR / f"outcomes-{broker}.json"
    outcomes_path.unlink(missing_ok=True)
    host, _, port = records.rpartition(":")
    env = {
        **os.environ,
        "TEST_BROKER": broker_url,
        "TEST_BACKEND": backend,
        "REDIS_HOST": host,
        "REDIS_PORT": port,
        "CONFORMANCE_BROKER": broker,
        "CONFORMANCE_WORKER": str(binary()),
        "CONFORMANCE_CONFIG": str(CONFORMANCE_DIR / "celeryconfig.toml"),
        "CONFORMANCE_NOT_RUN": str(CONFORMANCE_DIR / "not_run.toml"),
        "CONFORMANCE_LOG": str(log),
        "CONFORMANCE_OUTCOMES": str(outcomes_path),
        "PYTHONPATH": os.pathsep.join([str(SDIST_ROOT), str(SUITE_DIR)]),
    }
    print(f"\n=== Celery {CELERY_VERSION}'s integration suite ({', '.join(files)}) on {broker} "
          f"({broker_url}, results in {backend}, records on {records}); our worker logs to {log}",
          flush=True)
    command = [sys.executable, "-m", "pytest", "-p", "rust_session_worker", "-p", "celery.contrib.pytest",
               "-p", "no:cacheprovider", "-q", "-rfE",
               *(f"t/integration/{name}" for name in files), *extra]
    code = subprocess.run(command, cwd=SDIST_ROOT, env=env).returncode
    outcomes = json.loads(outcomes_path.read_text()) if outcomes_path.is_file() else {}
    return code, outcomes


@contextmanager
def nullcontext(value):
    yield value


def binary() -> Path:
    path = Path(os.environ.get("RCELERY_BIN_DIR", REPO / "target" / "debug")) / "conformance-worker"
    if not os.access(path, os.X_OK):
        raise SystemExit(f"{path} is not built: cargo build -p conformance")
    return path


def write_results(path: Path, files: list[str], by_broker: dict[str, dict]) -> None:
    """The table of every test id against each broker, and why each test not run is not."""
    ids = sorted({test for outcomes in by_broker.values() for test in outcomes})
    brokers = list(by_broker)
    counts = {b: {} for b in brokers}
    for broker, outcomes in by_broker.items():
        for outcome, _ in outcomes.values():
            counts[broker][outcome] = counts[broker].get(outcome, 0) + 1
    lines = [
        f"# Celery {CELERY_VERSION}'s integration suite against our worker",
        "",
        f"Written by `make celery-suite`: the files {', '.join(f'`{f}`' for f in files)} of "
        f"`t/integration/` in the `celery=={CELERY_VERSION}` sdist, run by pytest against "
        "`conformance-worker` (the suite's tasks ported to Rust in `conformance/src/`), with no "
        "Python worker. A test *not run* is listed in `conformance/not_run.toml` with the reason; "
        "it still runs, and must fail (a listed test that passes fails the run).",
        "",
        "| broker | " + " | ".join(["passed", "failed", "not run", "skipped by the suite"]) + " |",
        "|---|---|---|---|---|",
    ]
    for broker in brokers:
        c = counts[broker]
        lines.append(f"| {broker} | {c.get('passed', 0)} | {c.get('failed', 0)} | "
                     f"{c.get('not run', 0)} | {c.get('skipped', 0)} |")
    lines += ["", "| test | " + " | ".join(brokers) + " |", "|---" * (len(brokers) + 1) + "|"]
    reasons = {}
    for test in ids:
        cells = []
        for broker in brokers:
            outcome, detail = by_broker[broker].get(test, ("absent", ""))
            if outcome in ("not run", "skipped"):
                number = reasons.setdefault(detail, len(reasons) + 1)
                cells.append(f"{outcome} [{number}]")
            else:
                cells.append(outcome)
        lines.append(f"| `{test}` | " + " | ".join(cells) + " |")
    lines += ["", "## Why", ""]
    lines += [f"{number}. {reason}" for reason, number in reasons.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=BROKERS, action="append",
                        help="run on this broker (repeatable; default: both)")
    parser.add_argument("--file", action="append", choices=ALL_FILES, dest="files",
                        help="a file of t/integration to run (repeatable; default: all four)")
    parser.add_argument("--results", type=Path, help="write the Markdown table of outcomes here")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args()
    if celery.__version__ != CELERY_VERSION:
        raise SystemExit(f"the venv has celery {celery.__version__}, the suite is {CELERY_VERSION}")
    fetch_suite()
    files = args.files or ALL_FILES
    by_broker, failed = {}, False
    for broker in args.broker or BROKERS:
        code, by_broker[broker] = run_broker(broker, files, args.pytest_args)
        failed |= code != 0
    if args.results:
        write_results(args.results, files, by_broker)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
