"""The store's domain operations, once for both backends, over a small connector.

A connector runs named queries (sql/<backend>/queries.sql: the same names and
parameters in both) in transactions, and turns parameters into what its database
takes. This module is the one place where transactions begin and commit; what
differs by backend (leases and owners, notifications, leaders) are the few hooks
at the end of `SqlStore`, which the SQLite backend leaves as they are.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from importlib.resources import files
from typing import Any, Protocol

from .states import (
    FINAL,
    IDLE,
    PROCESSING,
    RETRY_EVENT,
    STOPPABLE,
    WAITING,
    Event,
    State,
    next_state,
)
from .store import (
    AuditCopy,
    AuditEntry,
    Claim,
    Copy,
    EventEntry,
    HistoryEntry,
    Job,
    JobSummary,
    NewCopy,
    NewJob,
    Orphan,
    QueueStats,
    ScheduleRun,
    StaleState,
    Task,
    as_datetime,
    iso,
    utcnow,
)

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)

# The job columns a transition or an update may set (never id, state, spec).
JOB_COLUMNS = frozenset(
    {
        "phase",
        "step",
        "attempts",
        "retry_at",
        "error",
        "cancel_requested",
        "archive_name",
        "archive_sha256",
        "archive_size",
        "payload_files",
        "payload_bytes",
        "started_at",
        "config",
        "config_digest",
        "expires_at",
        "cleanup_attempts",
        "owner",
        "lease_until",
    }
)
# What `archived retry` resets: always, and when nothing of the failed run is kept.
REQUEUE_RESETS: dict[str, Any] = dict.fromkeys(("phase", "error", "retry_at", "started_at")) | {
    "attempts": 0,
    "cancel_requested": False,
    "cleanup_attempts": 0,
}
FROM_SCRATCH: dict[str, Any] = dict.fromkeys(
    ("step", "archive_name", "archive_sha256", "archive_size", "payload_files", "payload_bytes")
)
# What a taken-over job that starts again at activity_archiving forgets of the dead attempt.
RESTART_RESETS: dict[str, Any] = FROM_SCRATCH | {
    "retry_at": None,
    "error": None,
    "cleanup_attempts": 0,
    "phase": State.ACTIVITY_ARCHIVING.value,
}
PROCESSING_STATES = sorted(PROCESSING)
_STOPPABLE = sorted(STOPPABLE)
_WAITING = sorted(WAITING)


def load_queries(backend: str) -> dict[str, str]:
    text = (files("archived") / "sql" / backend / "queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)[1:]
    return {name: body.strip() for name, body in zip(parts[::2], parts[1::2], strict=True)}


def migrations(backend: str) -> list[tuple[int, str]]:
    """(number, SQL) of each numbered migration of `backend`, in order."""
    folder = files("archived") / "sql" / backend / "migrations"
    found = [p for p in folder.iterdir() if p.name.endswith(".sql")]
    return [
        (int(p.name.split("_", 1)[0]), p.read_text(encoding="utf-8"))
        for p in sorted(found, key=lambda p: p.name)
    ]


class Tx(Protocol):
    """The statements of one open transaction."""

    async def run(self, query: str, **params: Any) -> int:
        """A named query; the rows it changed."""
        ...

    async def all(self, query: str, **params: Any) -> list[dict[str, Any]]: ...

    async def execute(self, sql: str, params: Mapping[str, Any]) -> int:
        """SQL made here from known column names (with `:name` parameters)."""
        ...


class Connector(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """Begin ... commit, shielded from cancellation; rollback on error."""
        ...

    async def fetch(self, query: str, **params: Any) -> list[dict[str, Any]]:
        """A named read, outside any transaction."""
        ...

    async def close(self) -> None: ...


class _SlotTaken(Exception):
    """Another daemon acted on this schedule slot first: roll the job back."""


class SqlStore:
    host_id: str
    shared = False
    lease = 0.0  # seconds; one daemon alone needs no leases

    def __init__(self, db: Connector, host_id: str) -> None:
        self.db, self.host_id = db, host_id

    async def close(self) -> None:
        await self.db.close()

    async def ping(self) -> None:
        await self.db.fetch("ping")

    # -- jobs in, and what they are ----------------------------------------------------

    async def insert_job(
        self, job: NewJob, *, reason: str, schedule_run: ScheduleRun | None = None
    ) -> bool:
        now = utcnow()
        try:
            async with self.db.transaction() as tx:
                await tx.run(
                    "insert_job",
                    id=job.id,
                    name=job.name,
                    spec=job.spec,
                    spec_sha256=job.spec_sha256,
                    config=job.config,
                    config_digest=job.config_digest,
                    not_before=job.not_before,
                    now=now,
                )
                await self._history(tx, job.id, State.UNINITIALIZED, reason, now)
                for kind, task in job.tasks:
                    await tx.run("insert_task", job_id=job.id, kind=kind, name=task, now=now)
                if schedule_run is not None and not await self._schedule_run(tx, schedule_run):
                    raise _SlotTaken
                ready = "ready"
                if job.not_before is not None:
                    ready += f"; not before {iso(job.not_before)}"
                await self._transition(tx, job.id, State.UNINITIALIZED, Event.INITIALIZED, ready)
                await self._announce(tx, "job")
        except _SlotTaken:
            return False
        return True

    async def job(self, job_id: str) -> Job | None:
        rows = await self.db.fetch("get_job", id=job_id)
        return Job.from_row(rows[0]) if rows else None

    async def jobs(self, state: str | None = None) -> list[JobSummary]:
        return [JobSummary.from_row(r) for r in await self.db.fetch("list_jobs", state=state)]

    async def tasks(self, job_id: str, kind: str | None = None) -> list[Task]:
        rows = await self.db.fetch("tasks", job_id=job_id)
        return [Task.from_row(r) for r in rows if kind is None or r["kind"] == kind]

    async def history(self, job_id: str) -> list[HistoryEntry]:
        return [HistoryEntry.from_row(r) for r in await self.db.fetch("history", job_id=job_id)]

    async def events(self, job_id: str) -> list[EventEntry]:
        return [EventEntry.from_row(r) for r in await self.db.fetch("events", job_id=job_id)]

    async def copies(self, job_id: str, *, live: bool = False) -> list[Copy]:
        rows = await self.db.fetch("copies", job_id=job_id, live=live)
        return [Copy.from_row(r) for r in rows]

    async def orphans(self, job_id: str) -> list[Orphan]:
        return [Orphan.from_row(r) for r in await self.db.fetch("job_orphans", job_id=job_id)]

    async def audits(self, job_id: str) -> list[AuditEntry]:
        return [AuditEntry.from_row(r) for r in await self.db.fetch("audits", job_id=job_id)]

    async def job_counts(self) -> dict[str, int]:
        return {r["state"]: r["n"] for r in await self.db.fetch("count_by_state")}

    # -- the queue, as a daemon sees it ------------------------------------------------

    async def claim_next(
        self, config: str, config_digest: str, *, busy: Collection[str] = ()
    ) -> Claim | None:
        async with self.db.transaction() as tx:
            rows = await tx.all(
                "next_job",
                now=utcnow(),
                me=self.host_id,
                busy=sorted(busy),
                processing=PROCESSING_STATES,
                waiting=_WAITING,
            )
            if not rows:
                return None
            job = Job.from_row(rows[0])
            if job.state == State.QUEUED:
                how, previous = "triggered", None
                await self._transition(
                    tx,
                    job.id,
                    job.state,
                    Event.TRIGGERED,
                    f"triggered by the poll loop; config {config_digest}",
                    config=config,
                    config_digest=config_digest,
                    started_at=job.started_at or utcnow(),
                )
            elif job.owner in (None, self.host_id) or not self.shared:
                how, previous = (
                    ("retry" if job.state == State.RECOVERABLE_ERROR else "resumed"),
                    None,
                )
                if job.state == State.RECOVERABLE_ERROR:
                    phase = State(job.phase or State.ACTIVITY_ARCHIVING)
                    await self._transition(
                        tx,
                        job.id,
                        job.state,
                        RETRY_EVENT[phase],
                        f"backoff over: re-entering {phase}",
                        retry_at=None,
                        error=None,
                    )
            else:
                how, previous = "taken_over", job.owner
                await self._take_over(tx, job)
            await self._hold(tx, job.id)
            rows = await tx.all("get_job", id=job.id)
            return Claim(Job.from_row(rows[0]), how, previous)

    async def _take_over(self, tx: Tx, job: Job) -> None:
        """The job of a daemon whose lease lapsed. Its staging was on that host: the
        phases start again at activity_archiving (its attempt counts), and what the
        dead attempt stored is recorded as orphans, to be removed from the targets."""
        reason = f"taken over from {job.owner}"
        fields: dict[str, Any] = {}
        if next_state(job.state, Event.TAKEN_OVER) == State.ACTIVITY_ARCHIVING:
            if job.archive_name:
                tasks = await tx.all("tasks", job_id=job.id)
                targets = {t["name"] for t in tasks if t["kind"] == "storage"}
                targets |= {c["target"] for c in await tx.all("copies", job_id=job.id, live=True)}
                for target in sorted(targets):
                    await self._orphan(
                        tx, job.id, target, job.key, f"left by {job.owner}, whose lease lapsed"
                    )
            await tx.run("delete_copies", job_id=job.id)
            await tx.run("reset_tasks", job_id=job.id, now=utcnow())
            again = job.phase == State.ACTIVITY_ARCHIVING
            fields |= RESTART_RESETS | {
                "attempts": job.attempts if again else 1,
                "started_at": utcnow(),
            }
            reason += "; its staging was there: starting again at activity_archiving"
        await self._transition(tx, job.id, job.state, Event.TAKEN_OVER, reason, **fields)

    async def resumable(self) -> list[Job]:
        sent = time.monotonic()
        async with self.db.transaction() as tx:
            rows = await tx.all(
                "resume_mine",
                me=self.host_id,
                now=utcnow(),
                states=sorted(PROCESSING - {State.RECOVERABLE_ERROR}),
                lease=self.lease,
            )
        self._leases_renewed({r["id"] for r in rows}, sent)
        return [Job.from_row(r) for r in rows]

    async def cancel_requests(self) -> list[Job]:
        rows = await self.db.fetch("cancel_requests", states=_STOPPABLE, me=self.host_id)
        return [Job.from_row(r) for r in rows]

    async def cancel_waiting(self, job: Job) -> Job:
        async with self.db.transaction() as tx:
            await self._transition(
                tx,
                job.id,
                job.state,
                Event.CANCELED,
                "canceled",
                error=f"canceled while {job.state}",
            )
            await self._hold(tx, job.id)
            return Job.from_row((await tx.all("get_job", id=job.id))[0])

    # -- a job this daemon runs --------------------------------------------------------

    async def transition(
        self, job_id: str, state: State, event: str, reason: str, **fields: Any
    ) -> State:
        async with self._owned(job_id) as tx:
            return await self._transition(tx, job_id, state, Event(event), reason, **fields)

    async def update_job(self, job_id: str, **fields: Any) -> None:
        async with self._owned(job_id) as tx:
            await self._update(tx, job_id, fields)

    async def sync_storage_tasks(self, job_id: str, targets: Iterable[str]) -> None:
        wanted = sorted(targets)
        async with self._owned(job_id) as tx:
            await tx.run("drop_unstarted_storage_tasks", job_id=job_id, targets=wanted)
            for target in wanted:
                await tx.run(
                    "insert_task_if_missing",
                    job_id=job_id,
                    kind="storage",
                    name=target,
                    now=utcnow(),
                )

    async def start_task(self, job_id: str, kind: str, name: str) -> None:
        async with self._owned(job_id) as tx:
            await tx.run("start_task", job_id=job_id, kind=kind, name=name, now=utcnow())

    async def finish_task(
        self,
        job_id: str,
        kind: str,
        name: str,
        *,
        error: str | None = None,
        result: dict[str, Any] | None = None,
        copy: NewCopy | None = None,
    ) -> None:
        now = utcnow()
        async with self._owned(job_id) as tx:
            if copy is not None:
                await tx.run(
                    "upsert_copy",
                    job_id=job_id,
                    target=name,
                    path=copy.path,
                    size=copy.size,
                    sha256=copy.sha256,
                    now=now,
                )
            await tx.run(
                "finish_task",
                job_id=job_id,
                kind=kind,
                name=name,
                state="failed" if error is not None else "completed",
                error=error,
                result=None if result is None else json.dumps(result),
                now=now,
            )

    async def task_progress(self, job_id: str, kind: str, name: str, progress: str) -> None:
        async with self._owned(job_id) as tx:
            await tx.run("task_progress", job_id=job_id, kind=kind, name=name, progress=progress)

    async def abandon_tasks(self, job_id: str) -> None:
        async with self._owned(job_id) as tx:
            await tx.run("abandon_tasks", job_id=job_id, now=utcnow())

    async def finish_step(
        self,
        job_id: str,
        step: str,
        fields: Mapping[str, Any],
        events: Iterable[tuple[str, dict[str, Any]]],
    ) -> None:
        async with self._owned(job_id) as tx:
            await self._update(tx, job_id, {"step": step, **fields})
            for kind, detail in events:
                await self._event(tx, job_id, kind, detail)

    async def add_event(self, job_id: str, kind: str, detail: Mapping[str, Any]) -> None:
        async with self._owned(job_id) as tx:
            await self._event(tx, job_id, kind, detail)

    async def forget_copy(self, job_id: str, target: str) -> None:
        async with self._owned(job_id) as tx:
            await tx.run("delete_copy", job_id=job_id, target=target)

    async def record_orphan(self, job_id: str, target: str, key: str, reason: str) -> None:
        async with self._owned(job_id) as tx:
            await self._orphan(tx, job_id, target, key, reason)
            await self._event(
                tx, job_id, "orphan", {"target": target, "key": key, "reason": reason}
            )

    # -- operators ---------------------------------------------------------------------

    async def request_cancel(self, job_id: str) -> None:
        async with self.db.transaction() as tx:
            await tx.run("request_cancel", id=job_id, now=utcnow())
            await self._announce(tx, "cancel")

    async def requeue(self, job: Job, reason: str, *, keep_copies: bool) -> None:
        fields = dict(REQUEUE_RESETS)
        async with self.db.transaction() as tx:
            if keep_copies:  # its archive is safe on those targets: store it on the others
                await tx.run("reset_storage_tasks_without_copy", job_id=job.id, now=utcnow())
                await tx.run("drop_orphans_of_key", job_id=job.id, key=job.key)
            else:
                await tx.run("reset_tasks", job_id=job.id, now=utcnow())
                fields |= FROM_SCRATCH
            await self._transition(tx, job.id, State.FAILED, Event.REQUEUED, reason, **fields)
            await self._announce(tx, "job")

    async def set_hold(self, job_id: str, hold: bool) -> None:
        async with self.db.transaction() as tx:
            await tx.run("set_hold", id=job_id, hold=hold)
            await self._event(tx, job_id, "legal_hold", {"hold": hold})

    # -- retention and orphans ---------------------------------------------------------

    async def expired_jobs(self) -> list[Job]:
        return [Job.from_row(r) for r in await self.db.fetch("expired_jobs", now=utcnow())]

    async def legal_hold(self, job_id: str) -> bool:
        rows = await self.db.fetch("legal_hold", id=job_id)
        return bool(rows and rows[0]["legal_hold"])

    async def copy_deleted(self, job_id: str, target: str, *, existed: bool) -> None:
        async with self.db.transaction() as tx:
            await tx.run("mark_copy_deleted", job_id=job_id, target=target, now=utcnow())
            await self._event(tx, job_id, "retention", {"target": target, "deleted": existed})

    async def expire(self, job: Job, reason: str) -> bool:
        async with self.db.transaction() as tx:
            held = await tx.all("legal_hold", id=job.id)
            if held and held[0]["legal_hold"]:
                return False
            await self._transition(tx, job.id, State.COMPLETED, Event.EXPIRED, reason)
        return True

    async def orphans_due(self, job_id: str | None = None) -> list[Orphan]:
        rows = await self.db.fetch("orphans_due", job_id=job_id)
        return [Orphan.from_row(r) for r in rows]

    async def orphan_removed(self, orphan: Orphan, *, existed: bool) -> None:
        where = {"job_id": orphan.job_id, "target": orphan.target, "key": orphan.key}
        async with self.db.transaction() as tx:
            await tx.run("mark_orphan_removed", now=utcnow(), **where)
            await self._event(
                tx,
                orphan.job_id,
                "orphan_removed",
                {"target": orphan.target, "key": orphan.key, "was_there": existed},
            )

    # -- audits and metrics ------------------------------------------------------------

    async def copies_to_audit(
        self, *, job_id: str | None, known_bad: bool | None, limit: int
    ) -> list[AuditCopy]:
        rows = await self.db.fetch(
            "copies_to_audit", job_id=job_id, known_bad=known_bad, limit=limit
        )
        return [AuditCopy.from_row(r) for r in rows]

    async def job_copies(self, job_id: str) -> list[AuditCopy]:
        return [AuditCopy.from_row(r) for r in await self.db.fetch("job_copies", job_id=job_id)]

    async def last_audit_finding(self, job_id: str, target: str) -> AuditEntry | None:
        rows = await self.db.fetch("last_audit_finding", job_id=job_id, target=target)
        return AuditEntry.from_row(rows[0]) if rows else None

    async def record_audit(
        self, job_id: str, target: str, results: list[tuple[str, str]], *, news: bool
    ) -> None:
        now = utcnow()
        where = {"job_id": job_id, "target": target}
        async with self.db.transaction() as tx:
            for result, detail in results:
                if news:
                    await tx.run("record_audit", now=now, result=result, detail=detail, **where)
                await tx.run("count_audit", result=result)
            await tx.run("mark_audited", now=now, result=results[-1][0], **where)

    async def last_audited(self) -> datetime | None:
        rows = await self.db.fetch("last_audited")
        return as_datetime(rows[0]["at"]) if rows else None

    async def stats(self) -> QueueStats:
        damaged = await self.db.fetch("damaged_jobs")
        return QueueStats(
            jobs_by_state=await self.job_counts(),
            audits={r["result"]: r["count"] for r in await self.db.fetch("audit_totals")},
            copies={r["audit"]: r["n"] for r in await self.db.fetch("copies_by_audit")},
            damaged_jobs=damaged[0]["n"] if damaged else 0,
        )

    async def queue_depth(self, now: datetime) -> tuple[int, datetime | None]:
        rows = await self.db.fetch("queue_depth", now=now)
        if not rows or not rows[0]["n"]:
            return 0, None
        return int(rows[0]["n"]), as_datetime(rows[0]["oldest"])

    async def last_success_by_schedule(self) -> dict[str, datetime]:
        rows = await self.db.fetch("last_success_by_schedule")
        return {r["schedule"]: t for r in rows if (t := as_datetime(r["at"])) is not None}

    async def schedules_first_seen(self) -> dict[str, datetime]:
        rows = await self.db.fetch("schedules_first_seen")
        return {r["schedule"]: t for r in rows if (t := as_datetime(r["first_seen"])) is not None}

    # -- schedules ---------------------------------------------------------------------

    async def schedule_first_seen(self, schedule: str) -> datetime:
        async with self.db.transaction() as tx:
            rows = await tx.all("schedule_first_seen", schedule=schedule, now=utcnow())
        first = as_datetime(rows[0]["first_seen"])
        assert first is not None
        return first

    async def last_schedule_slot(self, schedule: str) -> datetime | None:
        rows = await self.db.fetch("last_schedule_run", schedule=schedule)
        return as_datetime(rows[0]["slot"]) if rows else None

    async def last_completed_fingerprint(self, schedule: str) -> str | None:
        rows = await self.db.fetch("last_completed_fingerprint", schedule=schedule)
        return rows[0]["fingerprint"] if rows else None

    async def record_schedule_run(self, run: ScheduleRun) -> bool:
        async with self.db.transaction() as tx:
            return await self._schedule_run(tx, run)

    async def schedule_runs(self, schedule: str | None, limit: int) -> list[ScheduleRun]:
        rows = await self.db.fetch("schedule_runs", schedule=schedule, limit=limit)
        return [ScheduleRun.from_row(r) for r in rows]

    # -- statements shared by the operations above -------------------------------------

    async def _transition(
        self, tx: Tx, job_id: str, state: State, event: Event, reason: str, **fields: Any
    ) -> State:
        """Move the job from `state` by `event`, with history; StaleState if it moved."""
        to_state = next_state(state, event)
        if to_state in FINAL | IDLE:  # no daemon runs it now
            fields |= {"owner": None, "lease_until": None}
        now = utcnow()
        changed = await tx.run("set_state", id=job_id, from_state=state, to_state=to_state, now=now)
        if changed != 1:
            raise StaleState(f"job {job_id} is no longer {state}")
        await self._update(tx, job_id, fields)
        await self._history(tx, job_id, to_state, reason, now)
        return to_state

    async def _history(self, tx: Tx, job_id: str, state: State, reason: str, now: datetime) -> None:
        await tx.run("insert_history", job_id=job_id, state=state, now=now, reason=reason)

    async def _update(self, tx: Tx, job_id: str, fields: Mapping[str, Any]) -> None:
        if not fields:
            return
        # the names go into the SQL text: a real check, which `python -O` keeps
        if unknown := set(fields) - JOB_COLUMNS:
            raise ValueError(f"not a job column: {sorted(unknown)}")
        assignments = ", ".join(f"{column} = :{column}" for column in sorted(fields))
        await tx.execute(f"UPDATE jobs SET {assignments} WHERE id = :id", {**fields, "id": job_id})

    async def _event(self, tx: Tx, job_id: str, kind: str, detail: Mapping[str, Any]) -> None:
        await tx.run(
            "insert_event",
            job_id=job_id,
            now=utcnow(),
            kind=kind,
            detail=json.dumps(detail, sort_keys=True),
        )

    async def _orphan(self, tx: Tx, job_id: str, target: str, key: str, reason: str) -> None:
        await tx.run(
            "upsert_orphan", job_id=job_id, target=target, key=key, reason=reason, now=utcnow()
        )

    async def _schedule_run(self, tx: Tx, run: ScheduleRun) -> bool:
        inserted = await tx.run(
            "insert_schedule_run",
            schedule=run.schedule,
            slot=run.slot,
            result=run.result,
            job_id=run.job_id,
            fingerprint=run.fingerprint,
            detail=run.detail,
            now=run.at or utcnow(),
        )
        return inserted == 1

    # -- what backends differ in: one daemon (SQLite) needs none of it -----------------

    def _owned(self, job_id: str) -> AbstractAsyncContextManager[Tx]:
        """A transaction on a job this daemon runs: LeaseLost if it is not its own."""
        return self.db.transaction()

    def check_lease(self, job_id: str) -> None:
        return None

    async def _hold(self, tx: Tx, job_id: str) -> None:
        """Make the job this daemon's (and start its lease), in a claim."""
        await self._update(tx, job_id, {"owner": self.host_id})

    def _leases_renewed(self, job_ids: set[str], sent: float) -> None:
        """The database renewed these leases, asked at `sent` (time.monotonic())."""

    async def _announce(self, tx: Tx, what: str) -> None:
        """Tell the other daemons at commit: a new job, a cancel."""

    async def renew_leases(self) -> set[str]:
        return set()

    async def listen(self, on_news: Callable[[], None]) -> None:
        """Call `on_news` whenever another process queued a job or asked for a cancel;
        returns at once where the daemon is the only one (it polls)."""

    @asynccontextmanager
    async def leading(self, task: str) -> AsyncIterator[bool]:
        yield True
