"""Retention: delete the stored copies of completed jobs whose retention has passed.

Each copy is deleted through its storage driver and marked deleted only once the
driver said so; the job moves to `deleted` only when no copy is left. A target that
cannot be reached keeps its copy, the failure is logged, and the next round tries
again, so deletion is idempotent and survives a crash at any point. A legal hold
(`archived hold`) stops all of it until `archived release`, also a round already under
way: the hold is read again right before each copy is deleted, and in the transaction
that would move the job to `deleted`. (A delete the storage driver is already carrying
out when the hold comes in still completes, and is recorded.)
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol

import structlog

from .config import Config
from .drivers import open_storage
from .drivers.base import Lock
from .errors import StorageError, describe
from .moments import iso
from .store import Job, StaleState, Store

log = structlog.get_logger(component="retention")


def expiry(days: int | None, at: datetime) -> datetime | None:
    """`days` after `at`, to the second: when copies of a job kept that long may go.

    Taken twice: when the job is stored, as its copies' Object Lock date, and when it
    completes, later, as its `expires_at`. So no copy is locked past the day retention
    deletes it.
    """
    return None if days is None else (at + timedelta(days=days)).replace(microsecond=0)


class Locked(Protocol):
    """A job, or a copy with its job's: what a copy's lock comes from."""

    @property
    def expires_at(self) -> datetime | None: ...
    @property
    def legal_hold(self) -> bool: ...


def copy_lock(job: Locked) -> Lock:
    """The lock a copy of a stored job is written with (an audit's repair): until the
    job expires, and its legal hold."""
    return Lock(until=job.expires_at, legal_hold=job.legal_hold)


async def hold_copies(store: Store, config: Config, job: Job, on: bool) -> list[str]:
    """Put (or lift) the targets' own legal hold on the job's live copies, where they
    have one (S3 Object Lock). What was done, one line each; the first error raises,
    after the other copies had their turn (StorageError naming every one)."""
    snapshot = Config.from_snapshot(job.config)
    said, problems = [], []
    for copy in await store.copies(job.id, live=True):
        target = copy.target
        try:
            driver = open_storage(config if target in config.storage else snapshot, target)
            if line := await driver.set_legal_hold(job.key, on):
                said.append(line)
        except Exception as exc:
            problems.append(describe(exc))
    if problems:
        raise StorageError("; ".join(problems), recoverable=True)
    return said


async def expire_due(store: Store, config: Config) -> list[str]:
    """Delete what is due; the ids of jobs that reached `deleted`."""
    deleted = []
    for job in await store.expired_jobs():
        if await _expire(store, config, job):
            deleted.append(job.id)
    return deleted


async def _expire(store: Store, config: Config, job: Job) -> bool:
    snapshot = Config.from_snapshot(job.config)
    left = 0
    for copy in await store.copies(job.id, live=True):
        # placed since the round began, or while it waited on another target?
        if await store.legal_hold(job.id):
            return _stopped(job.id)
        target = copy.target
        try:
            driver = open_storage(config if target in config.storage else snapshot, target)
            existed = await driver.delete(job.key)
        except Exception as exc:
            left += 1
            log.error(
                "retention: cannot delete a copy yet; will retry",
                job_id=job.id,
                state="completed",
                target=target,
                error=describe(exc),
            )
            continue
        await store.copy_deleted(job.id, target, existed=existed)
        log.info(
            "retention: copy deleted",
            job_id=job.id,
            state="completed",
            target=target,
            path=copy.path,
            was_there=existed,
        )
    if left:
        return False
    expires = iso(job.expires_at) if job.expires_at else "?"
    try:
        if not await store.expire(job, f"retention of {expires} passed; every copy deleted"):
            return _stopped(job.id)
    except StaleState:
        return False
    return True


def _stopped(job_id: str) -> bool:
    log.warning("retention: stopped by a legal hold", job_id=job_id, state="completed")
    return False
