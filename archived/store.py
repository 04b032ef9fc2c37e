"""The queue store: the only owner of jobs, tasks, history, copies and schedules.

Everything else asks it for domain operations (claim the next job, finish a task with
its copy, requeue a failed job, ...) and gets typed rows back; nothing outside the
store names a query or opens the database. Two backends share one implementation of
those operations (store_sql.py) over a small connector each:

- SQLite in `<state_dir>/archived.db` (store_sqlite.py), the zero-setup default: one
  host, one daemon;
- PostgreSQL at `[queue] url` (store_pg.py): several daemons on several hosts, each
  job owned by one daemon under a lease its heartbeat renews.

The SQL of each backend is named queries (sql/<backend>/queries.sql, the same names in
both) and numbered migrations beside them. Timestamps are aware UTC `datetime`s in
rows; SQLite keeps them as fixed-width ISO 8601 text, so SQL compares them right.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, ClassVar, Protocol

# re-exported: the store's users take the row timestamps' helpers from here
from .moments import as_datetime as as_datetime
from .moments import iso as iso
from .moments import now_iso as now_iso
from .moments import utcnow as utcnow
from .states import State

SQLITE_FILE = "archived.db"


def storage_key(name: str, archive_name: str) -> str:
    """Where a job's archive lies on every target: `<job name>/<archive name>`."""
    return f"{name}/{archive_name}"


class StaleState(Exception):
    """The job was not in the state the caller thought: someone else moved it."""


class LeaseLost(Exception):
    """This daemon no longer owns the job (its lease lapsed and another daemon took the
    job over): stop working on it at once, and touch nothing of it."""


def lease_lost(exc: BaseException) -> bool:
    """Whether `exc` is, or (in an exception group) holds, a LeaseLost."""
    if isinstance(exc, BaseExceptionGroup):
        return any(lease_lost(e) for e in exc.exceptions)
    return isinstance(exc, LeaseLost)


class StoreUnavailable(Exception):
    """The database cannot be read now (locked, unreachable); the message says why."""


# -- rows ------------------------------------------------------------------------------


class _Row:
    """Built from a database row: timestamps become datetimes, the rest is as stored."""

    _TIMES: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Any:
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name not in row:
                continue
            value = row[f.name]
            values[f.name] = as_datetime(value) if f.name in cls._TIMES else value
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """For `--json`: timestamps in fixed-width ISO 8601 UTC."""
        return {
            f.name: iso(v) if isinstance(v, datetime) else v
            for f in fields(self)  # type: ignore[arg-type]
            for v in [getattr(self, f.name)]
        }


@dataclass(frozen=True)
class Job(_Row):
    id: str
    name: str
    state: State
    spec: str
    spec_sha256: str
    config: str
    config_digest: str
    created_at: datetime
    updated_at: datetime
    not_before: datetime | None = None
    phase: str | None = None
    step: str | None = None
    attempts: int = 0
    retry_at: datetime | None = None
    error: str | None = None
    cancel_requested: bool = False
    archive_name: str | None = None
    archive_sha256: str | None = None
    archive_size: int | None = None
    payload_files: int | None = None
    payload_bytes: int | None = None
    started_at: datetime | None = None
    expires_at: datetime | None = None
    legal_hold: bool = False
    cleanup_attempts: int = 0
    owner: str | None = None  # the daemon (host_id) running it, in a processing state
    lease_until: datetime | None = None

    _TIMES = frozenset(
        {"created_at", "updated_at", "not_before", "retry_at", "started_at", "expires_at"}
        | {"lease_until"}
    )

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        job: Job = super().from_row(row)
        return job.replace(
            state=State(job.state),
            cancel_requested=bool(job.cancel_requested),
            legal_hold=bool(job.legal_hold),
        )

    def replace(self, **changes: Any) -> Job:
        return type(self)(**{**self.__dict__, **changes})

    def attempt_fields(self, phase: State) -> dict[str, Any]:
        """The fields that count one more attempt of `phase`."""
        attempts = self.attempts + 1 if self.phase == phase else 1
        return {"phase": phase.value, "attempts": attempts}

    @property
    def key(self) -> str:
        """Where its archive lies on a target."""
        return storage_key(self.name, self.archive_name or "")

    @property
    def waiting(self) -> bool:
        """Waiting to retry, holding no slot: the claim takes it again when it is due."""
        if self.state == State.RECOVERABLE_ERROR:
            return True
        return (
            self.state == State.CLEANUP and self.retry_at is not None and self.retry_at > utcnow()
        )


@dataclass(frozen=True)
class JobSummary(_Row):
    """A line of `archived jobs`, with the copies its last audit found at risk."""

    id: str
    name: str
    state: str
    created_at: datetime
    updated_at: datetime
    error: str | None
    damaged_copies: int
    unreachable_copies: int
    owner: str | None = None  # the daemon running it (several on one queue)

    _TIMES = frozenset({"created_at", "updated_at"})


@dataclass(frozen=True)
class Task(_Row):
    kind: str  # activity | storage
    name: str
    state: str  # created | executing | completed | failed
    attempts: int
    error: str | None
    result: dict[str, Any] | None
    progress: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Task:
        task: Task = super().from_row(row)
        result = task.result
        if isinstance(result, str):
            result = json.loads(result)
        return cls(**{**task.__dict__, "result": result})


@dataclass(frozen=True)
class HistoryEntry(_Row):
    state: str
    at: datetime
    reason: str

    _TIMES = frozenset({"at"})


@dataclass(frozen=True)
class EventEntry(_Row):
    at: datetime
    kind: str
    detail: dict[str, Any]

    _TIMES = frozenset({"at"})

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> EventEntry:
        event: EventEntry = super().from_row(row)
        detail = event.detail
        return cls(event.at, event.kind, json.loads(detail) if isinstance(detail, str) else detail)


@dataclass(frozen=True)
class Copy(_Row):
    target: str
    path: str
    size: int
    sha256: str
    verified_at: datetime
    audited_at: datetime | None = None
    audit_result: str | None = None
    deleted_at: datetime | None = None

    _TIMES = frozenset({"verified_at", "audited_at", "deleted_at"})


@dataclass(frozen=True)
class NewEvent:
    """An event to record with a transition, at the time it happened."""

    kind: str
    detail: dict[str, Any]
    at: datetime


@dataclass(frozen=True)
class NewCopy:
    """What a storage task wrote: recorded with the task that wrote it."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class TaskEnd:
    """How a task ended: completed with `result` (and the `copy` a storage task wrote,
    recorded in the same transaction), or failed with `error`. `counted`: its start
    was not committed, so its attempt is counted here."""

    kind: str
    name: str
    at: datetime
    result: dict[str, Any] | None = None
    copy: NewCopy | None = None
    error: str | None = None
    counted: bool = False


@dataclass(frozen=True)
class AuditCopy(_Row):
    """A live copy of a completed job, with what an audit needs to reach it."""

    job_id: str
    target: str
    path: str
    size: int
    sha256: str
    audit_result: str | None
    name: str
    archive_name: str
    config: str
    expires_at: datetime | None = None  # the job's: a repaired copy is locked as the others
    legal_hold: bool = False

    _TIMES = frozenset({"expires_at"})

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> AuditCopy:
        copy: AuditCopy = super().from_row(row)
        return cls(**{**copy.__dict__, "legal_hold": bool(copy.legal_hold)})

    @property
    def key(self) -> str:
        return storage_key(self.name, self.archive_name)


@dataclass(frozen=True)
class AuditEntry(_Row):
    target: str
    at: datetime
    result: str
    detail: str

    _TIMES = frozenset({"at"})


@dataclass(frozen=True)
class Orphan(_Row):
    """What a job's cleanup (or a takeover) left on a target, to be removed later."""

    job_id: str
    target: str
    key: str
    reason: str
    recorded_at: datetime
    removed_at: datetime | None = None
    config: str = ""  # the job's config snapshot (orphans due for removal)
    state: str = ""  # the job's state (orphans due for removal)

    _TIMES = frozenset({"recorded_at", "removed_at"})


@dataclass(frozen=True)
class ScheduleRun(_Row):
    """What one schedule slot did: created a job, or was skipped, missed, rejected."""

    schedule: str
    slot: datetime
    result: str  # created | skipped | missed | rejected
    job_id: str | None = None
    fingerprint: str | None = None
    detail: str = ""
    at: datetime | None = None

    _TIMES = frozenset({"slot", "at"})


@dataclass(frozen=True)
class NewJob:
    """A validated job file (or schedule template), to be inserted and queued."""

    id: str
    name: str
    spec: str
    spec_sha256: str
    config: str
    config_digest: str
    not_before: datetime | None
    tasks: tuple[tuple[str, str], ...]  # (kind, name)


@dataclass(frozen=True)
class Claim:
    """A job this daemon now runs, and how it came to: `triggered` (it was queued),
    `retry` (its backoff is over), `resumed` (it was this daemon's already), or
    `taken_over` (from `previous_owner`, whose lease lapsed)."""

    job: Job
    how: str
    previous_owner: str | None = None


@dataclass(frozen=True)
class QueueStats:
    """What the metrics read from the database."""

    jobs_by_state: dict[str, int]
    audits: dict[str, int]  # audit results ever, daemon and command line alike
    copies: dict[str, int]  # live copies of completed jobs by what their last audit found
    damaged_jobs: int  # completed jobs with a copy found bad and not repaired


# -- the interface ---------------------------------------------------------------------


class Store(Protocol):
    """The queue's domain operations. Writes about a job a daemon runs (transitions,
    tasks, steps, events, copies) raise LeaseLost when another daemon owns it now."""

    host_id: str
    shared: bool  # several daemons share this queue (leases, takeovers, notifications)

    async def close(self) -> None: ...
    async def ping(self) -> None: ...

    # -- jobs in, and what they are
    async def insert_job(
        self, job: NewJob, *, reason: str, schedule_run: ScheduleRun | None = None
    ) -> bool:
        """Insert, with its tasks and history, and queue it; with `schedule_run`, the
        slot's row in the same transaction: False (nothing inserted) if the slot was
        acted on already (by another daemon)."""
        ...

    async def job(self, job_id: str) -> Job | None: ...
    async def jobs_by_id(self, ids: Collection[str]) -> dict[str, Job]:
        """Those of `ids` that are jobs in the queue."""
        ...

    async def jobs(self, state: str | None = None) -> list[JobSummary]: ...
    async def tasks(self, job_id: str, kind: str | None = None) -> list[Task]: ...
    async def history(self, job_id: str) -> list[HistoryEntry]: ...
    async def events(self, job_id: str) -> list[EventEntry]: ...
    async def job_log(self, job_id: str) -> tuple[list[HistoryEntry], list[EventEntry]]:
        """`history` and `events` in one read."""
        ...

    async def copies(self, job_id: str, *, live: bool = False) -> list[Copy]: ...
    async def orphans(self, job_id: str) -> list[Orphan]: ...
    async def audits(self, job_id: str) -> list[AuditEntry]: ...

    # -- the queue, as a daemon sees it
    async def claim_next(
        self, config: str, config_digest: str, *, busy: Collection[str] = ()
    ) -> Claim | None:
        """The next job this daemon should run, not one of `busy` (running here): the
        oldest of the queued jobs that are due (moved to activity_archiving on `config`),
        the waiting jobs whose retry_at passed, and jobs whose owner's lease lapsed."""
        ...

    async def resumable(self) -> list[Job]:
        """This daemon's jobs in a processing state that are not waiting: what a
        previous run of it left in flight."""
        ...

    async def renew_leases(self) -> set[str]:
        """Renew the lease on every job this daemon owns; their ids."""
        ...

    def check_lease(self, job_id: str) -> None:
        """LeaseLost, without asking the database, if this daemon's lease on the job may
        have lapsed: before anything is written to a target."""
        ...

    async def cancel_requests(self) -> list[Job]:
        """Jobs in a stoppable state whose cancel was asked for, that this daemon acts on."""
        ...

    async def cancel_waiting(self, job: Job) -> Job:
        """A job no daemon runs now (queued, or waiting to retry) to failure, canceled;
        this daemon runs its failure path. StaleState if it moved meanwhile."""
        ...

    async def job_counts(self) -> dict[str, int]: ...

    async def listen(self, on_news: Callable[[], None]) -> None:
        """Call `on_news` whenever another process queued a job or asked for a cancel
        (PostgreSQL: LISTEN); returns at once where one daemon is alone (SQLite)."""
        ...

    def leading(self, task: str) -> AbstractAsyncContextManager[bool]:
        """True inside if this daemon is the only one doing `task` (audits, retention)
        across the daemons on this queue now."""
        ...

    # -- a job this daemon runs
    async def transition(
        self,
        job_id: str,
        state: State,
        event: str,
        reason: str,
        *,
        events: Iterable[NewEvent] = (),
        ended: Iterable[TaskEnd] = (),
        **fields: Any,
    ) -> Job:
        """The job moved from `state` by `event` (and the tasks `ended` and `events`
        recorded with it), as it is now; StaleState if it moved."""
        ...

    async def update_job(self, job_id: str, **fields: Any) -> None:
        """Set job columns that are not its state (attempts, cleanup_attempts, ...)."""
        ...

    async def sync_storage_tasks(self, job_id: str, targets: Iterable[str]) -> None: ...
    async def start_task(self, job_id: str, kind: str, name: str) -> None: ...
    async def finish_tasks(self, job_id: str, ended: Iterable[TaskEnd]) -> Job:
        """Tasks that ended, in one transaction; the job as it is then (read in it)."""
        ...

    async def task_progress(self, job_id: str, kind: str, name: str, progress: str) -> None: ...
    async def abandon_tasks(
        self,
        job_id: str,
        unstarted: Iterable[tuple[str, str]] = (),
        ended: Iterable[TaskEnd] = (),
    ) -> None:
        """The job's running tasks failed, `cut short`: those marked started, and the
        `unstarted` ones (kind, name), whose start was not committed yet (each counted);
        the tasks that `ended` meanwhile recorded as they ended."""
        ...

    async def add_event(self, job_id: str, kind: str, detail: Mapping[str, Any]) -> None: ...
    async def forget_copy(self, job_id: str, target: str) -> None: ...
    async def record_orphan(self, job_id: str, target: str, key: str, reason: str) -> None: ...

    # -- operators
    async def request_cancel(self, job_id: str) -> None: ...
    async def requeue(self, job: Job, reason: str, *, keep_copies: bool) -> None:
        """A failed job queued again: with `keep_copies`, only the storage tasks of
        targets without a live copy run again; else everything, from the start."""
        ...

    async def set_hold(self, job_id: str, hold: bool) -> None: ...

    # -- retention and orphans
    async def expired_jobs(self) -> list[Job]: ...
    async def legal_hold(self, job_id: str) -> bool: ...
    async def copy_deleted(self, job_id: str, target: str, *, existed: bool) -> None: ...
    async def expire(self, job: Job, reason: str) -> bool:
        """completed -> deleted unless a legal hold came in: False then."""
        ...

    async def orphans_due(self, job_id: str | None = None) -> list[Orphan]: ...
    async def orphan_removed(self, orphan: Orphan, *, existed: bool) -> None: ...

    # -- audits and metrics
    async def copies_to_audit(
        self, *, job_id: str | None, known_bad: bool | None, limit: int
    ) -> list[AuditCopy]: ...
    async def job_copies(self, job_id: str) -> list[AuditCopy]: ...
    async def last_audit_finding(self, job_id: str, target: str) -> AuditEntry | None: ...
    async def record_audit(
        self, job_id: str, target: str, results: list[tuple[str, str]], *, news: bool
    ) -> None:
        """One copy's audit results: counted always, kept as rows when they are `news`;
        the last one is the copy's verdict."""
        ...

    async def last_audited(self) -> datetime | None: ...
    async def stats(self) -> QueueStats: ...
    async def queue_depth(self, now: datetime) -> tuple[int, datetime | None]:
        """How many queued jobs are due at `now`, and since when the one waiting longest
        has been due (None: the queue is empty)."""
        ...

    async def last_success_by_schedule(self) -> dict[str, datetime]:
        """When each schedule last completed a job, or skipped a slot as unchanged since."""
        ...

    async def schedules_first_seen(self) -> dict[str, datetime]:
        """When each schedule first appeared in a config a daemon ran on."""
        ...

    # -- schedules
    async def schedule_first_seen(self, schedule: str) -> datetime: ...
    async def last_schedule_slot(self, schedule: str) -> datetime | None: ...
    async def last_completed_fingerprint(self, schedule: str) -> str | None: ...
    async def record_schedule_run(self, run: ScheduleRun) -> bool:
        """False if the slot was acted on already."""
        ...

    async def schedule_runs(self, schedule: str | None, limit: int) -> list[ScheduleRun]: ...


class StateReader(Protocol):
    """Quick synchronous reads of jobs, for `submit --wait` (no event loop)."""

    def peek(self, ids: Iterable[str]) -> dict[str, tuple[Job, list[Task]]]:
        """Each job that exists, with its tasks; StoreUnavailable if it cannot tell now."""
        ...

    def close(self) -> None: ...


def peeked(
    jobs: list[dict[str, Any]], tasks: list[dict[str, Any]]
) -> dict[str, tuple[Job, list[Task]]]:
    """A StateReader's rows (tasks with their job_id) as typed rows, by job."""
    found: dict[str, tuple[Job, list[Task]]] = {r["id"]: (Job.from_row(r), []) for r in jobs}
    for row in tasks:
        if row["job_id"] in found:  # else inserted between the two reads: the next peek
            found[row["job_id"]][1].append(Task.from_row(row))
    return found


# Every table, parents first, and the order of its rows (for moving a queue).
TABLES = {
    "jobs": "created_at, id",
    "tasks": "job_id, kind, name",
    "history": "seq",
    "events": "seq",
    "copies": "job_id, target",
    "audits": "seq",
    "audit_totals": "result",
    "schedule_runs": "schedule, slot",
    "schedules_seen": "schedule",
    "orphans": "job_id, target, key",
}
