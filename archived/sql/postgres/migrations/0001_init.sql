-- The queue for several daemons on several hosts: the schema of the SQLite queue at its
-- migration 0008, in PostgreSQL's types. A job in a processing state has an owner (the
-- host_id of the daemon running it) and a lease its heartbeat renews.
CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    state            TEXT NOT NULL,
    spec             TEXT NOT NULL,
    spec_sha256      TEXT NOT NULL,
    config           TEXT NOT NULL,
    config_digest    TEXT NOT NULL,
    not_before       TIMESTAMPTZ,
    phase            TEXT,
    step             TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    retry_at         TIMESTAMPTZ,
    error            TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT false,
    archive_name     TEXT,
    archive_sha256   TEXT,
    archive_size     BIGINT,
    payload_files    BIGINT,
    payload_bytes    BIGINT,
    created_at       TIMESTAMPTZ NOT NULL,
    started_at       TIMESTAMPTZ,
    updated_at       TIMESTAMPTZ NOT NULL,
    expires_at       TIMESTAMPTZ,
    legal_hold       BOOLEAN NOT NULL DEFAULT false,
    cleanup_attempts INTEGER NOT NULL DEFAULT 0,
    owner            TEXT,
    lease_until      TIMESTAMPTZ
);
CREATE INDEX jobs_state ON jobs (state, not_before, created_at);
CREATE INDEX jobs_expiry ON jobs (state, expires_at);
CREATE INDEX jobs_owner ON jobs (owner) WHERE owner IS NOT NULL;

CREATE TABLE tasks (
    job_id      TEXT NOT NULL REFERENCES jobs (id),
    kind        TEXT NOT NULL CHECK (kind IN ('activity', 'storage')),
    name        TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'created',
    attempts    INTEGER NOT NULL DEFAULT 0,
    error       TEXT,
    result      TEXT,
    updated_at  TIMESTAMPTZ NOT NULL,
    progress    TEXT,
    PRIMARY KEY (job_id, kind, name)
);

CREATE TABLE history (
    seq     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id  TEXT NOT NULL REFERENCES jobs (id),
    state   TEXT NOT NULL,
    at      TIMESTAMPTZ NOT NULL,
    reason  TEXT NOT NULL
);
CREATE INDEX history_job ON history (job_id, seq);
CREATE FUNCTION history_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'history is append-only';
END
$$;
CREATE TRIGGER history_append_only BEFORE UPDATE OR DELETE ON history
FOR EACH STATEMENT EXECUTE FUNCTION history_append_only();

CREATE TABLE copies (
    job_id       TEXT NOT NULL REFERENCES jobs (id),
    target       TEXT NOT NULL,
    path         TEXT NOT NULL,
    size         BIGINT NOT NULL,
    sha256       TEXT NOT NULL,
    verified_at  TIMESTAMPTZ NOT NULL,
    audited_at   TIMESTAMPTZ,
    audit_result TEXT,
    deleted_at   TIMESTAMPTZ,
    PRIMARY KEY (job_id, target)
);

CREATE TABLE events (
    seq     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id  TEXT NOT NULL REFERENCES jobs (id),
    at      TIMESTAMPTZ NOT NULL,
    kind    TEXT NOT NULL,
    detail  TEXT NOT NULL
);
CREATE INDEX events_job ON events (job_id, seq);

CREATE TABLE audits (
    seq     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id  TEXT NOT NULL REFERENCES jobs (id),
    target  TEXT NOT NULL,
    at      TIMESTAMPTZ NOT NULL,
    result  TEXT NOT NULL CHECK (result IN ('ok', 'missing', 'damaged', 'repaired', 'unrepaired',
                                            'unreachable')),
    detail  TEXT NOT NULL
);
CREATE INDEX audits_job ON audits (job_id, seq);

CREATE TABLE audit_totals (
    result  TEXT PRIMARY KEY,
    count   BIGINT NOT NULL
);

CREATE TABLE schedule_runs (
    schedule    TEXT NOT NULL,
    slot        TIMESTAMPTZ NOT NULL,
    result      TEXT NOT NULL CHECK (result IN ('created', 'skipped', 'missed', 'rejected')),
    job_id      TEXT REFERENCES jobs (id),
    fingerprint TEXT,
    detail      TEXT NOT NULL DEFAULT '',
    at          TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (schedule, slot)
);
CREATE TABLE schedules_seen (
    schedule    TEXT PRIMARY KEY,
    first_seen  TIMESTAMPTZ NOT NULL
);

CREATE TABLE orphans (
    job_id      TEXT NOT NULL REFERENCES jobs (id),
    target      TEXT NOT NULL,
    key         TEXT NOT NULL,
    reason      TEXT NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL,
    removed_at  TIMESTAMPTZ,
    PRIMARY KEY (job_id, target, key)
);
CREATE INDEX orphans_pending ON orphans (removed_at);
