-- How far an executing task has come, for `archived show` on a running job.
ALTER TABLE tasks ADD COLUMN progress TEXT;
