-- Several hosts on one queue: the daemon that runs a job (and, with PostgreSQL, until
-- when its lease holds), shown by `archived show`. And every timestamp in one fixed-width
-- form, YYYY-MM-DDTHH:MM:SS.ffffffZ, so that SQL compares them right: rows written before
-- had three forms (microseconds and Z, seconds and Z, and +00:00 offsets).
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_until TEXT;
DROP TRIGGER history_append_only_update;
UPDATE jobs SET
    not_before = CASE WHEN not_before IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', not_before) || '.' ||
        CASE WHEN substr(not_before, 20, 1) = '.' THEN substr(substr(not_before, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END,
    retry_at = CASE WHEN retry_at IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', retry_at) || '.' ||
        CASE WHEN substr(retry_at, 20, 1) = '.' THEN substr(substr(retry_at, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END,
    created_at = CASE WHEN created_at IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', created_at) || '.' ||
        CASE WHEN substr(created_at, 20, 1) = '.' THEN substr(substr(created_at, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END,
    started_at = CASE WHEN started_at IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', started_at) || '.' ||
        CASE WHEN substr(started_at, 20, 1) = '.' THEN substr(substr(started_at, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END,
    updated_at = CASE WHEN updated_at IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', updated_at) || '.' ||
        CASE WHEN substr(updated_at, 20, 1) = '.' THEN substr(substr(updated_at, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END,
    expires_at = CASE WHEN expires_at IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', expires_at) || '.' ||
        CASE WHEN substr(expires_at, 20, 1) = '.' THEN substr(substr(expires_at, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END;
UPDATE tasks SET
    updated_at = CASE WHEN updated_at IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', updated_at) || '.' ||
        CASE WHEN substr(updated_at, 20, 1) = '.' THEN substr(substr(updated_at, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END;
UPDATE history SET
    at = CASE WHEN at IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', at) || '.' ||
        CASE WHEN substr(at, 20, 1) = '.' THEN substr(substr(at, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END;
UPDATE copies SET
    verified_at = CASE WHEN verified_at IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', verified_at) || '.' ||
        CASE WHEN substr(verified_at, 20, 1) = '.' THEN substr(substr(verified_at, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END,
    audited_at = CASE WHEN audited_at IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', audited_at) || '.' ||
        CASE WHEN substr(audited_at, 20, 1) = '.' THEN substr(substr(audited_at, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END,
    deleted_at = CASE WHEN deleted_at IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', deleted_at) || '.' ||
        CASE WHEN substr(deleted_at, 20, 1) = '.' THEN substr(substr(deleted_at, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END;
UPDATE events SET
    at = CASE WHEN at IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', at) || '.' ||
        CASE WHEN substr(at, 20, 1) = '.' THEN substr(substr(at, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END;
UPDATE audits SET
    at = CASE WHEN at IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', at) || '.' ||
        CASE WHEN substr(at, 20, 1) = '.' THEN substr(substr(at, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END;
UPDATE schedule_runs SET
    slot = CASE WHEN slot IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', slot) || '.' ||
        CASE WHEN substr(slot, 20, 1) = '.' THEN substr(substr(slot, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END,
    at = CASE WHEN at IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', at) || '.' ||
        CASE WHEN substr(at, 20, 1) = '.' THEN substr(substr(at, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END;
UPDATE schedules_seen SET
    first_seen = CASE WHEN first_seen IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', first_seen) || '.' ||
        CASE WHEN substr(first_seen, 20, 1) = '.' THEN substr(substr(first_seen, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END;
UPDATE orphans SET
    recorded_at = CASE WHEN recorded_at IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', recorded_at) || '.' ||
        CASE WHEN substr(recorded_at, 20, 1) = '.' THEN substr(substr(recorded_at, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END,
    removed_at = CASE WHEN removed_at IS NULL THEN NULL ELSE strftime('%Y-%m-%dT%H:%M:%S', removed_at) || '.' ||
        CASE WHEN substr(removed_at, 20, 1) = '.' THEN substr(substr(removed_at, 21, 6) || '000000', 1, 6)
             ELSE '000000' END || 'Z' END;
CREATE TRIGGER history_append_only_update BEFORE UPDATE ON history
BEGIN SELECT RAISE(ABORT, 'history is append-only'); END;
