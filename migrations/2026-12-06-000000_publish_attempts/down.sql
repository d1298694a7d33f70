ALTER TABLE tasks
    DROP COLUMN next_attempt_at,
    DROP COLUMN publish_attempts;
