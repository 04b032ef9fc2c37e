-- Audits tell "unreachable" (the target could not be read at all) from damage, and
-- count every result in the database, so audits run by the CLI show in the metrics too.
-- SQLite cannot alter a CHECK constraint: the audits table is rebuilt, rows kept.
CREATE TABLE audits_new (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL REFERENCES jobs (id),
    target  TEXT NOT NULL,
    at      TEXT NOT NULL,
    result  TEXT NOT NULL CHECK (result IN ('ok', 'missing', 'damaged', 'repaired', 'unrepaired',
                                            'unreachable')),
    detail  TEXT NOT NULL
);
INSERT INTO audits_new (seq, job_id, target, at, result, detail)
SELECT seq, job_id, target, at, result, detail FROM audits ORDER BY seq;
DROP TABLE audits;
ALTER TABLE audits_new RENAME TO audits;
CREATE INDEX audits_job ON audits (job_id, seq);

-- Every audit result ever, by result (the audits table keeps changes only).
CREATE TABLE audit_totals (
    result  TEXT PRIMARY KEY,
    count   INTEGER NOT NULL
);
INSERT INTO audit_totals (result, count) SELECT result, count(*) FROM audits GROUP BY result;
