-- All SQL of the PostgreSQL queue store, by name: the names of sql/sqlite/queries.sql, and
-- those of leases and notifications. Loaded by archived/store_pg.py, which passes `:name`
-- parameters to psycopg; timestamps are timestamptz, leases are on the database's clock.

-- name: insert_job
INSERT INTO jobs (id, name, state, spec, spec_sha256, config, config_digest, not_before,
                  created_at, updated_at)
VALUES (:id, :name, 'uninitialized', :spec, :spec_sha256, :config, :config_digest,
        :not_before, :now, :now);

-- name: insert_task
INSERT INTO tasks (job_id, kind, name, updated_at) VALUES (:job_id, :kind, :name, :now);

-- name: insert_history
INSERT INTO history (job_id, state, at, reason) VALUES (:job_id, :state, :now, :reason);

-- name: get_job
SELECT * FROM jobs WHERE id = :id;

-- name: set_state
UPDATE jobs SET state = :to_state, updated_at = :now WHERE id = :id AND state = :from_state;

-- name: next_job
-- The oldest job there is to run, locked, skipping those another daemon is claiming:
-- queued and due; ours and waiting to retry, and due; or of a daemon whose lease lapsed
-- (a waiting one only once due).
SELECT * FROM jobs
WHERE NOT (id = ANY(:busy::text[]))
  AND ((state = 'queued' AND (not_before IS NULL OR not_before <= :now))
       OR (owner = :me AND ((state = 'recoverable_error' AND (retry_at IS NULL OR retry_at <= :now))
                            OR (state = 'cleanup' AND retry_at <= :now)))
       OR (state = ANY(:processing::text[]) AND (lease_until IS NULL OR lease_until < now())
           AND NOT (state = ANY(:waiting::text[]) AND coalesce(retry_at > :now, false))))
ORDER BY created_at, id LIMIT 1
FOR UPDATE SKIP LOCKED;

-- name: resume_mine
-- What a previous run of this daemon (this host_id) left in flight, its leases renewed.
UPDATE jobs SET lease_until = now() + make_interval(secs => :lease::float8)
WHERE owner = :me AND state = ANY(:states::text[])
  AND NOT (state = 'cleanup' AND coalesce(retry_at > :now, false))
RETURNING *;

-- name: hold_lease
UPDATE jobs SET owner = :me, lease_until = now() + make_interval(secs => :lease::float8)
WHERE id = :id;

-- name: renew_leases
-- The heartbeat: every job this daemon owns, in one statement.
UPDATE jobs SET lease_until = now() + make_interval(secs => :lease::float8)
WHERE owner = :me AND state = ANY(:processing::text[])
RETURNING id;

-- name: lock_owner
-- First in every write about a job a daemon runs: the row stays locked until commit,
-- so no takeover comes in between.
SELECT owner FROM jobs WHERE id = :id FOR UPDATE;

-- name: lease_mine
-- The jobs in flight of a queue moved here (`archived migrate-queue`), this host's.
UPDATE jobs SET lease_until = now() + make_interval(secs => :lease::float8) WHERE owner = :me;

-- name: any_job
SELECT 1 AS found FROM jobs LIMIT 1;

-- name: notify
SELECT pg_notify('archived', :what);

-- name: try_lead
SELECT pg_try_advisory_lock(:space, :key) AS leader;

-- name: stop_leading
SELECT pg_advisory_unlock(:space, :key);

-- name: jobs_by_id
SELECT * FROM jobs WHERE id = ANY(:ids::text[]);

-- name: tasks_of_jobs
SELECT job_id, kind, name, state, attempts, error, result, progress FROM tasks
WHERE job_id = ANY(:ids::text[]) ORDER BY job_id, kind, name;

-- name: list_jobs
-- With how many live copies the last audit found damaged or lost (and could not
-- repair), and how many sit on a target it could not reach.
SELECT id, name, state, created_at, updated_at, error, owner,
       (SELECT count(*) FROM copies c WHERE c.job_id = jobs.id AND c.deleted_at IS NULL
        AND c.audit_result = 'unrepaired') AS damaged_copies,
       (SELECT count(*) FROM copies c WHERE c.job_id = jobs.id AND c.deleted_at IS NULL
        AND c.audit_result = 'unreachable') AS unreachable_copies
FROM jobs WHERE :state::text IS NULL OR state = :state::text ORDER BY created_at, id;

-- name: history
SELECT state, at, reason FROM history WHERE job_id = :job_id ORDER BY seq;

-- name: tasks
SELECT kind, name, state, attempts, error, result, progress FROM tasks
WHERE job_id = :job_id ORDER BY kind, name;

-- name: start_task
UPDATE tasks SET state = 'executing', attempts = attempts + 1, error = NULL, updated_at = :now
WHERE job_id = :job_id AND kind = :kind AND name = :name;

-- name: finish_task
-- `counted`: 1 when the task's start was not committed (it ran less than a second)
UPDATE tasks SET state = :state, error = :error, result = :result, updated_at = :now,
                 attempts = attempts + :counted
WHERE job_id = :job_id AND kind = :kind AND name = :name;

-- name: copies
-- :live true: only the copies not deleted by retention.
SELECT target, path, size, sha256, verified_at, audited_at, audit_result, deleted_at FROM copies
WHERE job_id = :job_id AND (NOT :live::boolean OR deleted_at IS NULL) ORDER BY target;

-- name: upsert_copy
INSERT INTO copies (job_id, target, path, size, sha256, verified_at)
VALUES (:job_id, :target, :path, :size, :sha256, :now)
ON CONFLICT (job_id, target) DO UPDATE
SET path = excluded.path, size = excluded.size, sha256 = excluded.sha256,
    verified_at = excluded.verified_at;

-- name: insert_event
INSERT INTO events (job_id, at, kind, detail) VALUES (:job_id, :now, :kind, :detail);

-- name: events
SELECT at, kind, detail FROM events WHERE job_id = :job_id ORDER BY seq;

-- name: job_log
-- The job's history and its events in one read (the bag's event log): a transition's
-- `kind` is NULL; each in its order.
SELECT 0 AS src, seq, NULL AS kind, state, at, reason AS text
FROM history WHERE job_id = :job_id
UNION ALL
SELECT 1, seq, kind, NULL, at, detail::text FROM events WHERE job_id = :job_id
ORDER BY src, seq;

-- name: abandon_tasks
UPDATE tasks SET state = 'failed', error = 'cut short', updated_at = :now
WHERE job_id = :job_id AND state = 'executing';

-- name: reset_tasks
UPDATE tasks SET state = 'created', error = NULL, result = NULL, updated_at = :now
WHERE job_id = :job_id;

-- name: delete_copy
DELETE FROM copies WHERE job_id = :job_id AND target = :target;

-- name: delete_copies
DELETE FROM copies WHERE job_id = :job_id;

-- name: cancel_requests
-- Those no daemon runs, or this one does.
SELECT * FROM jobs WHERE cancel_requested AND state = ANY(:states::text[])
AND (owner IS NULL OR owner = :me);

-- name: request_cancel
UPDATE jobs SET cancel_requested = true, updated_at = :now WHERE id = :id;

-- name: count_by_state
SELECT state, count(*) AS n FROM jobs GROUP BY state;

-- name: ping
SELECT 1 AS ok;

-- name: insert_task_if_missing
INSERT INTO tasks (job_id, kind, name, updated_at) VALUES (:job_id, :kind, :name, :now)
ON CONFLICT DO NOTHING;

-- name: drop_unstarted_storage_tasks
-- A target the config no longer has (or the job no longer asks for), not yet written to.
DELETE FROM tasks WHERE job_id = :job_id AND kind = 'storage' AND state = 'created'
AND NOT (name = ANY(:targets::text[]));

-- name: task_progress
UPDATE tasks SET progress = :progress WHERE job_id = :job_id AND kind = :kind AND name = :name;

-- name: copies_to_audit
-- Oldest-audited first (never audited before all), copies of completed jobs only;
-- :known_bad true: only those the last audit could not repair or reach, false: the others.
SELECT c.job_id, c.target, c.path, c.size, c.sha256, c.audit_result, j.name, j.archive_name,
       j.config, j.expires_at, j.legal_hold
FROM copies c JOIN jobs j ON j.id = c.job_id
WHERE j.state = 'completed' AND c.deleted_at IS NULL
  AND (:job_id::text IS NULL OR c.job_id = :job_id::text)
  AND (:known_bad::boolean IS NULL
       OR (coalesce(c.audit_result, '') IN ('unrepaired', 'unreachable')) = :known_bad::boolean)
ORDER BY c.audited_at IS NOT NULL, c.audited_at, c.verified_at
LIMIT CASE WHEN :limit::int < 0 THEN NULL ELSE :limit::int END;

-- name: job_copies
SELECT c.job_id, c.target, c.path, c.size, c.sha256, c.audit_result, j.name, j.archive_name,
       j.config, j.expires_at, j.legal_hold
FROM copies c JOIN jobs j ON j.id = c.job_id WHERE c.job_id = :job_id AND c.deleted_at IS NULL
ORDER BY c.target;

-- name: record_audit
INSERT INTO audits (job_id, target, at, result, detail)
VALUES (:job_id, :target, :now, :result, :detail);

-- name: last_audit_finding
SELECT target, at, result, detail FROM audits
WHERE job_id = :job_id AND target = :target AND result IN ('missing', 'damaged')
ORDER BY seq DESC LIMIT 1;

-- name: count_audit
INSERT INTO audit_totals (result, count) VALUES (:result, 1)
ON CONFLICT (result) DO UPDATE SET count = audit_totals.count + 1;

-- name: audit_totals
SELECT result, count FROM audit_totals;

-- name: last_audited
SELECT max(audited_at) AS at FROM copies;

-- name: copies_by_audit
-- Live copies of completed jobs by what their last audit found.
SELECT CASE WHEN c.audit_result IS NULL THEN 'unaudited'
            WHEN c.audit_result IN ('ok', 'repaired') THEN 'ok'
            WHEN c.audit_result = 'unrepaired' THEN 'damaged'
            ELSE c.audit_result END AS audit,
       count(*) AS n
FROM copies c JOIN jobs j ON j.id = c.job_id
WHERE j.state = 'completed' AND c.deleted_at IS NULL GROUP BY 1;

-- name: damaged_jobs
SELECT count(DISTINCT c.job_id) AS n FROM copies c JOIN jobs j ON j.id = c.job_id
WHERE j.state = 'completed' AND c.deleted_at IS NULL AND c.audit_result = 'unrepaired';

-- name: mark_audited
UPDATE copies SET audited_at = :now, audit_result = :result
WHERE job_id = :job_id AND target = :target;

-- name: audits
SELECT target, at, result, detail FROM audits WHERE job_id = :job_id ORDER BY seq;

-- name: expired_jobs
SELECT * FROM jobs
WHERE state = 'completed' AND expires_at IS NOT NULL AND expires_at <= :now AND NOT legal_hold
ORDER BY expires_at;

-- name: legal_hold
SELECT legal_hold FROM jobs WHERE id = :id;

-- name: mark_copy_deleted
UPDATE copies SET deleted_at = :now WHERE job_id = :job_id AND target = :target;

-- name: set_hold
UPDATE jobs SET legal_hold = :hold WHERE id = :id;

-- name: schedule_first_seen
INSERT INTO schedules_seen (schedule, first_seen) VALUES (:schedule, :now)
ON CONFLICT (schedule) DO UPDATE SET schedule = excluded.schedule
RETURNING first_seen;

-- name: last_schedule_run
SELECT slot FROM schedule_runs WHERE schedule = :schedule ORDER BY slot DESC LIMIT 1;

-- name: insert_schedule_run
-- Nothing when the slot was acted on already (by another daemon, a moment ago).
INSERT INTO schedule_runs (schedule, slot, result, job_id, fingerprint, detail, at)
VALUES (:schedule, :slot, :result, :job_id, :fingerprint, :detail, :now)
ON CONFLICT (schedule, slot) DO NOTHING;

-- name: last_completed_fingerprint
SELECT r.fingerprint FROM schedule_runs r JOIN jobs j ON j.id = r.job_id
WHERE r.schedule = :schedule AND r.result = 'created' AND j.state = 'completed'
ORDER BY r.slot DESC LIMIT 1;

-- name: schedule_runs
SELECT schedule, slot, result, job_id, detail, at FROM schedule_runs
WHERE :schedule::text IS NULL OR schedule = :schedule::text ORDER BY slot DESC LIMIT :limit;

-- name: upsert_orphan
INSERT INTO orphans (job_id, target, key, reason, recorded_at)
VALUES (:job_id, :target, :key, :reason, :now)
ON CONFLICT (job_id, target, key) DO UPDATE
SET reason = excluded.reason, removed_at = NULL;

-- name: orphans_due
-- Orphans of final jobs (a job that runs again cleans up itself), or of job :job_id.
SELECT o.job_id, o.target, o.key, o.reason, o.recorded_at, j.config, j.state
FROM orphans o JOIN jobs j ON j.id = o.job_id
WHERE o.removed_at IS NULL
  AND (j.id = :job_id::text
       OR (:job_id::text IS NULL AND j.state IN ('completed', 'failed', 'deleted')))
ORDER BY o.recorded_at;

-- name: mark_orphan_removed
UPDATE orphans SET removed_at = :now WHERE job_id = :job_id AND target = :target AND key = :key;

-- name: drop_orphans_of_key
DELETE FROM orphans WHERE job_id = :job_id AND key = :key AND removed_at IS NULL;

-- name: job_orphans
SELECT job_id, target, key, reason, recorded_at, removed_at FROM orphans
WHERE job_id = :job_id ORDER BY target, key;

-- name: reset_storage_tasks_without_copy
UPDATE tasks SET state = 'created', error = NULL, result = NULL, updated_at = :now
WHERE job_id = :job_id AND kind = 'storage'
AND name NOT IN (SELECT target FROM copies WHERE job_id = :job_id AND deleted_at IS NULL);

-- name: queue_depth
-- Queued jobs that are due (not waiting for a not_before still to come), and since when
-- the one waiting longest has been due.
SELECT count(*) AS n, min(coalesce(not_before, created_at)) AS oldest
FROM jobs WHERE state = 'queued' AND (not_before IS NULL OR not_before <= :now);

-- name: last_success_by_schedule
-- When each schedule last did its work: its latest job that completed (the history keeps
-- the time, also once retention deleted the job), or a slot skipped as unchanged since.
SELECT r.schedule, max(coalesce(h.at, r.at)) AS at
FROM schedule_runs r LEFT JOIN history h ON h.job_id = r.job_id AND h.state = 'completed'
WHERE h.at IS NOT NULL OR r.result = 'skipped'
GROUP BY r.schedule;

-- name: schedules_first_seen
SELECT schedule, first_seen FROM schedules_seen;
