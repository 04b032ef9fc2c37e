"""What an operator does to a job: retry, cancel, hold, release, and read its details.

Each action is a function over an open queue store (None when there is no queue yet):
it checks that the job can take the action, acts, and returns what happened for the
command line to print. A job that is not there, or not in a state the action applies
to, is `Refused`, with the reason. No argument parsing and no printing here: that is
cli.py's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from . import progress
from .config import Config
from .errors import ArchivedError
from .retention import hold_copies
from .states import FINAL, STOPPABLE, State
from .store import Job, Orphan, Store


class Refused(Exception):
    """The action does not apply: no such job, or not in a state it applies to."""


async def require_job(store: Store | None, job_id: str) -> Job:
    job = await store.job(job_id) if store else None
    if job is None:
        raise Refused(f"no job {job_id!r}")
    return job


async def cancel(store: Store | None, job_id: str) -> State:
    """Ask the daemon running (or about to run) the job to stop it: it fails with reason
    'canceled' at its next safe point. The state it was in."""
    job = await require_job(store, job_id)
    if job.state not in STOPPABLE:
        raise Refused(f"job {job_id} is {job.state}: nothing to cancel")
    assert store is not None
    await store.request_cancel(job_id)
    return job.state


@dataclass(frozen=True)
class Requeued:
    phase: str  # where it had failed
    kept: list[str]  # targets that keep its archive: it is stored again, not made again


async def retry(store: Store | None, job_id: str) -> Requeued:
    """Queue a failed job again."""
    job = await require_job(store, job_id)
    if job.state != State.FAILED:
        raise Refused(f"job {job_id} is {job.state}: only failed jobs are retried")
    assert store is not None
    phase = job.phase or "queued"
    kept = sorted(c.target for c in await store.copies(job_id, live=True))
    if kept:
        how = (
            f"stores its archive, kept on {', '.join(kept)}, on the targets that "
            "miss it; nothing is archived again"
        )
    else:
        how = "staging was removed when it failed, so it runs again from activity_archiving"
    reason = f"requeued by operator (had failed in {phase}); {how}"
    await store.requeue(job, reason, keep_copies=bool(kept))
    return Requeued(phase, kept)


@dataclass(frozen=True)
class Held:
    said: list[str]  # what the targets that keep their own holds did
    problem: str  # a target that could not be told ("" when all were)


async def hold(store: Store | None, config: Config, job_id: str, on: bool) -> Held:
    """Put a legal hold on a job (`on`), or release it: in the database first
    (retention obeys it), then on the copies of targets that keep their own (S3 Object
    Lock legal holds)."""
    job = await require_job(store, job_id)
    if job.state == State.DELETED:
        raise Refused(f"job {job_id} is deleted: its copies are gone")
    assert store is not None
    await store.set_hold(job_id, on)
    try:
        return Held(await hold_copies(store, config, job, on), "")
    except ArchivedError as exc:
        return Held([], str(exc))


async def job_details(store: Store | None, job_id: str) -> dict[str, Any] | None:
    """Everything known of one job, as `show --json` prints it; None if there is none."""
    job = await store.job(job_id) if store else None
    if job is None:
        return None
    assert store is not None
    row = job.to_json()
    tasks = [t.to_json() for t in await store.tasks(job_id)]
    return {
        **{k: row[k] for k in ("id", "name", "state", "created_at", "updated_at", "error")},
        **{k: row[k] for k in ("not_before", "expires_at", "legal_hold", "phase", "attempts")},
        "retry_at": row["retry_at"] if job.waiting else None,
        "owner": job.owner,
        "archive": (
            {"name": job.archive_name, "sha256": job.archive_sha256, "size": job.archive_size}
            if job.archive_name
            else None
        ),
        "history": [h.to_json() for h in await store.history(job_id)],
        "tasks": [t | {"progress": _report(t)} for t in tasks],
        "progress": (
            None if job.state in FINAL else asdict(progress.figures(row, tasks, datetime.now(UTC)))
        ),
        "copies": [c.to_json() for c in await store.copies(job_id)],
        "orphans": [_orphan_json(o) for o in await store.orphans(job_id)],
        "audits": [a.to_json() for a in await store.audits(job_id)],
        "events": [e.to_json() for e in await store.events(job_id)],
    }


def _report(task: dict[str, Any]) -> dict[str, Any] | None:
    """What a running task last said of its progress."""
    report = progress.Report.loads(task["progress"]) if task["state"] == "executing" else None
    return asdict(report) if report else None


def _orphan_json(orphan: Orphan) -> dict[str, Any]:
    keys = ("target", "key", "reason", "recorded_at", "removed_at")
    return {k: v for k, v in orphan.to_json().items() if k in keys}
