"""Schedules in the store: when a schedule was first seen, its last slot and the
fingerprint of its last completed job, its runs (one per slot, whoever acts first).
"""

from __future__ import annotations

from datetime import datetime

from .store import ScheduleRun, as_datetime, utcnow
from .store_sqlbase import SqlBase


class ScheduleOps(SqlBase):
    """A schedule's slots and runs."""

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
