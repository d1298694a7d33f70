DROP INDEX tasks_workflow;
ALTER TABLE tasks
    DROP CONSTRAINT tasks_workflow_whole,
    DROP COLUMN workflow_id,
    DROP COLUMN workflow_kind,
    DROP COLUMN workflow_position;
