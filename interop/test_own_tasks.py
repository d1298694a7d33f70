"""A crate of one's own tasks (examples/own-tasks), built on the runtime with a worker binary of a
few lines, serves Python like ours: its task runs, and its failure re-raises in Python."""

from __future__ import annotations

import pytest
from celery.exceptions import NotRegistered

GET_TIMEOUT = 20


@pytest.mark.timeout(60)
def test_python_calls_the_tasks_of_a_crate_of_ones_own(broker, spawn_rust_worker):
    queue = broker.new_queue("own-tasks")
    spawn_rust_worker([queue], tag="own", binary="own-tasks-worker")
    app = broker.app
    assert app.send_task("own.reverse", ("rcelery",), queue=queue).get(timeout=GET_TIMEOUT) == "yrelecr"
    assert app.send_task("own.divide", (7, 2), queue=queue).get(timeout=GET_TIMEOUT) == 3.5
    with pytest.raises(RuntimeError, match="division by zero"):
        app.send_task("own.divide", (1, 0), queue=queue).get(timeout=GET_TIMEOUT)
    # Its registry is its own: the product's tasks are not there.
    with pytest.raises(NotRegistered):
        app.send_task("tasks.add", (1, 2), queue=queue).get(timeout=GET_TIMEOUT)
