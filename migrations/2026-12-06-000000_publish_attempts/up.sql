-- Publish attempts per row: a job whose publish keeps failing (a queue the broker refuses) backs
-- off by itself, so it delays no other job, and after `web_publish_max_attempts` ends FAILURE.
ALTER TABLE tasks
    ADD COLUMN publish_attempts INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at TIMESTAMPTZ;
