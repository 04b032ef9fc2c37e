-- Schedules: one row per schedule slot that was acted on, so a slot never makes two jobs.
CREATE TABLE schedule_runs (
    schedule    TEXT NOT NULL,
    slot        TEXT NOT NULL,            -- the slot's time, ISO 8601 UTC
    result      TEXT NOT NULL CHECK (result IN ('created', 'skipped', 'missed', 'rejected')),
    job_id      TEXT REFERENCES jobs (id),
    fingerprint TEXT,                     -- of the sources, for skip_unchanged
    detail      TEXT NOT NULL DEFAULT '',
    at          TEXT NOT NULL,
    PRIMARY KEY (schedule, slot)
);
CREATE TABLE schedules_seen (
    schedule    TEXT PRIMARY KEY,
    first_seen  TEXT NOT NULL             -- slots before this never fire
);
