-- The outbox: what a job needs to be published again, and a lease so only one web process
-- publishes a given job at a time.
ALTER TABLE tasks
    ADD COLUMN eta TIMESTAMPTZ,
    ADD COLUMN expires TIMESTAMPTZ,
    ADD COLUMN publish_lease_until TIMESTAMPTZ;

CREATE INDEX tasks_unpublished ON tasks (created_at) WHERE published_at IS NULL;
