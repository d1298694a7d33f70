-- A workflow: a chain or a group of task calls accepted as one request. Each step is a job row
-- of its own, keyed by its task id and tracked like any job; the rows of one workflow share its
-- id and kind, and keep their place in it. A group's members are published each from its own
-- row; a chain from its first step's row only (the message carries the later steps, which the
-- workers send on), so the outbox never publishes a later chain step by itself.
ALTER TABLE tasks
    ADD COLUMN workflow_id UUID,
    ADD COLUMN workflow_kind TEXT CHECK (workflow_kind IN ('chain', 'group')),
    ADD COLUMN workflow_position INTEGER CHECK (workflow_position >= 0),
    ADD CONSTRAINT tasks_workflow_whole CHECK (
        (workflow_id IS NULL) = (workflow_kind IS NULL)
        AND (workflow_id IS NULL) = (workflow_position IS NULL)
    );

CREATE UNIQUE INDEX tasks_workflow ON tasks (workflow_id, workflow_position)
    WHERE workflow_id IS NOT NULL;
