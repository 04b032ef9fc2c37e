"""Orphans: what a failed job's cleanup could not remove from a target yet.

Cleanup must end (every job reaches a final state), but a copy or a partial file on an
unmounted disk cannot be removed until the disk is back. Cleanup records it here; the
daemon's retention round calls `remove_orphans()`, which removes it through the storage
driver once the target answers, and marks it removed. Orphans of a job that runs again
(an operator's `retry`, or a takeover from a daemon that died: what its attempt stored is
recorded here) are removed by that job's own cleanup, and by the round once it is final.
"""

from __future__ import annotations

import structlog

from .config import Config
from .drivers import open_storage
from .errors import describe
from .store import Store

log = structlog.get_logger(component="orphans")


async def remove_orphans(store: Store, config: Config, *, job_id: str | None = None) -> int:
    """Remove every orphan of final jobs (or of `job_id`, whatever its state) whose
    target answers now; how many were removed."""
    removed = 0
    for orphan in await store.orphans_due(job_id):
        target, key = orphan.target, orphan.key
        job = await store.job(orphan.job_id)
        assert job is not None
        live = {c.target for c in await store.copies(orphan.job_id, live=True)}
        if target in live and key == job.key:
            existed = False  # stored there again since (a retry): that copy is no orphan
        else:
            try:
                snapshot = (
                    config if target in config.storage else Config.from_snapshot(orphan.config)
                )
                existed = await open_storage(snapshot, target).delete(key)
            except Exception as exc:
                log.warning(
                    "orphan not removed yet; will retry",
                    job_id=orphan.job_id,
                    state=orphan.state,
                    target=target,
                    key=key,
                    error=describe(exc),
                )
                continue
        await store.orphan_removed(orphan, existed=existed)
        log.info(
            "orphan removed",
            job_id=orphan.job_id,
            state=orphan.state,
            target=target,
            key=key,
            was_there=existed,
        )
        removed += 1
    return removed
