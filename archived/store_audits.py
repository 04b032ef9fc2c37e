"""Fixity audits in the store: the copies due for one, the findings recorded and
counted, when the last audit ran.
"""

from __future__ import annotations

from datetime import datetime

from .store import AuditCopy, AuditEntry, as_datetime, utcnow
from .store_sqlbase import SqlBase


class AuditOps(SqlBase):
    """Fixity audits: which copies, and what they found."""

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
