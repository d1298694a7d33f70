-- Idempotency keys of `POST /receive`: the first request with a key records its job and the
-- key together, in one transaction; a repeat finds the key and answers the same job. The
-- primary key is the unique index that makes concurrent repeats, on any replica, wait for the
-- first and then find its key: never a read-then-write.
CREATE TABLE idempotency_keys (
    -- Whose key: a JWT's `sub`, or '' for callers that cannot be told apart (an open API, the
    -- shared token, a JWT without `sub`).
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    -- SHA-256 of the request body's bytes as received: a repeat must send the same bytes.
    body_sha256 BYTEA NOT NULL,
    -- The job's task id, or the workflow's id.
    task_id UUID NOT NULL,
    -- 'chain' or 'group' for a workflow; NULL for a job.
    workflow_kind TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);

-- The pruning of expired keys reads the oldest first.
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
