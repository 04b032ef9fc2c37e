-- Retention: when a completed job's copies may be deleted, legal holds, deletions.
ALTER TABLE jobs ADD COLUMN expires_at TEXT;
ALTER TABLE jobs ADD COLUMN legal_hold INTEGER NOT NULL DEFAULT 0;
ALTER TABLE copies ADD COLUMN deleted_at TEXT;
CREATE INDEX jobs_expiry ON jobs (state, expires_at);
