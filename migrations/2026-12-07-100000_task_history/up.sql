-- The monitor's history: every task the cluster's events (`celeryev`) tell of, whoever sent or
-- ran it, keyed by its task id, and every worker that sent a heartbeat. Rows are written by
-- idempotent upserts that only move a task forward (see web/src/monitor/event.rs), so an event
-- recorded twice, or late, changes nothing it should not.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE task_history (
    task_id     UUID PRIMARY KEY,
    name        TEXT,
    state       TEXT NOT NULL,
    -- Order of states (0 sent, 1 received, 2 started, 3 a custom state, 4 retry/rejected,
    -- 5 final): a late task-started never replaces SUCCESS.
    state_rank  SMALLINT NOT NULL,
    -- As the events carry them: Python reprs, cut at 8,192 characters.
    args        TEXT,
    kwargs      TEXT,
    worker      TEXT,
    queue       TEXT,
    sent_at     TIMESTAMPTZ,
    received_at TIMESTAMPTZ,
    started_at  TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    -- Seconds the run took, as the worker measured it.
    runtime     DOUBLE PRECISION,
    result      TEXT,
    exception   TEXT,
    traceback   TEXT,
    retries     INTEGER NOT NULL DEFAULT 0,
    root_id     UUID,
    parent_id   UUID,
    -- The earliest event's time: the listing's order, its time filters and the retention.
    seen_at     TIMESTAMPTZ NOT NULL,
    -- When the catch-up last read the task's state from the result backend.
    checked_at  TIMESTAMPTZ
);

-- Newest first, alone or by state, name or worker, with keyset pagination; the retention's
-- delete reads the oldest from the first.
CREATE INDEX task_history_seen ON task_history (seen_at DESC, task_id DESC);
CREATE INDEX task_history_state_seen ON task_history (state, seen_at DESC, task_id DESC);
CREATE INDEX task_history_name_seen ON task_history (name, seen_at DESC, task_id DESC);
CREATE INDEX task_history_worker_seen ON task_history (worker, seen_at DESC, task_id DESC);
-- `q`: text in the arguments (ILIKE '%text%'), through trigrams.
CREATE INDEX task_history_arguments ON task_history
    USING gin ((coalesce(args, '') || ' ' || coalesce(kwargs, '')) gin_trgm_ops);
-- The catch-up reads tasks not yet final, least recently checked first.
CREATE INDEX task_history_unfinished ON task_history (checked_at NULLS FIRST) WHERE state_rank < 5;

CREATE TABLE workers (
    hostname       TEXT PRIMARY KEY,
    last_heartbeat TIMESTAMPTZ NOT NULL,
    -- Seconds between the worker's heartbeats.
    freq           DOUBLE PRECISION NOT NULL,
    active         INTEGER NOT NULL,
    processed      BIGINT NOT NULL,
    -- false after its worker-offline.
    online         BOOLEAN NOT NULL,
    -- sw_ident and sw_ver: "py-celery 5.4.0", "rcelery 0.1.0".
    software       TEXT
);
