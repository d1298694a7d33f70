-- One row per job, keyed by its Celery task id, following the job through its states.
CREATE TABLE tasks (
    task_id          UUID PRIMARY KEY,
    task_name        TEXT NOT NULL,
    args             JSONB NOT NULL DEFAULT '[]',
    kwargs           JSONB NOT NULL DEFAULT '{}',
    queue            TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'PENDING',
    -- Order of states (0 pending, 1 started/retry, 2 progress or custom, 3 final): updates only
    -- move forward, so a late PROGRESS never replaces SUCCESS.
    state_rank       SMALLINT NOT NULL DEFAULT 0,
    progress_current BIGINT,
    progress_total   BIGINT,
    meta             JSONB,
    result           JSONB,
    error_type       TEXT,
    error_message    TEXT,
    traceback        TEXT,
    worker           TEXT,
    retries          INTEGER NOT NULL DEFAULT 0,
    -- Set once the broker confirmed the message; NULL with publish_error when it could not be sent.
    published_at     TIMESTAMPTZ,
    publish_error    TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Listing newest first, optionally by state or task name, with keyset pagination.
CREATE INDEX tasks_created ON tasks (created_at DESC, task_id DESC);
CREATE INDEX tasks_state_created ON tasks (state, created_at DESC, task_id DESC);
CREATE INDEX tasks_name_created ON tasks (task_name, created_at DESC, task_id DESC);
-- The tracker's sweep reads only jobs not yet final.
CREATE INDEX tasks_unfinished ON tasks (updated_at) WHERE state_rank < 3;
