"""The task history at scale (issue #20): the plans and times of ``GET /history``'s queries and of
the retention's delete on a ``task_history`` of ``plan.history_rows`` rows.

The table is made by ``web --migrate`` in a database of its own (``rcelery_bench_history``,
dropped at the end) and seeded by ``generate_series``: a few dozen task names (some much rarer
than others), the states in a plausible mix, eight workers, first events spread over 30 days,
and argument reprs of three shapes that the ``q`` filter finds few or many of. Its indexes are
dropped before the insert and made again after it from their own definitions
(``pg_get_indexdef``), which is much faster than keeping them up to date row by row; then
``VACUUM (ANALYZE)``, as autovacuum would have left a table that old.

Each filter's query is the one ``store::history`` builds (``web/src/store.rs``), and is checked
against the route: the release ``web`` serving this database answers the same first page.
``EXPLAIN (ANALYZE, BUFFERS)`` runs it once untimed and then three times: with its values in
the statement (the plan PostgreSQL makes for one execution with those values), and as a
prepared statement's generic plan (``plan_cache_mode = force_generic_plan``: the plan a
statement prepared once and executed often can settle on).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
import urllib.parse
import uuid
from datetime import datetime, timedelta, timezone

import psycopg
from psycopg import sql as pgsql

from figures import median, spread
from harness import BIN, POSTGRES, REPO, Plan, Recorder, base_env, psql, web_app

DATABASE = "rcelery_bench_history"
PAGE = 50  # the route's default page; it asks for one more row to know whether a next exists
RETENTION_BATCH = 10_000  # the monitor's retention deletes this many rows per statement
RUNS = 3
# The columns `store::TaskRecord` selects, in its order.
COLUMNS = ("task_id, name, state, state_rank, args, kwargs, worker, queue, sent_at, received_at, started_at, "
           "finished_at, runtime, result, exception, traceback, retries, root_id, parent_id, seen_at")
ARGUMENTS = "(coalesce(args, '') || ' ' || coalesce(kwargs, ''))"  # the trigram index's expression
INSERT_CHUNK = 1_000_000

# Rows of task_history, row `i` of `generate_series`, its chances drawn by random() (seeded).
# Names: 36 (six apps, six verbs), the first ~30 times as common as the last; states: 90 %
# SUCCESS, 5 % FAILURE, the rest spread over the others, each with the times its events give it.
# Prepared, and executed for rows $1 to $2.
SEED = """
PREPARE seed(bigint, bigint) AS INSERT INTO task_history (task_id, name, state, state_rank, args, kwargs, worker, queue, sent_at, received_at,
                          started_at, finished_at, runtime, result, exception, retries, seen_at)
SELECT gen_random_uuid(), name, state, rank, args, kwargs,
       CASE WHEN rank > 0 THEN 'celery@worker-' || (i % 8 + 1) END, 'celery',
       seen, CASE WHEN rank >= 1 THEN seen + interval '3 ms' END, CASE WHEN rank >= 2 THEN seen + interval '4 ms' END,
       CASE WHEN rank = 5 THEN seen + interval '4 ms' + runtime * interval '1 s' END,
       CASE WHEN rank = 5 THEN runtime END,
       CASE WHEN state = 'SUCCESS' THEN (i % 1000)::text END,
       CASE WHEN state = 'FAILURE' THEN 'ValueError(''no such record'')' END,
       CASE WHEN state = 'RETRY' THEN 1 ELSE 0 END, seen
FROM (
    SELECT i, seen, runtime, state,
           CASE state WHEN 'PENDING' THEN 0 WHEN 'RECEIVED' THEN 1 WHEN 'STARTED' THEN 2 WHEN 'RETRY' THEN 4
                      ELSE 5 END AS rank,
           (ARRAY['billing', 'mail', 'reports', 'sync', 'images', 'search'])[kind / 6 + 1] || '.'
               || (ARRAY['charge', 'send', 'render', 'refresh', 'resize', 'index'])[kind % 6 + 1] AS name,
           CASE kind % 3
               WHEN 0 THEN format('(%s, %s)', i % 100003, i % 997)
               WHEN 1 THEN format('(''order-%s'', %s)', i % 200003, i % 10)
               ELSE format('(''user-%s@example.com'',)', i % 50021) END AS args,
           CASE WHEN i % 10 = 0 THEN '{''priority'': ''high''}' ELSE '{}' END AS kwargs
    FROM (
        SELECT i, now() - random() * interval '30 days' AS seen, random() * 2 AS runtime,
               floor(36 * random() ^ 3)::int AS kind,
               CASE WHEN s < 0.90 THEN 'SUCCESS' WHEN s < 0.95 THEN 'FAILURE' WHEN s < 0.96 THEN 'REVOKED'
                    WHEN s < 0.975 THEN 'RETRY' WHEN s < 0.985 THEN 'STARTED' WHEN s < 0.995 THEN 'RECEIVED'
                    ELSE 'PENDING' END AS state
        FROM (SELECT i, random() AS s FROM generate_series($1, $2) AS i) AS drawn
    ) AS chosen
) AS row
"""

# The retention's statement (`store::forget_history_before`).
RETENTION = ("DELETE FROM task_history WHERE task_id IN (SELECT task_id FROM task_history "
             "WHERE seen_at < $1 ORDER BY seen_at LIMIT $2 FOR UPDATE SKIP LOCKED)")
# A plan slower than this runs once, not 1 + RUNS times: the bench stays bounded.
SLOW_MS = 5_000
STATEMENT_TIMEOUT_S = 120


def containing(text: str) -> str:
    """As ``store::containing``: a LIKE pattern matching ``text`` anywhere, taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def page_query(filters: dict) -> tuple[str, list]:
    """``store::history``'s statement for ``filters`` (the route's query parameters, ``after``
    a (seen_at, task_id) cursor), with ``$n`` placeholders, and its values."""
    conditions, values = [], []

    def bind(value) -> str:
        values.append(value)
        return f"${len(values)}"

    for column in ("state", "name", "worker"):
        if column in filters:
            conditions.append(f"{column} = {bind(filters[column])}")
    if "since" in filters:
        conditions.append(f"seen_at >= {bind(filters['since'])}")
    if "until" in filters:
        conditions.append(f"seen_at < {bind(filters['until'])}")
    if "q" in filters:
        conditions.append(f"{ARGUMENTS} ILIKE {bind(containing(filters['q']))}")
    if "after" in filters:
        at, task_id = filters["after"]
        conditions.append(f"(seen_at < {bind(at)} OR (seen_at = {bind(at)} AND task_id < {bind(task_id)}))")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    limit = bind(PAGE + 1)
    return f"SELECT {COLUMNS} FROM task_history{where} ORDER BY seen_at DESC, task_id DESC LIMIT {limit}", values


def with_values(sql: str, values: list) -> tuple[str, list]:
    """``sql``'s ``$n`` placeholders as psycopg's, for a client-side cursor to fill in."""
    for n in range(len(values), 0, -1):
        sql = sql.replace(f"${n}", "%s")  # from the highest, so that $1 does not eat $10's prefix
    return sql, values


def route_query(filters: dict) -> str:
    """``filters`` as ``GET /history``'s query string."""
    params = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in filters.items() if k != "after"}
    if "after" in filters:
        at, task_id = filters["after"]
        params["cursor"] = f"{(at - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)}_{task_id.hex}"
    return urllib.parse.urlencode({**params, "limit": PAGE})


def plan_shape(plan: dict) -> str:
    """The plan's nodes from the top down, each index named, the branches of a join in
    brackets: ``Limit → Index Scan (task_history_state_seen)``."""
    name = plan["Node Type"] + (f" ({plan['Index Name']})" if "Index Name" in plan else "")
    children = [plan_shape(child) for child in plan.get("Plans", [])]
    if not children:
        return name
    return f"{name} → {children[0]}" if len(children) == 1 else f"{name} → [{'; '.join(children)}]"


def explain(db: psycopg.Connection, statement: str, values: list | None = None) -> dict:
    """One ``EXPLAIN (ANALYZE, BUFFERS)`` of ``statement``: its shape, time and buffers."""
    with psycopg.ClientCursor(db) as cursor:
        try:
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, values)
        except psycopg.errors.QueryCanceled:
            return {"shape": f"cancelled after {STATEMENT_TIMEOUT_S} s", "ms": STATEMENT_TIMEOUT_S * 1000.0,
                    "planning_ms": float("nan"), "rows": 0, "hit": 0, "read": 0}
        found = cursor.fetchone()[0]
    found = found[0] if isinstance(found, list) else json.loads(found)[0]
    top = found["Plan"]
    return {"shape": plan_shape(top), "ms": found["Execution Time"], "planning_ms": found["Planning Time"],
            # A delete's top node returns no rows: the rows it deleted are its input's.
            "rows": (top["Plans"][0] if top["Node Type"] == "ModifyTable" else top)["Actual Rows"], "hit": top.get("Shared Hit Blocks", 0), "read": top.get("Shared Read Blocks", 0)}


def timed(run) -> list[dict]:
    """``run()`` once untimed, then ``RUNS`` times; once only if it is slow."""
    first = run()
    return [first] if first["ms"] > SLOW_MS else [run() for _ in range(RUNS)]


def seed(db: psycopg.Connection, rows: int) -> dict:
    """Fills the table without its indexes, makes them again, vacuums; the seconds of each step."""
    took = {}
    indexes = db.execute("SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid), "
                         "(SELECT conname FROM pg_constraint WHERE conindid = indexrelid) "
                         "FROM pg_index WHERE indrelid = 'task_history'::regclass").fetchall()
    for name, _, constraint in indexes:
        if constraint:
            db.execute(f"ALTER TABLE task_history DROP CONSTRAINT {constraint}")
        else:
            db.execute(f"DROP INDEX {name}")
    db.execute("SELECT setseed(0.2026)")
    db.execute(SEED)
    began = time.monotonic()
    for first in range(1, rows + 1, INSERT_CHUNK):
        db.execute(f"EXECUTE seed({first}, {min(first + INSERT_CHUNK - 1, rows)})")
        print(f"  history: {min(first + INSERT_CHUNK - 1, rows):,} rows in {time.monotonic() - began:.0f} s", flush=True)
    took["insert"] = time.monotonic() - began
    # The builds' memory: the server's default (64 MB) spills the trigram index's build to disk.
    db.execute("SET maintenance_work_mem = '1GB'")
    for name, definition, constraint in indexes:
        began = time.monotonic()
        if constraint:
            # The primary key's index first, then the constraint on it, as the migration has it.
            db.execute(definition)
            db.execute(f"ALTER TABLE task_history ADD CONSTRAINT {constraint} PRIMARY KEY USING INDEX {name}")
        else:
            db.execute(definition)
        took[f"index {name}"] = time.monotonic() - began
        print(f"  history: {name} in {took[f'index {name}']:.0f} s", flush=True)
    began = time.monotonic()
    db.execute("VACUUM (ANALYZE) task_history")
    took["vacuum analyze"] = time.monotonic() - began
    return took


def filters_of(db: psycopg.Connection) -> list[tuple[str, dict]]:
    """The filters measured, with values taken from the seeded rows."""
    names = [row[0] for row in db.execute("SELECT name FROM task_history GROUP BY name ORDER BY count(*) DESC")]
    newest = db.execute("SELECT max(seen_at) FROM task_history").fetchone()[0]
    day_start = newest - timedelta(days=10)

    def after(filters: dict) -> dict:
        """``filters`` with the cursor of their second page: the first page's last row."""
        row = db.execute(*with_values(*page_query(filters))).fetchall()[PAGE - 1]
        return {**filters, "after": (row[-1], row[0])}  # seen_at, task_id

    measured = [
        ("none", {}),
        ("state=FAILURE (5 %)", {"state": "FAILURE"}),
        ("state=PENDING (0.5 %)", {"state": "PENDING"}),
        (f"name, the most common ({names[0]})", {"name": names[0]}),
        (f"name, the rarest ({names[-1]})", {"name": names[-1]}),
        ("worker", {"worker": "celery@worker-3"}),
        ("since + until, one day 10 days back", {"since": day_start, "until": day_start + timedelta(days=1)}),
        ("q, few matches (order-4242)", {"q": "order-4242"}),
        ("q, a third of the rows (@example.com)", {"q": "@example.com"}),
        ("state=FAILURE + name, the rarest", {"state": "FAILURE", "name": names[-1]}),
    ]
    return measured + [
        ("second page (cursor), no filter", after({})),
        ("second page (cursor), state=FAILURE", after({"state": "FAILURE"})),
        ("second page (cursor), q=order-42", after({"q": "order-42"})),
    ]


def check_route(db: psycopg.Connection, filters: list[tuple[str, dict]]) -> list[str]:
    """The filters whose first page from ``GET /history`` (the release ``web`` on this database)
    differs from this module's statement's."""
    differ = []
    with web_app("rust", "redis", f"bench-history-{uuid.uuid4().hex[:8]}", database=DATABASE) as (_, port):
        for label, values in filters:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            connection.request("GET", f"/history?{route_query(values)}")
            reply = connection.getresponse()
            body = json.loads(reply.read())
            route_ids = [uuid.UUID(task["task_id"]) for task in body.get("tasks", [])]
            ours = [row[0] for row in db.execute(*with_values(*page_query(values))).fetchall()][:PAGE]
            if reply.status != 200 or route_ids != ours:
                differ.append(label)
    return differ


def run(rec: Recorder, plan: Plan) -> None:
    rows = plan.history_rows
    print(f"== history, {rows:,} rows", flush=True)
    psql(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    subprocess.run([str(BIN / "web"), "--config", str(REPO / "celeryconfig.toml"), "--migrate"],
                   env=base_env(CELERY_DATABASE_URL=f"{POSTGRES}/{DATABASE}"), check=True, capture_output=True,
                   timeout=120)
    try:
        with psycopg.connect(f"{POSTGRES}/{DATABASE}", autocommit=True) as db:
            took = seed(db, rows)
            sizes = db.execute("SELECT pg_total_relation_size('task_history'), pg_relation_size('task_history')"
                               ).fetchone()
            rec.add("history_seed_s", "postgres", "rust", sum(took.values()), rows=rows, steps={
                step: round(seconds, 1) for step, seconds in took.items()},
                    total_mb=round(sizes[0] / 2**20), table_mb=round(sizes[1] / 2**20))
            db.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT_S}s'")
            filters = filters_of(db)
            for label, values in filters:
                sql, bound = page_query(values)
                runs = timed(lambda: explain(db, *with_values(sql, bound)))
                db.execute(f"PREPARE page AS {sql}")
                db.execute("SET plan_cache_mode = force_generic_plan")
                literals = ", ".join(pgsql.Literal(v).as_string(db) for v in bound)
                generic = timed(lambda: explain(db, f"EXECUTE page({literals})"))
                db.execute("RESET plan_cache_mode")
                db.execute("DEALLOCATE page")
                rec.add("history_query_ms", "postgres", label, median([r["ms"] for r in runs]), rows=rows,
                        shape=runs[-1]["shape"], runs_ms=[round(r["ms"], 2) for r in runs],
                        planning_ms=round(median([r["planning_ms"] for r in runs]), 2), returned=runs[-1]["rows"],
                        hit=runs[-1]["hit"], read=runs[-1]["read"],
                        generic_ms=round(median([r["ms"] for r in generic]), 2), generic_shape=generic[-1]["shape"])
            before = db.execute("SELECT now() - interval '29 days'").fetchone()[0]

            def retention() -> dict:
                # In a transaction rolled back: each run deletes the same oldest batch.
                with db.transaction(force_rollback=True):
                    return explain(db, *with_values(RETENTION, [before, RETENTION_BATCH]))
            runs = timed(retention)
            rec.add("history_retention_ms", "postgres", "rust", median([r["ms"] for r in runs]), rows=rows,
                    batch=RETENTION_BATCH, runs_ms=[round(r["ms"], 2) for r in runs], shape=runs[-1]["shape"],
                    deleted=runs[-1]["rows"])
            differ = check_route(db, filters)
            rec.add("history_route_checked", "postgres", "rust", len(filters) - len(differ), filters=len(filters),
                    differ=differ)
            if differ:
                print(f"  history: GET /history's first page differs from the statement for {differ}", flush=True)
    finally:
        psql(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


def section(rec: Recorder, measured: str) -> list[str]:
    seeded = next((s for s in rec.samples if s["bench"] == "history_seed_s"), None)
    if seeded is None:
        return []
    queries = [s for s in rec.samples if s["bench"] == "history_query_ms"]
    retention = next((s for s in rec.samples if s["bench"] == "history_retention_ms"), None)
    checked = next((s for s in rec.samples if s["bench"] == "history_route_checked"), None)
    steps = ", ".join(f"{step} {seconds:.0f} s" for step, seconds in seeded["steps"].items())
    lines = ["## The task history on a seeded table (issue #20)", "",
             f"Measured {measured}, {seeded['rows']:,} rows. `task_history` made by `web --migrate` and seeded by `generate_series` "
             f"(36 task names, the commonest ~30× the rarest; 90 % SUCCESS, 5 % FAILURE; 8 workers; first events "
             f"over 30 days; argument reprs of three shapes), its indexes dropped for the insert and made again "
             f"after it from their own definitions (`maintenance_work_mem` 1 GB for the builds), then "
             f"`VACUUM (ANALYZE)`: {seeded['value']:.0f} s in all ({steps}); {seeded['total_mb']:,} MB with its "
             f"indexes, {seeded['table_mb']:,} MB of table.", "",
             f"Each filter's statement is `store::history`'s (page of {PAGE} + 1 rows, newest first); "
             + (f"`GET /history` answered the same first page for {checked['value']:.0f} of {checked['filters']} "
                f"of them{': not for ' + ', '.join(checked['differ']) if checked['differ'] else ''}. "
                if checked else "")
             + f"`EXPLAIN (ANALYZE, BUFFERS)`, median of {RUNS} after an untimed run, with the values in the "
             "statement (one execution's plan); and the plan a prepared statement settles on "
             "(`force_generic_plan`). Buffers: shared blocks hit / read by the last run.", "",
             "| filter | plan | ms (runs) | rows | buffers hit / read | generic plan | generic ms |",
             "|---|---|---|---|---|---|---|"]
    for s in queries:
        generic = "same" if s["generic_shape"] == s["shape"] else s["generic_shape"]
        lines.append(f"| {s['system']} | {s['shape']} | {spread(s['runs_ms'])} | {s['returned']} | "
                     f"{s['hit']:,} / {s['read']:,} | {generic} | {s['generic_ms']:.2f} |")
    if retention:
        lines += ["", f"The retention's delete of one batch ({retention['batch']:,} rows first seen more than 29 days "
                      f"ago, oldest first; rolled back after each run): {spread(retention['runs_ms'])} ms, "
                      f"{retention['deleted']:,} rows, plan {retention['shape']}."]
    return lines + [""]
