"""Runs one job through the state machine, one committed step at a time.

`JobRunner.run()` reads the job's state, calls that state's handler, and commits the
transition the handler's event leads to (see states.py). Because every step starts
from what the database says, a restarted daemon resumes a job by simply running it
again: finished tasks are skipped (post-processing, committed whole, runs again whole).

The runner keeps the loop: states, attempts, the deadline and the operator's cancel,
and which error leads where. The phases live in their own modules (activities.py,
postprocess.py, copies.py, cleanup.py) over a shared `JobContext` (phase.py); the
staging area in staging.py; the backoff in retry.py.

A job that must wait to retry (`recoverable_error`, a cleanup backing off) ends its
runner and holds no slot: the store's claim hands it back when its `retry_at` has come.
With several daemons on one queue, a runner whose daemon lost the job's lease (another
daemon took it over) stops at once, writing nothing more about it (see store_pg.py).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
import structlog

from .activities import Activities
from .cleanup import cleanup, error_handling
from .copies import StorePhase
from .errors import Kind, classify, describe
from .phase import AttemptsExhausted, JobContext, Outcome, Services
from .postprocess import PostProcessing
from .states import FINAL, PHASES, RETRY_EVENT, STOPPABLE, Event, State, next_state
from .store import Job, LeaseLost, StaleState, lease_lost, utcnow

__all__ = ["JobRunner", "Services"]

log = structlog.get_logger(component="runner")


class JobRunner:
    def __init__(self, svc: Services, job: Job, counted: State | None = None) -> None:
        self.svc = svc
        self.ctx = JobContext(svc, job)
        self.ctx.counted = counted  # the claim counted the attempt of the job's phase
        self.id = job.id
        self.config = self.ctx.config
        self.last_error: BaseException | None = None
        self.scope: anyio.CancelScope | None = None
        self.whole: anyio.CancelScope | None = None  # the daemon's scope around run()
        self.canceled = False
        self.lost = False  # another daemon took the job over: touch nothing of it
        self.handlers: dict[State, Callable[[], Awaitable[Outcome | None]]] = {
            State.ACTIVITY_ARCHIVING: Activities(self.ctx).run,
            State.POST_PROCESSING: PostProcessing(self.ctx).run,
            State.STORE: StorePhase(self.ctx).run,
            State.ERROR: self.classify_error,
            State.FAILURE: self.failure,
            State.ERROR_HANDLING: lambda: error_handling(self.ctx),
            State.CLEANUP: lambda: cleanup(self.ctx),
        }

    @property
    def job(self) -> Job:
        return self.ctx.job

    @job.setter
    def job(self, job: Job) -> None:
        self.ctx.job = job

    @property
    def state(self) -> State:
        return self.job.state

    async def run(self) -> None:
        with structlog.contextvars.bound_contextvars(job_id=self.id, state=self.state.value):
            try:
                await self._run()
            except* LeaseLost as group:
                self.lost = True
                log.warning(
                    "lease lost: another daemon runs this job now; stopped, nothing of it touched",
                    reason=str(group.exceptions[0]),
                )

    async def _run(self) -> None:
        """Step by step until the job is final, or waits (to retry), or we stop."""
        while self.state not in FINAL and not self.svc.stopping.is_set():
            if self.job.waiting:
                return  # it holds no slot while it waits: the claim takes it when due
            state = self.state
            began = time.monotonic()
            outcome = await self._guarded_step(state)
            self.svc.metrics.step(state, time.monotonic() - began)
            if outcome is None:
                break  # shutting down: the next start resumes from this state
            fields = outcome.fields
            entered = next_state(state, outcome.event)
            # its attempt counted in this commit (not when it stays: a retry counts its own)
            counts = (entered in PHASES or entered == State.CLEANUP) and entered != state
            if counts:
                fields = fields | self.ctx.attempt_fields(entered)
            self.ctx.counted = None
            events, self.ctx.events = self.ctx.events, []
            ended = list(self.ctx.ended)  # kept until committed: the next transition's else
            try:
                job = await self.svc.store.transition(
                    self.id,
                    state,
                    outcome.event,
                    outcome.reason,
                    events=events,
                    ended=ended,
                    **fields,
                )
            except StaleState:
                log.warning("job moved under us; re-reading")
                moved = await self.svc.store.job(self.id)
                assert moved is not None
                job, new = moved, state
            else:
                new = job.state
                self.ctx.counted = entered if counts else None
                del self.ctx.ended[: len(ended)]
            structlog.contextvars.bind_contextvars(state=new.value)
            self.svc.metrics.transition(new)
            if new == State.COMPLETED:
                self.svc.metrics.bytes_archived += self.job.payload_bytes or 0
            log.info(
                "transition",
                from_state=state.value,
                on=outcome.event.value,
                reason=outcome.reason,
            )
            self.job = job
        if self.ctx.counted is not None and self.state == self.ctx.counted:
            # stopped between the transition (or the claim) that counted the phase's
            # attempt and the phase itself: shutdown is not the phase's fault, give the
            # attempt back
            field = "cleanup_attempts" if self.state == State.CLEANUP else "attempts"
            await self.svc.store.update_job(self.id, **{field: getattr(self.job, field) - 1})

    def lose(self) -> None:
        """Another daemon owns the job now: stop at once, write nothing more."""
        self.lost = True
        if self.whole is not None:
            self.whole.cancel()

    def cancel(self) -> None:
        """Stop the running step at its next safe point; the job goes to failure."""
        self.canceled = True
        if self.scope is not None and self.state in STOPPABLE:
            self.scope.cancel()

    def _deadline(self) -> float:
        """The whole-job deadline on anyio's clock."""
        started = self.job.started_at or utcnow()
        left = (started - utcnow()).total_seconds() + self.config.daemon.job_timeout
        return anyio.current_time() + left

    async def _guarded_step(self, state: State) -> Outcome | None:
        """A step under the job's deadline and the operator's cancel; None on shutdown."""
        if state not in STOPPABLE:  # the failure path always runs to its end
            return await self._step(state)
        self.scope = anyio.CancelScope(deadline=self._deadline())
        if self.canceled:
            self.scope.cancel()
        self.ctx.attempt_begun = False
        with self.scope:
            return await self._step(state)
        self.scope = None
        # Cut short: by `archived cancel`, by the deadline, or by shutdown.
        await self._abandon_executing_tasks()
        if self.canceled:
            return Outcome(Event.CANCELED, "canceled", {"error": f"canceled during {state}"})
        if not self.svc.stopping.is_set():
            limit = self.config.daemon.job_timeout
            return Outcome(
                Event.TIMED_OUT,
                "timeout",
                {"error": f"timeout: job_timeout ({limit:g}s) passed during {state}"},
            )
        if self.ctx.attempt_begun:  # shutdown is not the step's fault: give the attempt back
            await self.svc.store.update_job(self.id, attempts=self.job.attempts - 1)
        return None

    async def _abandon_executing_tasks(self) -> None:
        ended = list(self.ctx.ended)
        await self.svc.store.abandon_tasks(self.id, sorted(self.ctx.unstarted), ended)
        self.ctx.unstarted.clear()
        del self.ctx.ended[: len(ended)]

    async def _step(self, state: State) -> Outcome | None:
        handler = self.handlers[state]
        try:
            return await handler()
        except Exception as exc:
            if state not in RETRY_EVENT or lease_lost(exc):
                raise  # errors outside the critical section are bugs: let the daemon log them
            self.last_error = exc
            log.warning("phase failed", error=describe(exc), error_type=type(exc).__name__)
            return Outcome(
                Event.ERROR,
                f"{state}: {describe(exc)}",
                {"phase": state.value, "error": f"{state}: {describe(exc)}"},
            )

    # -- the error path ----------------------------------------------------------------

    async def classify_error(self) -> Outcome:
        error = self.last_error
        attempts, limit = self.job.attempts, self.ctx.retry.max_attempts
        phase = self.job.phase
        if isinstance(error, AttemptsExhausted) or (
            error is not None
            and classify(error) == Kind.RECOVERABLE
            and self.ctx.retry.last(attempts)
        ):
            return Outcome(
                Event.EXHAUSTED,
                f"{phase}: gave up after {min(attempts, limit)} attempts",
                {"error": f"{self.job.error} (after {limit} attempts)"},
            )
        # Resumed after a crash in this state, the exception is gone: try again.
        if error is not None and classify(error) == Kind.FATAL:
            return Outcome(Event.FATAL, f"not recoverable: {self.job.error}")
        delay, retry_at = self.ctx.backoff(attempts)
        return Outcome(
            Event.RECOVERABLE,
            f"recoverable; attempt {attempts + 1} of {limit} in {delay:.1f}s",
            {"retry_at": retry_at},
        )

    async def failure(self) -> Outcome:
        return Outcome(Event.HANDLED, f"failure: {self.job.error}")
