"""pytest plugin (``-p rust_session_worker``): Celery's integration suite against our worker.

Celery's ``celery_session_worker`` fixture starts a Python worker inside pytest's process. This
plugin puts in its place one that starts our ``conformance-worker`` as a process of its own, under
the node name the suite expects replies from (``anon_nodename()``: ``gen<pid>@<host>``), on the
suite's broker and backend (``TEST_BROKER``, ``TEST_BACKEND``), and stops it at the end.

It also reads the not-run list (``CONFORMANCE_NOT_RUN``, a TOML file of test id -> reason, in
``[all]`` and per-broker tables) and marks each listed test strictly expected to fail: it still
runs, and a listed test that passes fails the run, so the list can only shrink. Its ``[skip]``
table holds the few tests whose outcome does not depend on the worker at all (they fail with
Celery's own worker too): those are skipped, with the reason.

Environment, set by ``conformance/suite/run.py``: ``CONFORMANCE_WORKER`` (the binary),
``CONFORMANCE_CONFIG`` (its settings file), ``CONFORMANCE_BROKER`` (``rabbitmq`` or ``redis``),
``CONFORMANCE_LOG`` (the worker's log file).
"""

import json
import os
import subprocess
import time
import tomllib

import celery.contrib.pytest as celery_pytest
import pytest
from celery.utils.nodenames import anon_nodename
from processes import stop

START_WITHIN = 30.0  # seconds for the worker to answer a ping


def not_run(path: str, broker: str) -> tuple[dict[str, str], dict[str, str]]:
    """For ``broker``: test id -> why it is expected to fail, and test id -> why it is skipped."""
    with open(path, "rb") as file:
        listed = tomllib.load(file)
    unknown = set(listed) - {"all", "rabbitmq", "redis", "skip"}
    if unknown:
        raise pytest.UsageError(f"{path}: unknown tables {sorted(unknown)}")
    return {**listed.get("all", {}), **listed.get(broker, {})}, listed.get("skip", {})


def pytest_collection_modifyitems(config, items):
    path = os.environ.get("CONFORMANCE_NOT_RUN")
    if not path:
        return
    failing, skipped = not_run(path, os.environ["CONFORMANCE_BROKER"])
    for item in items:
        if item.nodeid in skipped:
            item.add_marker(pytest.mark.skip(reason=f"not run: {skipped[item.nodeid]}"))
        elif item.nodeid in failing:
            item.add_marker(pytest.mark.xfail(reason=failing[item.nodeid], strict=True, run=True))


@pytest.fixture(scope="session")
def celery_session_worker(celery_session_app):
    """Our worker, consuming the suite's ``celery`` queue, alive for the whole session."""
    node = anon_nodename()
    env = {key: value for key, value in os.environ.items() if not key.startswith("CELERY_")}
    env.update(
        CELERY_BROKER_URL=os.environ["TEST_BROKER"],
        CELERY_RESULT_BACKEND=os.environ["TEST_BACKEND"],
        NO_COLOR="1",
        RUST_BACKTRACE="1",
    )
    command = [
        os.environ["CONFORMANCE_WORKER"],
        "--config", os.environ["CONFORMANCE_CONFIG"],
        "-n", node, "-Q", "celery", "-c", "1", "-l", "info",
    ]
    with open(os.environ["CONFORMANCE_LOG"], "ab") as log:
        worker = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_WITHIN
        while not celery_session_app.control.ping([node], timeout=0.5):
            if worker.poll() is not None or time.monotonic() > deadline:
                pytest.exit(f"our worker {node} did not come up (exit code {worker.poll()}); "
                            f"see {os.environ['CONFORMANCE_LOG']}", returncode=3)
        yield worker
    finally:
        stop(worker, grace=30)


# The suite's conftest imports this fixture from celery.contrib.pytest by name: replacing it
# there, before any conftest is imported, is what makes the suite use ours.
celery_pytest.celery_session_worker = celery_session_worker


# --------------------------------------------------------------------------------------------
# Outcomes, for RESULTS.md: test id -> [outcome, detail], written at the end of the session to
# CONFORMANCE_OUTCOMES. A test's outcome is its last report's (pytest-rerunfailures reruns it).

outcomes: dict[str, list[str]] = {}


def pytest_runtest_logreport(report):
    if report.outcome == "rerun" or (report.passed and report.when != "call"):
        return
    if hasattr(report, "wasxfail") and report.skipped:  # xfail-marked, and failed as expected
        outcome = ("not run", report.wasxfail)
    elif str(report.longrepr).startswith("[XPASS(strict)]"):
        outcome = ("failed", "listed as not run in not_run.toml, but passed: take it off the list")
    elif report.skipped and skip_reason(report).startswith("not run: "):
        outcome = ("not run", skip_reason(report).removeprefix("not run: "))
    elif report.skipped:
        outcome = ("skipped", skip_reason(report))
    elif report.failed:
        where = "" if report.when == "call" else f" (in {report.when})"
        outcome = ("failed", report.head_line + where if report.head_line else report.when)
    else:
        outcome = ("passed", "")
    if outcomes.get(report.nodeid, ("passed",))[0] != "failed":  # a failed teardown stays failed
        outcomes[report.nodeid] = list(outcome)


def skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2].removeprefix("Skipped: ") if isinstance(longrepr, tuple) else str(longrepr)


def pytest_sessionfinish(session):
    path = os.environ.get("CONFORMANCE_OUTCOMES")
    if path:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(outcomes, file, indent=1, sort_keys=True)
