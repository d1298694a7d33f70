"""Celery canvas across languages: chains, links and errbacks built in Python, with steps that run
on the Rust worker (``tasks.*``, the ``rust`` fixture's queue) and on a stock Python worker
(``py.*``, the ``py_worker`` fixture's queue), each broker.

Each shape is also run with Python workers only (``py_twin`` runs Python twins of the Rust
tasks) and must give the same value as Celery does there.

The Rust worker follows what the message carries: the next chain step (the last element of
``embed.chain``), ``callbacks`` and ``errbacks``, with ``parent_id`` / ``root_id`` and the
``children`` of the stored result, as a Python worker does; chord header members run by
either kind of worker are counted in the chord join Celery's Redis backend keeps, and whichever
completes the chord sends its body.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from celery import chain, chord, group
from celery.exceptions import ChordError
from celery.result import GroupResult

from interop_helpers import ALL_BROKER_SETUPS, logged_task_ids, run_command, rust_binary, rust_config, wait_state

pytestmark = ALL_BROKER_SETUPS

GET_TIMEOUT = 30


def rust_sig(setup, name: str, *args, immutable: bool = False, queue: str | None = None):
    """A ``tasks.*`` step, for the Rust worker's queue unless ``queue`` names another."""
    sig = setup.app.signature(name, args=args, queue=queue or setup.queue)
    return sig.set(immutable=True) if immutable else sig


def py_sig(setup, name: str, *args, immutable: bool = False):
    sig = setup.app.signature(name, args=args, queue=setup.py_queue)
    return sig.set(immutable=True) if immutable else sig


def meta(setup, task_id: str) -> dict:
    return setup.app.backend.get_task_meta(task_id)


def compared(setup, twin, build, read=None):
    """Runs ``build(queue)`` with the Rust worker's queue and with the Python twin's; asserts
    both give the same (``read(result)``, by default ``get()``) and returns it."""
    read = read or (lambda result: result.get(timeout=GET_TIMEOUT))
    ours = read(build(setup.queue).apply_async())
    celerys = read(build(twin.queue).apply_async())
    assert ours == celerys, f"Rust steps gave {ours!r}, Python-only workers {celerys!r}"
    return ours


@pytest.mark.timeout(90)
def test_chain_of_python_and_rust_steps(rust, py_worker, py_twin):
    setup = rust.setup

    def build(queue):
        return chain(py_sig(setup, "py.mul", 2, 3), rust_sig(setup, "tasks.add", 4, queue=queue),
                     py_sig(setup, "py.mul", 10), rust_sig(setup, "tasks.add", 1, queue=queue))

    assert compared(setup, py_twin, build) == 101
    result = build(setup.queue).apply_async()
    assert result.get(timeout=GET_TIMEOUT) == 101
    rust_step, py_step, first = result.parent.parent, result.parent, result.parent.parent.parent
    assert [r.get(timeout=GET_TIMEOUT) for r in (first, rust_step, py_step)] == [6, 10, 100]
    stored = meta(setup, rust_step.id)
    assert stored["parent_id"] == first.id, stored
    assert [child[0][0] for child in stored["children"]] == [py_step.id], stored
    assert meta(setup, result.id)["parent_id"] == py_step.id


@pytest.mark.timeout(60)
def test_chain_on_the_rust_worker_alone(rust):
    setup = rust.setup
    result = (rust_sig(setup, "tasks.add", 1, 1) | rust_sig(setup, "tasks.add", 2)
              | rust_sig(setup, "tasks.mul", 3)).apply_async()
    assert result.get(timeout=GET_TIMEOUT) == 12
    assert result.parent.get(timeout=GET_TIMEOUT) == 4


@pytest.mark.timeout(60)
def test_link_callbacks_run_with_the_result(rust, py_worker, py_twin):
    setup = rust.setup

    def build(queue):
        links = [py_sig(setup, "py.mul", 10), rust_sig(setup, "tasks.add", 1, queue=queue),
                 rust_sig(setup, "tasks.add", 20, 22, immutable=True, queue=queue)]
        return rust_sig(setup, "tasks.add", 2, 2, queue=queue).set(link=links)

    def children_values(result):
        result.get(timeout=GET_TIMEOUT)
        wait_state(result, "SUCCESS")
        return [c.get(timeout=GET_TIMEOUT) for c in result.children or []]

    # Several callbacks go out as one group, so the one child is a GroupResult.
    assert compared(setup, py_twin, build, children_values) == [[40, 5, 42]]
    result = build(setup.queue).apply_async()
    assert result.get(timeout=GET_TIMEOUT) == 4
    (callbacks,) = result.children
    assert [c.get(timeout=GET_TIMEOUT) for c in callbacks.results] == [40, 5, 42]
    for child in callbacks.results:
        assert meta(setup, child.id)["parent_id"] == result.id
    single = rust_sig(setup, "tasks.add", 1, 1).set(link=py_sig(setup, "py.mul", 3)).apply_async()
    assert single.get(timeout=GET_TIMEOUT) == 2
    assert [c.get(timeout=GET_TIMEOUT) for c in single.children] == [6]


@pytest.mark.timeout(60)
def test_link_error_runs_after_a_rust_failure(rust, py_worker):
    setup = rust.setup
    errback = py_sig(setup, "py.mul", 6, 7, immutable=True)
    errback_id = errback.freeze().id
    result = rust_sig(setup, "tasks.fail", "boom").apply_async(link_error=errback)
    with pytest.raises(RuntimeError, match="boom"):
        result.get(timeout=GET_TIMEOUT)
    assert setup.app.AsyncResult(errback_id).get(timeout=GET_TIMEOUT) == 42


@pytest.mark.timeout(60)
def test_an_old_style_errback_gets_the_failed_task_id(rust, py_worker):
    setup = rust.setup
    errback = py_sig(setup, "py.concat", "-failed")
    errback_id = errback.freeze().id
    result = rust_sig(setup, "tasks.fail", "boom").apply_async(link_error=errback)
    with pytest.raises(RuntimeError):
        result.get(timeout=GET_TIMEOUT)
    assert setup.app.AsyncResult(errback_id).get(timeout=GET_TIMEOUT) == f"{result.id}-failed"


@pytest.mark.timeout(60)
def test_a_failed_rust_step_fails_the_rest_of_the_chain(rust, py_worker):
    setup = rust.setup
    result = chain(
        rust_sig(setup, "tasks.add", 1, 1),
        rust_sig(setup, "tasks.fail", "step two broke", immutable=True),
        py_sig(setup, "py.mul", 2),
        rust_sig(setup, "tasks.add", 3),
    ).apply_async()
    with pytest.raises(RuntimeError, match="step two broke"):
        result.get(timeout=GET_TIMEOUT)  # raises the failed parent's error as soon as it is stored
    # The steps that never ran share the failure (stored just after the failed step's own).
    assert wait_state(result, "FAILURE") == "FAILURE"
    assert wait_state(result.parent, "FAILURE") == "FAILURE", "the Python step never ran"
    assert result.parent.parent.state == "FAILURE"
    with pytest.raises(RuntimeError, match="step two broke"):
        result.parent.get(timeout=GET_TIMEOUT, propagate=True)
    assert result.parent.parent.parent.get(timeout=GET_TIMEOUT) == 2


@pytest.mark.timeout(60)
def test_a_chain_ending_in_a_group_fans_out_from_rust(rust, py_worker, py_twin):
    setup = rust.setup

    def build(queue):
        return chain(rust_sig(setup, "tasks.add", 1, 1, queue=queue),
                     group(py_sig(setup, "py.mul", 10), rust_sig(setup, "tasks.mul", 100, queue=queue),
                           rust_sig(setup, "tasks.add", 5, queue=queue)))

    assert compared(setup, py_twin, build) == [20, 200, 7]
    result = build(setup.queue).apply_async()
    assert result.get(timeout=GET_TIMEOUT) == [20, 200, 7]
    members = [meta(setup, r.id) for r in result.results]
    assert {m["group_id"] for m in members} == {result.id}, members


@pytest.mark.timeout(60)
def test_chord_with_a_rust_header_and_body(rust):
    setup = rust.setup
    result = chord([rust_sig(setup, "tasks.mul", i, 2) for i in range(10)], rust_sig(setup, "tasks.xsum")).apply_async()
    assert result.get(timeout=GET_TIMEOUT) == 90


@pytest.mark.timeout(60)
def test_chord_members_from_both_languages_reach_the_body_in_header_order(rust, py_worker, py_twin):
    setup = rust.setup

    def header(queue):
        return [rust_sig(setup, "tasks.mul", i, 2, queue=queue) if i % 2 else py_sig(setup, "py.mul", i, 2)
                for i in range(20)]

    expected = [2 * i for i in range(20)]
    to_rust_body = compared(setup, py_twin, lambda q: chord(header(q), rust_sig(setup, "tasks.echo", queue=q)))
    assert to_rust_body == expected
    assert compared(setup, py_twin, lambda q: chord(header(q), py_sig(setup, "py.xsum"))) == sum(expected)


@pytest.mark.timeout(60)
def test_a_failed_rust_member_fails_the_chord_body(rust, py_worker):
    setup = rust.setup
    header = [rust_sig(setup, "tasks.add", 1, 1), rust_sig(setup, "tasks.fail", "boom"), py_sig(setup, "py.mul", 2, 3)]
    result = chord(header, py_sig(setup, "py.xsum")).apply_async()
    with pytest.raises(RuntimeError, match="boom"):
        result.get(timeout=GET_TIMEOUT)  # the failed member's own error first, as Celery raises it
    assert wait_state(result, "FAILURE") == "FAILURE"
    assert isinstance(result.result, ChordError), result.result
    assert "raised RuntimeError('boom')" in str(result.result)


@pytest.mark.timeout(120)
def test_a_chord_of_a_thousand_rust_members_completes_exactly_once(rust):
    setup = rust.setup
    result = chord([rust_sig(setup, "tasks.add", i, 0) for i in range(1000)], rust_sig(setup, "tasks.xsum")).apply_async()
    assert result.get(timeout=90) == sum(range(1000))
    assert logged_task_ids(rust.process, "task succeeded").count(result.id) == 1


def call_canvas(setup, canvas, freeze: bool = True) -> list:
    """Sends ``canvas`` (frozen unless ``freeze`` is false, serialized as Celery serializes it)
    with our Rust client, ``call --canvas``, and returns the results it ends with."""
    if freeze:
        canvas.freeze()
    argv = [rust_binary("call"), "--canvas", json.dumps(canvas), "--config", rust_config(),
            "--wait", "--timeout", "30"]
    out = run_command(argv, setup.rust_env())
    assert out.returncode == 0, out
    lines = out.stdout.split()
    ids, values = lines[:len(lines) // 2], lines[len(lines) // 2:]
    assert len(ids) == len(values), out
    return [json.loads(v) for v in values]


@pytest.mark.timeout(90)
def test_canvases_sent_by_the_rust_client_run_on_python_and_rust_workers(rust, py_worker):
    setup = rust.setup
    steps = chain(py_sig(setup, "py.mul", 2, 3), rust_sig(setup, "tasks.add", 4), py_sig(setup, "py.mul", 10))
    assert call_canvas(setup, steps) == [100]
    members = group(py_sig(setup, "py.mul", 1, 2), rust_sig(setup, "tasks.add", 1, 2))
    assert call_canvas(setup, members) == [2, 3]
    header = [py_sig(setup, "py.mul", i, 2) if i % 2 else rust_sig(setup, "tasks.mul", i, 2) for i in range(10)]
    assert call_canvas(setup, chord(header, py_sig(setup, "py.xsum"))) == [90]
    header = [py_sig(setup, "py.mul", i, 2) for i in range(5)]
    assert call_canvas(setup, chord(header, rust_sig(setup, "tasks.echo"))) == [[0, 2, 4, 6, 8]]


@pytest.mark.timeout(90)
def test_a_chain_in_a_chord_header_counts_through_its_last_step(rust, py_worker, py_twin):
    setup = rust.setup

    def build(queue):
        header = [chain(py_sig(setup, "py.mul", 1, 2), rust_sig(setup, "tasks.add", 3, queue=queue)),
                  chain(rust_sig(setup, "tasks.add", 1, 1, queue=queue), py_sig(setup, "py.mul", 10)),
                  rust_sig(setup, "tasks.mul", 2, 3, queue=queue)]
        return chord(header, rust_sig(setup, "tasks.echo", queue=queue))

    assert compared(setup, py_twin, build) == [5, 20, 6]
    # The same canvas sent by our Rust client, which tags each chain's last step itself.
    assert call_canvas(setup, build(setup.queue)) == [[5, 20, 6]]


@pytest.mark.timeout(90)
def test_steps_after_a_chord_run_after_its_body(rust, py_worker, py_twin):
    setup = rust.setup

    def build(queue):
        return chain(rust_sig(setup, "tasks.add", 1, 1, queue=queue),
                     chord([rust_sig(setup, "tasks.mul", 10, queue=queue), py_sig(setup, "py.mul", 100)],
                           rust_sig(setup, "tasks.xsum", queue=queue)),
                     py_sig(setup, "py.mul", 2))

    assert compared(setup, py_twin, build) == 440


@pytest.mark.timeout(90)
def test_a_failure_inside_a_header_chain_fails_the_chord(rust, py_worker, py_twin):
    setup = rust.setup

    def build(queue):
        header = [chain(rust_sig(setup, "tasks.fail", "boom", queue=queue, immutable=True),
                        py_sig(setup, "py.mul", 2)),
                  rust_sig(setup, "tasks.add", 1, 1, queue=queue)]
        return chord(header, py_sig(setup, "py.xsum"))

    def outcome(result):
        return wait_state(result, "FAILURE"), type(result.result).__name__

    assert compared(setup, py_twin, build, outcome) == ("FAILURE", "ChordError")


@pytest.mark.timeout(60)
def test_an_expired_rust_member_fails_the_chord(rust, py_worker, py_twin):
    setup = rust.setup
    past = datetime.now(timezone.utc) - timedelta(minutes=5)

    def build(queue):
        header = [rust_sig(setup, "tasks.add", 1, 1, queue=queue).set(expires=past),
                  rust_sig(setup, "tasks.add", 2, 2, queue=queue)]
        return chord(header, py_sig(setup, "py.xsum"))

    def outcome(result):
        return wait_state(result, "FAILURE"), type(result.result).__name__

    assert compared(setup, py_twin, build, outcome) == ("FAILURE", "ChordError")


@pytest.mark.timeout(90)
def test_groups_nested_in_a_group_or_chord_header_are_spliced_as_celery_splices_them(rust, py_worker, py_twin):
    setup = rust.setup

    def nested(queue, *outer):
        return group(group(rust_sig(setup, "tasks.add", 1, queue=queue), py_sig(setup, "py.mul", 10)), *outer)

    # A group sent unfrozen keeps the nested members in order (here by our worker, as a link).
    def linked(queue):
        callbacks = nested(queue, rust_sig(setup, "tasks.add", 20, queue=queue))
        return rust_sig(setup, "tasks.add", 2, 2, queue=queue).set(link=callbacks)

    def children_values(result):
        result.get(timeout=GET_TIMEOUT)
        wait_state(result, "SUCCESS")
        return [c.get(timeout=GET_TIMEOUT) for c in result.children or []]

    assert compared(setup, py_twin, linked, children_values) == [[5, 40, 24]]
    # A chord header is frozen: a nested group's members come last first, every one counted.
    def header_chord(queue):
        header = [group(rust_sig(setup, "tasks.mul", 1, 2, queue=queue), py_sig(setup, "py.mul", 2, 2)),
                  rust_sig(setup, "tasks.mul", 3, 2, queue=queue)]
        return chord(header, rust_sig(setup, "tasks.echo", queue=queue))

    assert compared(setup, py_twin, header_chord) == [4, 2, 6]
    # The same chord started by our worker (a link), and by our Rust client from the unfrozen
    # canvas: both freeze the header as Celery does.
    body = rust_sig(setup, "tasks.echo")
    body_id = body.freeze().id
    link = chord([nested(setup.queue), rust_sig(setup, "tasks.add", 100)], body)
    assert rust_sig(setup, "tasks.add", 1, 1).apply_async(link=link).get(timeout=GET_TIMEOUT) == 2
    assert setup.app.AsyncResult(body_id).get(timeout=GET_TIMEOUT) == [20, 3, 102]
    assert call_canvas(setup, header_chord(setup.queue), freeze=False) == [[4, 2, 6]]
    # Our client freezes a group before sending it, so it ends as a frozen group does in Celery.
    members = group(*header_chord(setup.queue).tasks)
    assert call_canvas(setup, members.clone(), freeze=False) == [4, 2, 6]
    members.freeze()
    assert members.apply_async().get(timeout=GET_TIMEOUT) == [4, 2, 6]


@pytest.mark.timeout(90)
def test_a_chord_in_a_group_is_the_member_through_its_body(rust, py_worker, py_twin):
    setup = rust.setup

    def build(queue):
        inner = chord([rust_sig(setup, "tasks.mul", 1, 2, queue=queue), py_sig(setup, "py.mul", 2, 2)],
                      rust_sig(setup, "tasks.xsum", queue=queue))
        return group(inner, rust_sig(setup, "tasks.add", 3, 3, queue=queue))

    def values_and_group(result):
        values = result.get(timeout=GET_TIMEOUT)
        return values, [meta(setup, r.id)["group_id"] == result.id for r in result.results]

    assert compared(setup, py_twin, build, values_and_group) == ([6, 6], [True, True])
    assert call_canvas(setup, build(setup.queue)) == [6, 6]


@pytest.mark.timeout(90)
def test_a_chord_in_a_chord_header_reaches_the_outer_body_as_one_member(rust, py_worker, py_twin):
    setup = rust.setup

    def build(queue):
        inner = chord([rust_sig(setup, "tasks.mul", 1, 2, queue=queue), py_sig(setup, "py.mul", 2, 2)],
                      rust_sig(setup, "tasks.echo", queue=queue))
        return chord([py_sig(setup, "py.mul", 7, 2), inner, rust_sig(setup, "tasks.add", 3, 3, queue=queue)],
                     rust_sig(setup, "tasks.echo", queue=queue))

    assert compared(setup, py_twin, build) == [14, [2, 4], 6]
    assert call_canvas(setup, build(setup.queue)) == [[14, [2, 4], 6]]


@pytest.mark.timeout(60)
def test_a_saved_group_of_rust_tasks_is_restored_by_id(rust, py_twin):
    setup = rust.setup

    def build(queue):
        return group(rust_sig(setup, "tasks.add", i, i, queue=queue) for i in range(4))

    def restored(result):
        result.save()
        again = GroupResult.restore(result.id, app=setup.app)
        assert again is not None and [r.id for r in again.results] == [r.id for r in result.results]
        return again.get(timeout=GET_TIMEOUT)

    assert compared(setup, py_twin, build, restored) == [0, 2, 4, 6]


@pytest.mark.timeout(90)
def test_a_rust_task_replaced_by_a_chain_gives_the_chains_result_and_keeps_its_links(rust, py_worker, py_twin):
    """``tasks.scaled_sum`` replaces itself with ``tasks.xsum | tasks.mul`` (``Task.replace``):
    a Python caller reads the chain's result under the task's own id, the task's link runs
    after the chain, and the rest of the chain the task was a step of runs after that, as with
    Celery's own ``self.replace``."""
    setup = rust.setup

    def build(queue):
        return chain(rust_sig(setup, "tasks.scaled_sum", [1, 2, 3], 10, queue=queue), py_sig(setup, "py.mul", 2))

    assert compared(setup, py_twin, build) == 120
    callback = py_sig(setup, "py.mul", 3)
    callback_id = callback.freeze().id
    result = rust_sig(setup, "tasks.scaled_sum", [1, 2, 3], 10).apply_async(link=callback)
    assert result.get(timeout=GET_TIMEOUT) == 60
    stored = meta(setup, result.id)
    assert stored["name"] == "tasks.mul", "the id's result is the chain's last step's"
    # Polled, not get(): the link is a Python task stored by the Python worker, and in a CI run
    # (2026-12-07) Celery's get() missed its result, stored 0.04 s after the call began, for
    # its whole timeout; a poll of the stored state cannot miss it.
    linked = setup.app.AsyncResult(callback_id)
    wait_state(linked, "SUCCESS", timeout=GET_TIMEOUT)
    assert linked.result == 180
    assert stored["parent_id"] is not None and stored["parent_id"] != result.id
    first_step = meta(setup, stored["parent_id"])
    assert (first_step["name"], first_step["parent_id"]) == ("tasks.xsum", result.id)


@pytest.mark.timeout(60)
def test_a_failing_replacement_runs_the_replaced_tasks_errback(rust, py_worker):
    setup = rust.setup
    errback = py_sig(setup, "py.mul", 6, 7, immutable=True)
    errback_id = errback.freeze().id
    result = rust_sig(setup, "tasks.scaled_sum", ["not a number"], 2).apply_async(link_error=errback)
    with pytest.raises(TypeError):
        result.get(timeout=GET_TIMEOUT)
    assert setup.app.AsyncResult(errback_id).get(timeout=GET_TIMEOUT) == 42
