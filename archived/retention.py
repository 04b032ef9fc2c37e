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

import structlog

from .config import Config
from .drivers import open_storage
from .drivers.base import Lock
from .errors import StorageError, describe
from .states import Event, State
from .store import Row, StaleState, Store, now_iso

log = structlog.get_logger("archived.retention")


def expiry(days: int | None, at: datetime) -> datetime | None:
    """`days` after `at`, to the second: when copies of a job kept that long may go.

    Taken twice: when the job is stored, as its copies' Object Lock date, and when it
    completes, later, as its `expires_at`. So no copy is locked past the day retention
    deletes it.
    """
    return None if days is None else (at + timedelta(days=days)).replace(microsecond=0)


def copy_lock(job: Row) -> Lock:
    """The lock a copy of a stored job is written with (an audit's repair): until the
    job expires, and its legal hold."""
    expires = job["expires_at"]
    return Lock(
        until=datetime.fromisoformat(expires) if expires else None,
        legal_hold=bool(job["legal_hold"]),
    )


async def hold_copies(store: Store, config: Config, job: Row, on: bool) -> list[str]:
    """Put (or lift) the targets' own legal hold on the job's live copies, where they
    have one (S3 Object Lock). What was done, one line each; the first error raises,
    after the other copies had their turn (StorageError naming every one)."""
    snapshot = Config.from_snapshot(job["config"])
    key = f"{job['name']}/{job['archive_name']}"
    said, problems = [], []
    for copy in await store.fetchall("live_copies", job_id=job["id"]):
        target = copy["target"]
        try:
            driver = open_storage(config if target in config.storage else snapshot, target)
            if line := await driver.set_legal_hold(key, on):
                said.append(line)
        except Exception as exc:
            problems.append(describe(exc))
    if problems:
        raise StorageError("; ".join(problems), recoverable=True)
    return said


async def expire_due(store: Store, config: Config) -> list[str]:
    """Delete what is due; the ids of jobs that reached `deleted`."""
    deleted = []
    for job in await store.fetchall("expired_jobs", now=now_iso()):
        if await _expire(store, config, job):
            deleted.append(job["id"])
    return deleted


async def _expire(store: Store, config: Config, job: Row) -> bool:
    job_id = job["id"]
    key = f"{job['name']}/{job['archive_name']}"
    snapshot = Config.from_snapshot(job["config"])
    left = 0
    for copy in await store.fetchall("live_copies", job_id=job_id):
        # placed since the round began, or while it waited on another target?
        if _held(await store.fetchall("legal_hold", id=job_id)):
            return _stopped(job_id)
        target = copy["target"]
        try:
            driver = open_storage(config if target in config.storage else snapshot, target)
            existed = await driver.delete(key)
        except Exception as exc:
            left += 1
            log.error(
                "retention: cannot delete a copy yet; will retry",
                job_id=job_id,
                state="completed",
                target=target,
                error=describe(exc),
            )
            continue
        async with store.transaction() as tx:
            await tx.run("mark_copy_deleted", job_id=job_id, target=target, now=now_iso())
            await tx.run(
                "insert_event",
                job_id=job_id,
                now=now_iso(),
                kind="retention",
                detail=f'{{"target": "{target}", "deleted": {str(existed).lower()}}}',
            )
        log.info(
            "retention: copy deleted",
            job_id=job_id,
            state="completed",
            target=target,
            path=copy["path"],
            was_there=existed,
        )
    if left:
        return False
    try:
        async with store.transaction() as tx:
            if _held(await tx.all("legal_hold", id=job_id)):
                return _stopped(job_id)
            await tx.transition(
                job_id,
                State.COMPLETED,
                Event.EXPIRED,
                f"retention of {job['expires_at']} passed; every copy deleted",
            )
    except StaleState:
        return False
    return True


def _held(rows: list[Row]) -> bool:
    return bool(rows and rows[0]["legal_hold"])


def _stopped(job_id: str) -> bool:
    log.warning("retention: stopped by a legal hold", job_id=job_id, state="completed")
    return False
