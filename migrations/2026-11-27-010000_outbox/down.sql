DROP INDEX tasks_unpublished;
ALTER TABLE tasks DROP COLUMN eta, DROP COLUMN expires, DROP COLUMN publish_lease_until;
