"""The `store` phase: the sealed archive's copy on every target.

One storage task per target, run concurrently (bounded by the daemon's storage slots),
while the archive's sha256 is computed from staging once; each copy is checked against
it. An operator's retry of a job whose verified copies survive its failure fetches the
archive back from one of them instead of archiving the sources again.
"""

from __future__ import annotations

from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import structlog

from . import bag, failpoints
from .drivers.base import Digest, Lock
from .errors import IntegrityError, StorageError, describe
from .fileio import file_sha256
from .phase import JobContext, Outcome
from .retention import expiry, hold_copies
from .states import Event, State
from .store import Copy, NewCopy, lease_lost

log = structlog.get_logger(component="copies")


class StorePhase:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    async def run(self) -> Outcome:
        """Every target's copy, while the archive's sha256 is computed from staging.

        The copies are checked against that digest only once written, so hashing the
        staged archive overlaps with writing them to disk (S3 waits for it up front).
        """
        ctx = self.ctx
        staging = ctx.staging
        await ctx.begin_attempt(State.STORE)
        await failpoints.reach("store")
        kept = [] if staging.head.exists() else await ctx.store.copies(ctx.id, live=True)
        if kept:
            # an operator's retry of a job that failed with verified copies: the
            # archive comes from one of them, not from sources archived again
            parts = [await self._restore_archive(kept)]
        else:
            parts = staging.archive_parts()
            await ctx.reverify_after_restart(await ctx.activity_results())
            # the head was fsynced when sealed; `END`, shared, is made again if it is
            # gone (an operator's clean-up of staging) or damaged
            await anyio.to_thread.run_sync(staging.ensure_end)
        digest: Digest = Future()
        # locked (where a target can) until the job's retention passes, never later
        lock = Lock(
            until=expiry(ctx.spec.retention_days, datetime.now(UTC)),
            legal_hold=ctx.job.legal_hold,
        )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._hash_archive, parts, digest)
                await ctx.run_tasks(
                    "storage",
                    ctx.svc.storage_slots,
                    lambda target: self._store_one(target, parts, digest, lock),
                    lambda stored: NewCopy(**stored),
                )
        except Exception as exc:
            # the copies stored before a target failed are kept: held too, if a hold
            # came meanwhile (the retry's lock has it, and would not see the change)
            if not lease_lost(exc):
                try:
                    await self._hold_if_changed_meanwhile(lock)
                except Exception as problem:  # the failure is what the job reports
                    log.warning("cannot hold the copies made", error=describe(problem))
            raise
        await self._hold_if_changed_meanwhile(lock)
        return Outcome(
            Event.DONE,
            f"stored on {', '.join(ctx.spec.targets(ctx.config))}"
            ", every copy read back and verified",
            {"archive_sha256": digest.result()},
        )

    async def _restore_archive(self, kept: list[Copy]) -> Path:
        """The archive in staging again, fetched from a verified copy and checked
        against its digest; the next copy if one does not read back as recorded."""
        ctx = self.ctx
        archive = ctx.staging.restored
        archive.unlink(missing_ok=True)
        await anyio.to_thread.run_sync(ctx.staging.require_space, ctx.job.archive_size or 0)
        problems = []
        for copy in kept:
            try:
                await ctx.storage(copy.target).fetch(ctx.key(), archive)
                got = await anyio.to_thread.run_sync(
                    file_sha256, archive, limiter=ctx.svc.hash_threads
                )
            except Exception as exc:
                problems.append(f"{copy.target}: {describe(exc)}")
                continue
            if got == (copy.sha256, copy.size):
                log.info("archive fetched from a kept copy", target=copy.target)
                return archive
            problems.append(f"{copy.target}: sha256 {got[0]} ({got[1]} bytes)")
        raise StorageError(
            "no kept copy reads back as recorded: " + "; ".join(problems), recoverable=True
        )

    async def _hash_archive(self, parts: list[Path], digest: Digest) -> None:
        """Resolve `digest`, whatever happens: storage threads may be waiting for it.

        An error goes into `digest`, so each storage task fails with it (and is
        recorded so) rather than being cancelled under its feet.
        """
        ctx = self.ctx
        try:
            packed = await anyio.to_thread.run_sync(
                bag.digest,
                parts,
                anyio.from_thread.check_cancelled,
                limiter=ctx.svc.hash_threads,
            )
        except Exception as exc:
            digest.set_exception(exc)
            return
        except BaseException:
            digest.set_exception(StorageError("cancelled", recoverable=True))
            raise
        if packed.size != ctx.job.archive_size:
            digest.set_exception(
                IntegrityError(
                    f"the staged archive has {packed.size} bytes, "
                    f"{ctx.job.archive_size} when it was sealed"
                )
            )
            return
        digest.set_result(packed.sha256)
        log.info("archive hashed", size=packed.size, sha256=packed.sha256)

    async def _hold_if_changed_meanwhile(self, lock: Lock) -> None:
        """A legal hold placed (or released) while the copies were written: `archived
        hold` sets the copies recorded when it ran, this the ones recorded since. Each
        reads what the other committed first, so no copy slips through."""
        ctx = self.ctx
        # as read in the commit of the copies, if run_tasks made it: the same order
        job = ctx.after_ends or await ctx.store.job(ctx.id)
        ctx.after_ends = None
        if job is not None and job.legal_hold != lock.legal_hold:
            await hold_copies(ctx.store, ctx.config, job, job.legal_hold)

    async def _store_one(
        self, target: str, parts: list[Path], digest: Digest, lock: Lock
    ) -> dict[str, Any]:
        ctx = self.ctx
        driver = ctx.storage(target)
        ctx.store.check_lease(ctx.id)  # a daemon that lost the job writes nothing
        copy = await driver.put(parts, ctx.key(), digest, ctx.job.archive_size or 0, lock)
        log.info("stored", target=target, path=copy.path)
        return {"path": copy.path, "size": copy.size, "sha256": copy.sha256}
