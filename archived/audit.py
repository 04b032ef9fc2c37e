"""Fixity audits: re-read stored copies, oldest-audited first, and heal from a good one.

A copy that is missing or does not match its digest is repaired from another target
of the same job whose copy verifies: written atomically by the storage driver, read
back, and recorded as a repair. With no good copy left, nothing is touched and the
result is `unrepaired`. A copy whose target cannot be reached at all (an unmounted
disk, an endpoint that does not answer) is `unreachable`: it is neither repaired nor
taken for missing. Copies known to be bad (unrepaired, unreachable) take at most half
of a round ahead of their turn, so the healthy ones are never crowded out.

The `audits` table keeps what changed: a result that repeats the copy's last one (the
same copy still unrepaired, for the same reason) is counted in `audit_totals` and
moves `audited_at` on, but adds no row.
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
from .retention import copy_lock
from .store import AuditCopy, Store

log = structlog.get_logger(component="audit")


@dataclass(frozen=True)
class AuditResult:
    job_id: str
    target: str
    result: str  # ok | missing | damaged | repaired | unrepaired | unreachable
    detail: str


class Auditor:
    def __init__(self, store: Store, config: Config, scratch: Path) -> None:
        self.store, self.config, self.scratch = store, config, scratch

    def _driver(self, row: AuditCopy, target: str) -> StorageDriver:
        # The target as configured now; a target since removed, as the job knew it.
        config = self.config if target in self.config.storage else Config.from_snapshot(row.config)
        return open_storage(config, target)

    async def round(
        self, *, job_id: str | None = None, copies: int | None = None, max_bytes: int = 0
    ) -> list[AuditResult]:
        """Audit up to `copies` copies (all when None) within `max_bytes` (0: no limit)."""
        chosen: list[AuditCopy] = []
        total = 0
        for row in await self._candidates(job_id, copies):
            if max_bytes and chosen and total + row.size > max_bytes:
                break
            chosen.append(row)
            total += row.size
        by_job: dict[str, list[AuditCopy]] = defaultdict(list)
        for row in chosen:
            by_job[row.job_id].append(row)
        results = []
        for job, job_rows in by_job.items():
            results += await self._audit_job(job, {r.target for r in job_rows})
        return results

    async def _candidates(self, job_id: str | None, copies: int | None) -> list[AuditCopy]:
        """Half of a round (rounded down) for known-bad copies, as much for the others,
        each oldest-audited first; what is left of it for the oldest-audited of all."""

        async def oldest(known_bad: bool | None, limit: int) -> list[AuditCopy]:
            return await self.store.copies_to_audit(job_id=job_id, known_bad=known_bad, limit=limit)

        if copies is None:
            return await oldest(None, -1)
        half = copies // 2
        chosen = await oldest(True, half) + await oldest(False, half)
        taken = {(r.job_id, r.target) for r in chosen}
        rest = [r for r in await oldest(None, copies) if (r.job_id, r.target) not in taken]
        return chosen + rest[: copies - len(chosen)]

    async def _audit_job(self, job_id: str, targets: set[str]) -> list[AuditResult]:
        copies = {r.target: r for r in await self.store.job_copies(job_id)}
        problems = {t: await self._check(copies[t]) for t in sorted(targets)}
        if any(_is_bad(p) for p in problems.values()):
            # the other copies of this job too: one may be the source of a repair
            for target in sorted(set(copies) - set(problems)):
                problems[target] = await self._check(copies[target])
        good = [t for t, p in problems.items() if p is None]
        unreachable = sorted(t for t, p in problems.items() if p and not _is_bad(p))
        results = []
        for target, problem in problems.items():
            if problem is None:
                outcome = [AuditResult(job_id, target, "ok", "sha256 matches")]
            elif not _is_bad(problem):
                log.warning(
                    "stored copy unreachable; not audited",
                    job_id=job_id,
                    target=target,
                    state="completed",
                    problem=problem,
                )
                outcome = [AuditResult(job_id, target, "unreachable", problem)]
            else:
                log.error(
                    "stored copy failed its audit",
                    job_id=job_id,
                    target=target,
                    state="completed",
                    problem=problem,
                )
                kind = "missing" if problem.startswith("missing") else "damaged"
                finding = AuditResult(job_id, target, kind, problem)
                outcome = [finding, await self._repair(copies, good, target, unreachable)]
            await self._record(copies[target], outcome)
            results += outcome
        return results

    async def _check(self, row: AuditCopy) -> str | None:
        return await self._driver(row, row.target).check(row.key, row.sha256, row.size)

    async def _repair(
        self, copies: dict[str, AuditCopy], sources: list[str], target: str, unreachable: list[str]
    ) -> AuditResult:
        row = copies[target]
        if not sources:
            detail = "no verified copy on any other target"
            if unreachable:
                detail += f" (unreachable: {', '.join(unreachable)})"
            return AuditResult(row.job_id, target, "unrepaired", detail)
        key = row.key
        self.scratch.mkdir(parents=True, exist_ok=True)
        temp = self.scratch / f"repair-{secrets.token_hex(6)}.tar"
        source = sources[0]
        try:
            await self._driver(copies[source], source).fetch(key, temp)
            digest = known_digest(row.sha256)
            lock = copy_lock(row)
            await self._driver(row, target).put([temp], key, digest, row.size, lock)
        except Exception as exc:
            return AuditResult(row.job_id, target, "unrepaired", f"repair failed: {exc}")
        finally:
            with contextlib.suppress(OSError):
                temp.unlink()
        log.warning(
            "stored copy repaired",
            job_id=row.job_id,
            target=target,
            state="completed",
            source=source,
        )
        return AuditResult(
            row.job_id, target, "repaired", f"rewritten from {source}, read back and verified"
        )

    async def _record(self, copy: AuditCopy, outcome: list[AuditResult]) -> None:
        """One copy's results: counted always, kept as rows when they are news; the
        last result (a finding is followed by one) is the copy's verdict."""
        news = not await self._repeats(copy, outcome)
        results = [(r.result, r.detail) for r in outcome]
        await self.store.record_audit(copy.job_id, copy.target, results, news=news)

    async def _repeats(self, copy: AuditCopy, outcome: list[AuditResult]) -> bool:
        """Whether `outcome` says again what the copy's last audit said.

        A repair is always news (the copy went bad again); an unrepaired copy repeats only
        while what is wrong with it stays the same.
        """
        verdict = outcome[-1].result
        if verdict == "repaired" or verdict != copy.audit_result:
            return False
        if len(outcome) == 1:
            return True
        finding = outcome[0]
        last = await self.store.last_audit_finding(finding.job_id, finding.target)
        return last is not None and (last.result, last.detail) == (finding.result, finding.detail)


def _is_bad(problem: str | None) -> bool:
    """A problem with the copy itself (not with reaching its target)."""
    return problem is not None and not problem.startswith("unreachable")
