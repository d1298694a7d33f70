ALTER TABLE tasks
    DROP COLUMN tracestate,
    DROP COLUMN traceparent;
