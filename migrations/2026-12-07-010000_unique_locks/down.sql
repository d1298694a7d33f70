ALTER TABLE tasks
    DROP CONSTRAINT tasks_unique_whole,
    DROP COLUMN unique_for,
    DROP COLUMN unique_key;
