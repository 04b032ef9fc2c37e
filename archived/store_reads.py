"""Reading the queue for the command line and the metrics: a job, its tasks, history,
events, copies, orphans and audits; counts by state, audit totals, the queue's depth.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from .store import (
    AuditEntry,
    Copy,
    EventEntry,
    HistoryEntry,
    Job,
    JobSummary,
    Orphan,
    QueueStats,
    Task,
    as_datetime,
)
from .store_sqlbase import SqlBase


class JobReads(SqlBase):
    """Reads outside any transaction, as typed rows."""

    async def job(self, job_id: str) -> Job | None:
        rows = await self.db.fetch("get_job", id=job_id)
        return Job.from_row(rows[0]) if rows else None

    async def jobs_by_id(self, ids: Collection[str]) -> dict[str, Job]:
        rows = await self.db.fetch("jobs_by_id", ids=list(ids))
        return {r["id"]: Job.from_row(r) for r in rows}

    async def jobs(self, state: str | None = None) -> list[JobSummary]:
        return [JobSummary.from_row(r) for r in await self.db.fetch("list_jobs", state=state)]

    async def tasks(self, job_id: str, kind: str | None = None) -> list[Task]:
        rows = await self.db.fetch("tasks", job_id=job_id)
        return [Task.from_row(r) for r in rows if kind is None or r["kind"] == kind]

    async def history(self, job_id: str) -> list[HistoryEntry]:
        return [HistoryEntry.from_row(r) for r in await self.db.fetch("history", job_id=job_id)]

    async def events(self, job_id: str) -> list[EventEntry]:
        return [EventEntry.from_row(r) for r in await self.db.fetch("events", job_id=job_id)]

    async def job_log(self, job_id: str) -> tuple[list[HistoryEntry], list[EventEntry]]:
        history, events = [], []
        for r in await self.db.fetch("job_log", job_id=job_id):
            if r["kind"] is None:
                history.append(HistoryEntry.from_row({**r, "reason": r["text"]}))
            else:
                events.append(EventEntry.from_row({**r, "detail": r["text"]}))
        return history, events

    async def copies(self, job_id: str, *, live: bool = False) -> list[Copy]:
        rows = await self.db.fetch("copies", job_id=job_id, live=live)
        return [Copy.from_row(r) for r in rows]

    async def orphans(self, job_id: str) -> list[Orphan]:
        return [Orphan.from_row(r) for r in await self.db.fetch("job_orphans", job_id=job_id)]

    async def audits(self, job_id: str) -> list[AuditEntry]:
        return [AuditEntry.from_row(r) for r in await self.db.fetch("audits", job_id=job_id)]

    async def job_counts(self) -> dict[str, int]:
        return {r["state"]: r["n"] for r in await self.db.fetch("count_by_state")}

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
