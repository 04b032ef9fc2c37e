"""The queue as a daemon and an operator see it: a job queued, the next one claimed
(triggered, its retry due, resumed, or taken over from a daemon whose lease lapsed), the
jobs to resume at start, cancel requests; an operator's cancel, requeue and hold.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from .states import PROCESSING, RETRY_EVENT, STOPPABLE, WAITING, Event, State, next_state
from .store import Claim, Job, NewJob, ScheduleRun, iso, utcnow
from .store_sqlbase import PROCESSING_STATES, SqlBase, Tx

# What `archived retry` resets: always, and when nothing of the failed run is kept.
REQUEUE_RESETS: dict[str, Any] = dict.fromkeys(("phase", "error", "retry_at", "started_at")) | {
    "attempts": 0,
    "cancel_requested": False,
    "cleanup_attempts": 0,
}
FROM_SCRATCH: dict[str, Any] = dict.fromkeys(
    ("step", "archive_name", "archive_sha256", "archive_size", "payload_files", "payload_bytes")
)
# What a taken-over job that starts again at activity_archiving forgets of the dead attempt.
RESTART_RESETS: dict[str, Any] = FROM_SCRATCH | {
    "retry_at": None,
    "error": None,
    "cleanup_attempts": 0,
    "phase": State.ACTIVITY_ARCHIVING.value,
}
_STOPPABLE = sorted(STOPPABLE)
_WAITING = sorted(WAITING)


class _SlotTaken(Exception):
    """Another daemon acted on this schedule slot first: roll the job back."""


class QueueOps(SqlBase):
    """Jobs into the queue, and out of it to a daemon."""

    # -- jobs in -----------------------------------------------------------------------

    async def insert_job(
        self, job: NewJob, *, reason: str, schedule_run: ScheduleRun | None = None
    ) -> bool:
        now = utcnow()
        try:
            async with self.db.transaction() as tx:
                await tx.run(
                    "insert_job",
                    id=job.id,
                    name=job.name,
                    spec=job.spec,
                    spec_sha256=job.spec_sha256,
                    config=job.config,
                    config_digest=job.config_digest,
                    not_before=job.not_before,
                    now=now,
                )
                await self._history(tx, job.id, State.UNINITIALIZED, reason, now)
                for kind, task in job.tasks:
                    await tx.run("insert_task", job_id=job.id, kind=kind, name=task, now=now)
                if schedule_run is not None and not await self._schedule_run(tx, schedule_run):
                    raise _SlotTaken
                ready = "ready"
                if job.not_before is not None:
                    ready += f"; not before {iso(job.not_before)}"
                await self._transition(tx, job.id, State.UNINITIALIZED, Event.INITIALIZED, ready)
                await self._announce(tx, "job")
        except _SlotTaken:
            return False
        return True

    # -- the queue, as a daemon sees it ------------------------------------------------

    async def claim_next(
        self, config: str, config_digest: str, *, busy: Collection[str] = ()
    ) -> Claim | None:
        async with self.db.transaction() as tx:
            rows = await tx.all(
                "next_job",
                now=utcnow(),
                me=self.host_id,
                busy=sorted(busy),
                processing=PROCESSING_STATES,
                waiting=_WAITING,
            )
            if not rows:
                return None
            job = Job.from_row(rows[0])
            if job.state == State.QUEUED:
                how, previous = "triggered", None
                await self._transition(
                    tx,
                    job.id,
                    job.state,
                    Event.TRIGGERED,
                    f"triggered by the poll loop; config {config_digest}",
                    config=config,
                    config_digest=config_digest,
                    started_at=job.started_at or utcnow(),
                    # its first phase's attempt, counted in this commit (see runner.py)
                    **job.attempt_fields(State.ACTIVITY_ARCHIVING),
                )
            elif job.owner in (None, self.host_id) or not self.shared:
                how, previous = (
                    ("retry" if job.state == State.RECOVERABLE_ERROR else "resumed"),
                    None,
                )
                if job.state == State.RECOVERABLE_ERROR:
                    phase = State(job.phase or State.ACTIVITY_ARCHIVING)
                    await self._transition(
                        tx,
                        job.id,
                        job.state,
                        RETRY_EVENT[phase],
                        f"backoff over: re-entering {phase}",
                        retry_at=None,
                        error=None,
                    )
            else:
                how, previous = "taken_over", job.owner
                await self._take_over(tx, job)
            await self._hold(tx, job.id)
            rows = await tx.rows_later("get_job", id=job.id)
        return Claim(Job.from_row(rows[0]), how, previous)

    async def _take_over(self, tx: Tx, job: Job) -> None:
        """The job of a daemon whose lease lapsed. Its staging was on that host: the
        phases start again at activity_archiving (its attempt counts), and what the
        dead attempt stored is recorded as orphans, to be removed from the targets."""
        reason = f"taken over from {job.owner}"
        fields: dict[str, Any] = {}
        if next_state(job.state, Event.TAKEN_OVER) == State.ACTIVITY_ARCHIVING:
            if job.archive_name:
                tasks = await tx.all("tasks", job_id=job.id)
                targets = {t["name"] for t in tasks if t["kind"] == "storage"}
                targets |= {c["target"] for c in await tx.all("copies", job_id=job.id, live=True)}
                for target in sorted(targets):
                    await self._orphan(
                        tx, job.id, target, job.key, f"left by {job.owner}, whose lease lapsed"
                    )
            await tx.run("delete_copies", job_id=job.id)
            await tx.run("reset_tasks", job_id=job.id, now=utcnow())
            again = job.phase == State.ACTIVITY_ARCHIVING
            fields |= RESTART_RESETS | {
                "attempts": job.attempts if again else 1,
                "started_at": utcnow(),
            }
            reason += "; its staging was there: starting again at activity_archiving"
        await self._transition(tx, job.id, job.state, Event.TAKEN_OVER, reason, **fields)

    async def resumable(self) -> list[Job]:
        sent = time.monotonic()
        async with self.db.transaction() as tx:
            rows = await tx.all(
                "resume_mine",
                me=self.host_id,
                now=utcnow(),
                states=sorted(PROCESSING - {State.RECOVERABLE_ERROR}),
                lease=self.lease,
            )
        self._leases_renewed({r["id"] for r in rows}, sent)
        return [Job.from_row(r) for r in rows]

    async def cancel_requests(self) -> list[Job]:
        rows = await self.db.fetch("cancel_requests", states=_STOPPABLE, me=self.host_id)
        return [Job.from_row(r) for r in rows]

    async def cancel_waiting(self, job: Job) -> Job:
        async with self.db.transaction() as tx:
            await self._transition(
                tx,
                job.id,
                job.state,
                Event.CANCELED,
                "canceled",
                error=f"canceled while {job.state}",
            )
            await self._hold(tx, job.id)
            return Job.from_row((await tx.all("get_job", id=job.id))[0])

    # -- operators ---------------------------------------------------------------------

    async def request_cancel(self, job_id: str) -> None:
        async with self.db.transaction() as tx:
            await tx.run("request_cancel", id=job_id, now=utcnow())
            await self._announce(tx, "cancel")

    async def requeue(self, job: Job, reason: str, *, keep_copies: bool) -> None:
        fields = dict(REQUEUE_RESETS)
        async with self.db.transaction() as tx:
            if keep_copies:  # its archive is safe on those targets: store it on the others
                await tx.run("reset_storage_tasks_without_copy", job_id=job.id, now=utcnow())
                await tx.run("drop_orphans_of_key", job_id=job.id, key=job.key)
            else:
                await tx.run("reset_tasks", job_id=job.id, now=utcnow())
                fields |= FROM_SCRATCH
            await self._transition(tx, job.id, State.FAILED, Event.REQUEUED, reason, **fields)
            await self._announce(tx, "job")

    async def set_hold(self, job_id: str, hold: bool) -> None:
        async with self.db.transaction() as tx:
            await tx.run("set_hold", id=job_id, hold=hold)
            await self._event(tx, job_id, "legal_hold", {"hold": hold})
