"""Retention and orphans in the store: jobs whose copies expired, copies deleted, a job
expired unless it is under a legal hold; what a failed job left on a target, and its
removal.
"""

from __future__ import annotations

from .states import Event, State
from .store import Job, Orphan, utcnow
from .store_sqlbase import SqlBase


class RetentionOps(SqlBase):
    """Expired copies and orphans, as the housekeeping rounds remove them."""

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
