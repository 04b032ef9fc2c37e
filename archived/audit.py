"""Fixity audits: re-read stored copies, oldest-audited first, and heal from a good one.

A copy that is missing or does not match its digest is repaired from another target
of the same job whose copy verifies: written atomically by the storage driver, read
back, and recorded as a repair. With no good copy left, nothing is touched and the
result is recorded as `unrepaired`. Every result goes into the `audits` table.
"""

from __future__ import annotations

import contextlib
import secrets
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import structlog

from .config import Config
from .drivers import open_storage
from .drivers.base import StorageDriver, known_digest
from .store import Row, Store, now_iso

log = structlog.get_logger("archived.audit")


@dataclass(frozen=True)
class AuditResult:
    job_id: str
    target: str
    result: str  # ok | missing | damaged | repaired | unrepaired
    detail: str


class Auditor:
    def __init__(self, store: Store, config: Config, scratch: Path) -> None:
        self.store, self.config, self.scratch = store, config, scratch

    def _driver(self, row: Row, target: str) -> StorageDriver:
        # The target as configured now; a target since removed, as the job knew it.
        config = (
            self.config if target in self.config.storage else Config.from_snapshot(row["config"])
        )
        return open_storage(config, target)

    async def round(
        self, *, job_id: str | None = None, copies: int | None = None, max_bytes: int = 0
    ) -> list[AuditResult]:
        """Audit up to `copies` copies (all when None) within `max_bytes` (0: no limit)."""
        rows = await self.store.fetchall(
            "copies_to_audit", job_id=job_id, limit=-1 if copies is None else copies
        )
        chosen: list[Row] = []
        total = 0
        for row in rows:
            if max_bytes and chosen and total + row["size"] > max_bytes:
                break
            chosen.append(row)
            total += row["size"]
        by_job: dict[str, list[Row]] = defaultdict(list)
        for row in chosen:
            by_job[row["job_id"]].append(row)
        results = []
        for job, job_rows in by_job.items():
            results += await self._audit_job(job, {r["target"] for r in job_rows})
        return results

    async def _audit_job(self, job_id: str, targets: set[str]) -> list[AuditResult]:
        copies = {r["target"]: r for r in await self.store.fetchall("job_copies", job_id=job_id)}
        problems: dict[str, str | None] = {}
        for target in sorted(targets):
            row = copies[target]
            problems[target] = await self._driver(row, target).check(
                self._key(row), row["sha256"], row["size"]
            )
        results = [
            AuditResult(job_id, t, "ok", "sha256 matches") for t, p in problems.items() if p is None
        ]
        damaged = {t: p for t, p in problems.items() if p is not None}
        if damaged:
            # the other copies of this job, to repair from
            for target in sorted(set(copies) - set(problems)):
                row = copies[target]
                problem = await self._driver(row, target).check(
                    self._key(row), row["sha256"], row["size"]
                )
                problems[target] = problem
                if problem is None:
                    results.append(AuditResult(job_id, target, "ok", "sha256 matches"))
        good = [t for t, p in problems.items() if p is None]
        for target, problem in damaged.items():
            kind = "missing" if problem.startswith("missing") else "damaged"
            log.error(
                "stored copy failed its audit",
                job_id=job_id,
                target=target,
                state="completed",
                problem=problem,
            )
            results.append(AuditResult(job_id, target, kind, problem))
            if good:
                results.append(await self._repair(copies, good[0], target))
            else:
                results.append(
                    AuditResult(
                        job_id, target, "unrepaired", "no verified copy on any other target"
                    )
                )
        for result in results:
            await self._record(result)
        return results

    async def _repair(self, copies: dict[str, Row], source: str, target: str) -> AuditResult:
        row = copies[target]
        key = self._key(row)
        self.scratch.mkdir(parents=True, exist_ok=True)
        temp = self.scratch / f"repair-{secrets.token_hex(6)}.tar"
        try:
            await self._driver(copies[source], source).fetch(key, temp)
            digest = known_digest(row["sha256"])
            await self._driver(row, target).put([temp], key, digest, row["size"])
        except Exception as exc:
            return AuditResult(row["job_id"], target, "unrepaired", f"repair failed: {exc}")
        finally:
            with contextlib.suppress(OSError):
                temp.unlink()
        log.warning(
            "stored copy repaired",
            job_id=row["job_id"],
            target=target,
            state="completed",
            source=source,
        )
        return AuditResult(
            row["job_id"], target, "repaired", f"rewritten from {source}, read back and verified"
        )

    @staticmethod
    def _key(row: Row) -> str:
        return f"{row['name']}/{row['archive_name']}"

    async def _record(self, result: AuditResult) -> None:
        now = now_iso()
        async with self.store.transaction() as tx:
            await tx.run(
                "record_audit",
                job_id=result.job_id,
                target=result.target,
                now=now,
                result=result.result,
                detail=result.detail,
            )
            if result.result not in ("damaged", "missing"):  # a repair verdict follows
                await tx.run(
                    "mark_audited",
                    job_id=result.job_id,
                    target=result.target,
                    now=now,
                    result=result.result,
                )
