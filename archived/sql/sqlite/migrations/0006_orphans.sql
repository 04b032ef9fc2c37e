-- Cleanup: what a failed job's cleanup could not remove from a target yet (an unmounted
-- disk), removed later by the daemon; and the attempts of a cleanup that is retried.
CREATE TABLE orphans (
    job_id      TEXT NOT NULL REFERENCES jobs (id),
    target      TEXT NOT NULL,
    key         TEXT NOT NULL,              -- <name>/<archive name> on the target
    reason      TEXT NOT NULL,              -- why it could not be removed
    recorded_at TEXT NOT NULL,
    removed_at  TEXT,
    PRIMARY KEY (job_id, target, key)
);
CREATE INDEX orphans_pending ON orphans (removed_at);
ALTER TABLE jobs ADD COLUMN cleanup_attempts INTEGER NOT NULL DEFAULT 0;
