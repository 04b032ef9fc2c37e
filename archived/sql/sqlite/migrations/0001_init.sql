-- Jobs, their tasks, the append-only history of transitions, and stored copies.
CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    state           TEXT NOT NULL,
    spec            TEXT NOT NULL,          -- the validated job file, as JSON
    spec_sha256     TEXT NOT NULL,          -- of the job file's bytes: a re-ingested file is recognised
    config          TEXT NOT NULL,          -- the config snapshot this job runs on
    config_digest   TEXT NOT NULL,
    not_before      TEXT,
    phase           TEXT,                   -- the phase an error happened in, to re-enter it
    step            TEXT,                   -- last finished post_processing step
    attempts        INTEGER NOT NULL DEFAULT 0,  -- attempts of the current phase
    retry_at        TEXT,                   -- recoverable_error: when to re-enter the phase
    error           TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    archive_name    TEXT,                   -- <name>-<id>-<UTC>.tar, fixed when signed
    archive_sha256  TEXT,
    archive_size    INTEGER,
    payload_files   INTEGER,
    payload_bytes   INTEGER,
    created_at      TEXT NOT NULL,
    started_at      TEXT,
    updated_at      TEXT NOT NULL
);
CREATE INDEX jobs_state ON jobs (state, not_before, created_at);

CREATE TABLE tasks (
    job_id      TEXT NOT NULL REFERENCES jobs (id),
    kind        TEXT NOT NULL CHECK (kind IN ('activity', 'storage')),
    name        TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'created',
    attempts    INTEGER NOT NULL DEFAULT 0,
    error       TEXT,
    result      TEXT,                       -- small JSON summary from the driver
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (job_id, kind, name)
);

CREATE TABLE history (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL REFERENCES jobs (id),
    state   TEXT NOT NULL,
    at      TEXT NOT NULL,
    reason  TEXT NOT NULL
);
CREATE INDEX history_job ON history (job_id, seq);
CREATE TRIGGER history_append_only_update BEFORE UPDATE ON history
BEGIN SELECT RAISE(ABORT, 'history is append-only'); END;
CREATE TRIGGER history_append_only_delete BEFORE DELETE ON history
BEGIN SELECT RAISE(ABORT, 'history is append-only'); END;

CREATE TABLE copies (
    job_id      TEXT NOT NULL REFERENCES jobs (id),
    target      TEXT NOT NULL,
    path        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    verified_at TEXT NOT NULL,
    PRIMARY KEY (job_id, target)
);

-- Checks and notes that are not transitions (integrity results, skipped files, ...),
-- carried into the archive's event log next to the history.
CREATE TABLE events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL REFERENCES jobs (id),
    at      TEXT NOT NULL,
    kind    TEXT NOT NULL,
    detail  TEXT NOT NULL                   -- JSON
);
CREATE INDEX events_job ON events (job_id, seq);
