-- Fixity audits: when each stored copy was last re-read, and every result.
ALTER TABLE copies ADD COLUMN audited_at TEXT;
ALTER TABLE copies ADD COLUMN audit_result TEXT;

CREATE TABLE audits (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL REFERENCES jobs (id),
    target  TEXT NOT NULL,
    at      TEXT NOT NULL,
    result  TEXT NOT NULL CHECK (result IN ('ok', 'missing', 'damaged', 'repaired', 'unrepaired')),
    detail  TEXT NOT NULL
);
CREATE INDEX audits_job ON audits (job_id, seq);
