"""The end of every job: the failure hook (`error_handling`), then `cleanup`.

Cleanup removes staging and, for a failed job, what it left on the targets. It is never
fatal and never stuck: an error is retried with backoff in its state; on the last
attempt, or for an error no retry fixes, it gives up on what is left, records it
(orphans on targets are removed later, see orphans.py), and the job reaches its final
state all the same.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import anyio
import structlog

from . import children, failpoints, orphans
from .errors import Kind, classify, describe
from .phase import JobContext, Outcome
from .retention import expiry
from .states import Event, State
from .store import utcnow

log = structlog.get_logger(component="cleanup")


async def error_handling(ctx: JobContext) -> Outcome:
    """Run hooks.on_failure once, bounded; a failing hook is logged, never retried."""
    argv = ctx.config.hooks.on_failure
    if not argv:
        return Outcome(Event.HANDLED, "no failure hook configured")
    env = {
        **os.environ,
        "ARCHIVED_JOB_ID": ctx.id,
        "ARCHIVED_JOB_NAME": ctx.spec.name,
        "ARCHIVED_FAILED_STATE": ctx.job.phase or "queued",
        "ARCHIVED_REASON": ctx.job.error or "",
    }
    try:
        code, stderr = await anyio.to_thread.run_sync(
            functools.partial(
                children.run,
                argv,
                env=env,
                timeout=ctx.config.hooks.timeout,
                check=anyio.from_thread.check_cancelled,  # shutdown stops it at once
            )
        )
        result = "timed out" if code is None else f"exit {code}"
        if code is not None and stderr.strip():
            result += f": {stderr.strip()[-500:]}"
    except OSError as exc:
        result = f"could not run: {describe(exc)}"
    level = log.info if result.startswith("exit 0") else log.error
    level("failure hook ran", hook=argv[0], result=result)
    await ctx.event("failure_hook", hook=argv, result=result)
    return Outcome(Event.HANDLED, f"failure hook {argv[0]}: {result}")


async def cleanup(ctx: JobContext) -> Outcome:
    """Remove staging (and, for a failed job, what it left on the targets).

    A job whose copies were stored stays `completed`.
    """
    # counted before anything, as phases are; by the transition into cleanup, if it could
    if ctx.counted == State.CLEANUP:
        attempt = ctx.job.cleanup_attempts
    else:
        attempt = ctx.job.cleanup_attempts + 1
        await ctx.store.update_job(ctx.id, cleanup_attempts=attempt)
        ctx.job = ctx.job.replace(cleanup_attempts=attempt)
    ctx.counted = None
    last = ctx.retry.last(attempt)
    failed = bool(ctx.job.error)
    # what an earlier attempt left on the targets (one taken over from a dead daemon)
    ctx.store.check_lease(ctx.id)
    await orphans.remove_orphans(ctx.store, ctx.config, job_id=ctx.id)
    try:
        await failpoints.reach("cleanup")
        if failed:
            await _remove_failed_copies(ctx, last)
        await anyio.to_thread.run_sync(ctx.staging.remove)
    except Exception as exc:
        if not last and classify(exc) == Kind.RECOVERABLE:
            delay, retry_at = ctx.backoff(attempt)
            return Outcome(
                Event.CLEANUP_FAILED,
                f"cleanup: {describe(exc)}; attempt {attempt + 1} of "
                f"{ctx.retry.max_attempts} in {delay:.1f}s",
                {"retry_at": retry_at},
            )
        log.error("cleanup gave up", error=describe(exc), attempt=attempt)
        await ctx.event("cleanup_gave_up", error=describe(exc), attempt=attempt)
    done: dict[str, Any] = {"retry_at": None, "cleanup_attempts": 0}
    if failed:
        kept = [c.target for c in await ctx.store.copies(ctx.id, live=True)]
        reason = "staging and partial copies removed"
        if kept:
            reason += f"; verified copies kept on {', '.join(sorted(kept))}"
        return Outcome(Event.CLEANED_AFTER_FAILURE, reason, done)
    if expires := expiry(ctx.spec.retention_days, utcnow()):
        done["expires_at"] = expires
    return Outcome(Event.CLEANED, "staging removed; every target holds a verified copy", done)


async def _remove_failed_copies(ctx: JobContext, last: bool) -> None:
    """What a failed job leaves on its targets: partial files always; verified copies
    only when the operator canceled it (a copy is never thrown away because another
    target failed). What cannot be removed now raises, to be retried, or on the
    `last` attempt (or when no retry would help) is recorded as an orphan."""
    if not ctx.job.archive_name:
        return  # never sealed, so never stored
    key = ctx.key()
    copies = {c.target for c in await ctx.store.copies(ctx.id, live=True)}
    keep = copies if not ctx.job.cancel_requested else set()
    problems: list[tuple[str, Exception]] = []
    for target in sorted(set(ctx.spec.targets(ctx.config)) | copies):
        if target in keep:
            continue
        ctx.store.check_lease(ctx.id)
        try:
            removed = await ctx.storage(target).delete(key)
        except Exception as exc:
            problems.append((target, exc))
            continue
        await ctx.store.forget_copy(ctx.id, target)
        if removed:
            log.info("removed the copy of a failed job", target=target, key=key)
            await ctx.event("copy_removed", target=target, key=key)
    retry = [error for _, error in problems if classify(error) == Kind.RECOVERABLE]
    if retry and not last:
        raise retry[0]
    for target, error in problems:
        reason = describe(error)
        log.error("cannot remove from a target yet: orphan", target=target, key=key)
        await ctx.store.record_orphan(ctx.id, target, key, reason)
