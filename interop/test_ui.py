"""The ``/ui`` page (issue #20): the task history for people, rendered by headless Chromium from
the app's own JSON routes while a real Rust worker runs tasks under the monitor.

The rendered DOM must show the tasks (names and states) in the table, the selected task's
timeline (its stages with times, its worker and runtime), a running job's progress (from
``/status``), and one chart per task name whose total is what ``/history`` lists for that name;
anything the page's JS fails to draw fails the test. The screenshot goes to
``artifacts/ui.png`` (``docs/ui.png`` in the README is a copy).

One broker only: the page reads the database, and ``test_history.py`` already records the
history on both brokers.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from interop_helpers import ARTIFACTS_DIR, chromium_binary, chromium_dom, chromium_screenshot, wait_for
from test_history import TIMEOUT, events_client, history, history_database, monitor_env, wait_listening, wait_recorded
from test_monitoring import png_size
from web_process import running_web

pytestmark = pytest.mark.parametrize("broker", ["redis"], indirect=True)

# The only absolute URL the page may hold: the SVG namespace's name, which is never fetched.
SVG_NAMESPACE = "http://www.w3.org/2000/svg"
ROW = re.compile(r'<tr data-task="([0-9a-f-]{36})"[^>]*>(.*?)</tr>')
STAGE = re.compile(r'<div class="stage" data-stage="([\w-]+)"[^>]*>.*?<span class="when( missing)?"[^>]*>([^<]*)</span>')
CHART = re.compile(r'<figure class="chart" data-name="([^"]+)" data-total="(\d+)">(.*?)</figure>')


@pytest.mark.timeout(120)
def test_the_ui_page_draws_the_tasks_a_timeline_and_the_throughput(broker, spawn_rust_worker, tmp_path):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium found (chromium, chromium-browser, google-chrome or $CHROMIUM); "
                    "`bash scripts/chromium.sh` installs it as root")
    client = events_client(broker)
    queue, monitor_queue, probe_queue = (broker.new_queue(f"ui{suffix}") for suffix in ("", "-monitor", "-probe"))
    # The web app's own sends are dated too (task-sent), so a job of /receive has a whole timeline.
    env = {**monitor_env(monitor_queue), "CELERY_TASK_SEND_SENT_EVENT": "true"}
    with history_database(broker, "ui") as database, running_web(broker, database, tag="ui", extra_env=env) as web:
        worker = spawn_rust_worker([queue], tag="ui", task_events=True,
                                   extra_env={"CELERY_WORKER_HEARTBEAT_INTERVAL": "1"})
        wait_listening(web, client, probe_queue)
        calls = [("tasks.add", (x, x), "SUCCESS") for x in range(5)] + \
            [("tasks.mul", (x, 3), "SUCCESS") for x in range(3)] + [("tasks.fail", ("boom",), "FAILURE")]
        expected = {client.send_task(name, args=args, queue=queue).id: (name, state) for name, args, state in calls}
        for task_id in expected:
            client.AsyncResult(task_id).get(timeout=TIMEOUT, propagate=False)
        # A job long enough to be running while the page is drawn; terminated at the end.
        running = web.submit({"task": "tasks.progress", "args": [60, 500], "queue": queue})
        recorded: dict[str, tuple] = {}

        def all_recorded():
            recorded.update({task["task_id"]: (task["name"], task["state"]) for task in history(web)})
            return all(recorded.get(task_id) == row for task_id, row in expected.items())

        wait_for(all_recorded, TIMEOUT, interval=0.25, describe=lambda: f"the page's tasks in the history: {recorded}")
        wait_for(lambda: (web.status(running)["progress"] or {}).get("current", 0) >= 1, TIMEOUT, interval=0.1,
                 describe=lambda: f"the progress job's progress: {web.status(running)}")
        wait_recorded(web, worker.hostname, {running: "PROGRESS"}, "the progress job")

        page = web.get("/ui")
        assert page.status == 200 and page.headers.get("content-type", "").startswith("text/html"), page
        outside = set(re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+[^\s\"'<>)]*", page.body.decode())) - {SVG_NAMESPACE}
        assert not outside, f"/ui refers outside the app: {outside}"

        added = next(iter(expected))  # the first tasks.add
        url = f"http://127.0.0.1:{web.port}/ui"
        dom = chromium_dom(binary, f"{url}#{added}", tmp_path / "chromium-dom")

        # The table: every task with its name and state.
        table = dict(ROW.findall(dom))
        for task_id, (name, state) in expected.items():
            assert task_id in table, f"{task_id} not in the table; rows {list(table)}"
            cells = table[task_id]
            assert f'<span class="state {state}">{state}</span>' in cells, cells
            assert f'<td class="name" title="{name}">{name}</td>' in cells, cells
        assert 'class="state custom">PROGRESS<' in table[running], table[running]

        # The timeline of the task in the URL: every stage dated, its worker and runtime.
        assert f'<div id="stages" data-task="{added}">' in dom, "no timeline of the selected task"
        stages = {stage: (missing, when) for stage, missing, when in STAGE.findall(dom)}
        assert list(stages) == ["sent", "received", "started", "SUCCESS"], stages
        assert all(not missing and when for missing, when in stages.values()), stages
        assert f'<dd class="worker">{worker.hostname}</dd>' in dom, "the timeline lacks the worker"
        assert re.search(r'<dd class="runtime">[\d.]+ (µs|ms|s) ', dom), "the timeline lacks the runtime"

        # A chart per name, each total what the history lists for that name, with its bars.
        listed = Counter(task["name"] for task in history(web))
        charts = {name: (int(total), svg) for name, total, svg in CHART.findall(dom)}
        assert {name: total for name, (total, _) in charts.items()} == dict(listed), charts
        assert all('<rect class="bar"' in svg for _, svg in charts.values()), charts

        # The running job: its progress, read from /status.
        dom = chromium_dom(binary, f"{url}#{running}", tmp_path / "chromium-progress")
        progress = re.search(r'data-stage="progress".*?<meter[^>]*>.*?<span class="when">(\d+)/60 ', dom)
        assert progress and int(progress.group(1)) >= 1, "the running job's progress is not drawn"

        broker.app.control.revoke(running, terminate=True, destination=[worker.hostname])
        wait_recorded(web, worker.hostname, {running: "REVOKED"}, "the terminated progress job")
        png = ARTIFACTS_DIR / "ui.png"
        png.unlink(missing_ok=True)
        out = chromium_screenshot(binary, f"{url}#{added}", png, tmp_path / "chromium-screenshot")
        assert out.returncode == 0 and png.is_file(), out
        assert png_size(png) == (1400, 900), png_size(png)
        assert png.stat().st_size > 20_000, f"{png} is only {png.stat().st_size} bytes"
