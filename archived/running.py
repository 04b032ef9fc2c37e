"""The jobs this daemon runs now: one task and one `JobRunner` each.

`RunningJobs` starts a runner for each job claimed (or resumed, or cancelled while it
waited), up to `max_concurrent_jobs`; acts on `archived cancel`; restarts, after a
backoff, a runner the queue's disk stopped (`stalled`); renews the leases of its jobs
when several daemons share the queue; and at shutdown lets running steps finish within
`shutdown_grace`, then cancels them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import structlog
from anyio.abc import TaskGroup

from .config import Config
from .errors import Kind, classify, describe
from .intake import Pinned
from .phase import Services
from .runner import JobRunner
from .states import PROCESSING, STOPPABLE, State
from .store import Claim, Job, LeaseLost, StaleState

log = structlog.get_logger(component="running")


class RunningJobs:
    def __init__(
        self,
        svc: Services,
        tg: TaskGroup,
        pinned: Callable[[], Pinned],
        wake: Callable[[], None],
        lost: Callable[[str], Awaitable[None]],
    ) -> None:
        self.svc, self.tg = svc, tg
        self.pinned = pinned  # the config in force: it changes on reload
        self.wake = wake  # the poll loop: a slot is free
        self.lost = lost  # what to do with a job another daemon took over
        self.runners: dict[str, JobRunner] = {}
        self.whole_job: dict[str, anyio.CancelScope] = {}  # what shutdown cancels at the end
        # jobs whose runner stopped on an error of the queue that may pass (its disk full):
        # run again from what the queue says once it answers, as a restart would
        # (when to try, the delay after that), doubling up to retry.backoff_max
        self.stalled: dict[str, tuple[float, float]] = {}
        # what a previous run left in flight and waits for a free slot, first in line
        self.resuming: list[str] = []

    def __len__(self) -> int:
        return len(self.runners)

    def config(self) -> Config:
        return self.pinned().config

    @property
    def free(self) -> int:
        """Slots free under max_concurrent_jobs."""
        return self.config().daemon.max_concurrent_jobs - len(self.runners)

    def resume(self, jobs: list[Job]) -> None:
        """What a previous run left in flight: as many as max_concurrent_jobs allows start
        now; the others wait for a free slot, before any job is claimed."""
        for job in jobs:
            if self.free > 0:
                self.start(job)
            else:
                self.resuming.append(job.id)
        if self.resuming:
            log.info("jobs wait for a free slot to resume", jobs=len(self.resuming))

    async def claim(self) -> None:
        """Resume what waits to, then claim queued and due jobs, while slots are free."""
        store = self.svc.store
        while self.resuming and self.free > 0:
            job = await store.job(self.resuming[0])
            del self.resuming[0]
            if job is not None and self._ours_in_flight(job):
                self.start(job)
        while self.free > 0:
            pinned = self.pinned()
            busy = {*self.runners, *self.resuming}
            claim = await store.claim_next(pinned.snapshot, pinned.digest, busy=busy)
            if claim is None:
                return
            self._claimed(claim)
            counted = State.ACTIVITY_ARCHIVING if claim.how == "triggered" else None
            self.start(claim.job, counted)

    def _ours_in_flight(self, job: Job) -> bool:
        """In a processing state, not waiting to retry (the claim takes it when due), not
        taken over meanwhile by another daemon, and not running here."""
        store = self.svc.store
        return (
            job.state in PROCESSING
            and job.state != State.RECOVERABLE_ERROR
            and not (store.shared and job.owner != store.host_id)
            and job.id not in self.runners
        )

    def _claimed(self, claim: Claim) -> None:
        job = claim.job
        if claim.how == "taken_over":
            log.warning(
                "job taken over: its daemon's lease lapsed",
                job_id=job.id,
                state=job.state.value,
                previous_owner=claim.previous_owner,
            )
        if claim.how != "resumed":
            self.svc.metrics.transition(job.state)

    def start(self, job: Job, counted: State | None = None) -> None:
        job_id = job.id
        runner = JobRunner(self.svc, job, counted)
        self.runners[job_id] = runner
        whole = self.whole_job[job_id] = runner.whole = anyio.CancelScope()

        async def run() -> None:
            try:
                with whole:
                    await runner.run()
            except Exception as exc:
                if classify(exc) == Kind.RECOVERABLE:
                    retry = self.config().retry
                    delay = self.stalled.get(job_id, (0.0, retry.backoff))[1]
                    self.stalled[job_id] = (
                        anyio.current_time() + delay,
                        min(delay * 2, retry.backoff_max),
                    )
                    log.warning(
                        "job stopped: the queue cannot be written; it resumes when it can",
                        job_id=job_id,
                        state=runner.state.value,
                        error=describe(exc),
                    )
                else:
                    self.stalled.pop(job_id, None)
                    log.exception(
                        "job runner crashed; the job resumes at the next start",
                        job_id=job_id,
                        state=runner.state.value,
                    )
            else:
                self.stalled.pop(job_id, None)
            finally:
                self.runners.pop(job_id, None)
                self.whole_job.pop(job_id, None)
                self.wake()
            if runner.lost:  # our staging of it is of no use to the daemon that has it now
                await self.lost(job_id)

        self.tg.start_soon(run)

    async def restart_stalled(self) -> None:
        store = self.svc.store
        for job_id, (due, delay) in sorted(self.stalled.items()):
            if self.free <= 0:
                return
            if due > anyio.current_time():
                continue
            job = await store.job(job_id)
            if job is None or not self._ours_in_flight(job):
                del self.stalled[job_id]
                continue
            self.stalled[job_id] = (float("inf"), delay)  # the delay doubles if it stops again
            log.info("job resumes: the queue answers again", job_id=job_id, state=job.state.value)
            self.start(job)

    async def handle_cancel_requests(self) -> None:
        """`archived cancel` sets a flag in the database; act on it here."""
        store = self.svc.store
        for job in await store.cancel_requests():
            if job.id in self.runners:
                self.runners[job.id].cancel()
            elif job.state in (State.QUEUED, State.RECOVERABLE_ERROR):  # no daemon runs it
                try:
                    job = await store.cancel_waiting(job)
                except StaleState:
                    continue
                self.svc.metrics.transition(State.FAILURE)
                self.start(job)  # failure -> error_handling -> cleanup -> failed

    async def heartbeat(self) -> None:
        """Several daemons on the queue: renew the leases on our jobs every lease/3, and
        stop at once each job another daemon took over, or whose lease we could not
        renew in time (the database out of reach: another daemon may take it over)."""
        store = self.svc.store
        while True:
            await anyio.sleep(self.config().queue.lease / 3)
            try:
                mine: set[str] | None = await store.renew_leases()
            except Exception as exc:
                log.warning("cannot renew the leases on our jobs", error=describe(exc))
                mine = None
            for job_id, runner in list(self.runners.items()):
                if mine is not None and job_id in mine:
                    continue
                try:
                    store.check_lease(job_id)
                    if mine is None:
                        continue
                    job = await store.job(job_id)
                    if job is not None and job.owner not in (None, store.host_id):
                        raise LeaseLost(f"taken over by {job.owner}")
                except LeaseLost as exc:
                    log.warning("lease lost; stopping the job", job_id=job_id, reason=str(exc))
                    runner.lose()
                except Exception as exc:
                    log.warning("cannot read a job's owner", job_id=job_id, error=describe(exc))

    async def drain(self) -> None:
        """Let running steps finish within shutdown_grace, then cancel them."""
        with anyio.move_on_after(self.config().daemon.shutdown_grace):
            while self.runners:
                await anyio.sleep(0.05)
        for job_id, runner in list(self.runners.items()):
            if runner.scope is not None and runner.state in STOPPABLE:
                runner.scope.cancel()  # the step gives its attempt back
            else:  # the failure path (a hook, cleanup): it runs again at the next start
                self.whole_job[job_id].cancel()
        while self.runners:
            await anyio.sleep(0.01)
