-- Unique jobs of `POST /receive`: the lock a job holds in the result backend's Redis
-- (`rcelery-unique:<unique_key>`, holding the job's task id, taken before the row commits), so
-- that every publish of the row, the outbox's later ones too, names it in the message's
-- `unique_key` header and the worker that ends the job gives it back. `unique_for` is the lock's
-- life in seconds: a publish finding the lock expired and free takes it again for as long.
ALTER TABLE tasks
    ADD COLUMN unique_key TEXT,
    ADD COLUMN unique_for BIGINT CHECK (unique_for > 0),
    ADD CONSTRAINT tasks_unique_whole CHECK ((unique_key IS NULL) = (unique_for IS NULL));
