"""Orphans: what a failed job's cleanup could not remove from a target yet.

Cleanup must end (every job reaches a final state), but a copy or a partial file on an
unmounted disk cannot be removed until the disk is back. Cleanup records it here; the
daemon's retention round calls `remove_orphans()`, which removes it through the storage
driver once the target answers, and marks it removed. Orphans of a job that runs again
(an operator's `retry`) wait until it is final again: the new run cleans up after itself.
"""

from __future__ import annotations

import json

import structlog

from .config import Config
from .drivers import open_storage
from .errors import describe
from .store import Store, Tx, now_iso

log = structlog.get_logger("archived.orphans")


async def record(tx: Tx, job_id: str, target: str, key: str, reason: str) -> None:
    await tx.run(
        "upsert_orphan", job_id=job_id, target=target, key=key, reason=reason, now=now_iso()
    )


async def remove_orphans(store: Store, config: Config) -> int:
    """Remove every orphan whose target answers now; how many were removed."""
    removed = 0
    for orphan in await store.fetchall("orphans_due"):
        job_id, target, key = orphan["job_id"], orphan["target"], orphan["key"]
        live = {c["target"] for c in await store.fetchall("live_copies", job_id=job_id)}
        job = await store.job(job_id)
        assert job is not None
        if target in live and key == f"{job['name']}/{job['archive_name']}":
            existed = False  # stored there again since (a retry): that copy is no orphan
        else:
            try:
                snapshot = (
                    config if target in config.storage else Config.from_snapshot(orphan["config"])
                )
                existed = await open_storage(snapshot, target).delete(key)
            except Exception as exc:
                log.warning(
                    "orphan not removed yet; will retry",
                    job_id=job_id,
                    state=orphan["state"],
                    target=target,
                    key=key,
                    error=describe(exc),
                )
                continue
        async with store.transaction() as tx:
            await tx.run(
                "mark_orphan_removed", job_id=job_id, target=target, key=key, now=now_iso()
            )
            await tx.run(
                "insert_event",
                job_id=job_id,
                now=now_iso(),
                kind="orphan_removed",
                detail=json.dumps({"target": target, "key": key, "was_there": existed}),
            )
        log.info(
            "orphan removed",
            job_id=job_id,
            state=orphan["state"],
            target=target,
            key=key,
            was_there=existed,
        )
        removed += 1
    return removed
