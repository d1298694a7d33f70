-- The trace a job belongs to (W3C `traceparent` and `tracestate`), when tracing is on: the
-- context of the `POST /receive` request that recorded it, so that its publish, now or by the
-- outbox after a restart, continues that request's trace, and `/status` can name the trace.
ALTER TABLE tasks
    ADD COLUMN traceparent TEXT,
    ADD COLUMN tracestate TEXT;
