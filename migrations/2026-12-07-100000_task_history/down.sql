DROP TABLE workers;
DROP TABLE task_history;
