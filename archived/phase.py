"""What every phase of one job works with, and what it gives back.

A phase (activities.py, postprocess.py, copies.py, cleanup.py) is handed the job's
`JobContext`: the daemon's `Services`, the job's row as last read, the config and job
file it runs on, its staging area, and the few store operations phases share (count an
attempt, record an event, run the tasks of a kind). It returns an `Outcome`, the event
the runner commits (see runner.py); it raises for the error path.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup

from .config import Config
from .drivers import open_storage
from .drivers.base import StorageDriver
from .errors import describe
from .jobfile import JobSpec
from .keys import KeyRing
from .metrics import Metrics
from .moments import compact
from .retry import RetryPolicy
from .staging import Staging
from .states import Event, State
from .store import Job, NewCopy, NewEvent, Store, Task, TaskEnd, lease_lost, storage_key, utcnow

log = structlog.get_logger(component="phase")


@dataclass
class Services:
    """What the daemon lends every job runner."""

    store: Store
    state_dir: Path
    keys: KeyRing
    activity_slots: anyio.CapacityLimiter
    storage_slots: anyio.CapacityLimiter
    hash_threads: anyio.CapacityLimiter
    stopping: anyio.Event = field(default_factory=anyio.Event)
    metrics: Metrics = field(default_factory=Metrics)


@dataclass(frozen=True)
class Outcome:
    """The event the runner commits, with the job's fields (and, in the same
    transaction, the events the step logged: `JobContext.events`)."""

    event: Event
    reason: str
    fields: dict[str, Any] = field(default_factory=dict)


# How long a task runs before its start is committed (see JobContext._started_later).
START_AFTER = 1.0
# How long the end of a task whose start was not committed waits, at most, for the other
# tasks of its phase to end (and, for activities, the phase's transition): see run_tasks.
FINISH_AFTER = 1.0


class AttemptsExhausted(Exception):
    pass


class JobContext:
    def __init__(self, svc: Services, job: Job) -> None:
        self.svc, self.job = svc, job
        self.id = job.id
        self.config = Config.from_snapshot(job.config)
        self.spec = JobSpec.model_validate_json(job.spec)
        self.retry = RetryPolicy.of(self.config.retry)
        self.staging = Staging(
            svc.state_dir / "staging" / self.id, [a.name for a in self.spec.activities]
        )
        self.attempt_begun = False  # this step counted an attempt (see runner.py)
        self.counted: State | None = None  # the transition into this phase counted one
        self._activity_results: dict[str, dict[str, Any]] | None = None
        # tasks running whose start is not committed yet (kind, name): see _started_later
        self.unstarted: set[tuple[str, str]] = set()
        # what a step logged, recorded with the transition that ends it, whichever it is
        # (done, an error, a cancel): post-processing's steps, committed together
        self.events: list[NewEvent] = []
        # tasks that ended, not committed yet: with the next transition (see run_tasks)
        self.ended: list[TaskEnd] = []
        # the job as read in the commit of the last tasks' ends, when run_tasks made it
        self.after_ends: Job | None = None
        # the storage tasks left to run, known from the activity phase's read (None: read)
        self.storage_pending: list[str] | None = None

    @property
    def store(self) -> Store:
        return self.svc.store

    @property
    def bag_name(self) -> str:
        """`<name>-<job id>-<UTC start>`: fixed when the job first starts, since the
        activities write it into their tar members (and kept when a retry stores the
        archive of an earlier start)."""
        if self.job.archive_name:
            return self.job.archive_name.removesuffix(".tar")
        started = self.job.started_at or utcnow()
        return f"{self.spec.name}-{self.id}-{compact(started)}"

    def key(self) -> str:
        """Where the archive is on every target."""
        return storage_key(self.spec.name, self.job.archive_name or "")

    def storage(self, target: str) -> StorageDriver:
        return open_storage(self.config, target)

    def backoff(self, failed: int) -> tuple[float, datetime]:
        """How long to wait after `failed` failed attempts, and until when. The job
        waits in the queue meanwhile, holding no slot: the claim takes it when due."""
        return self.retry.next_try(failed, utcnow(), random.random())

    def attempt_fields(self, phase: State) -> dict[str, Any]:
        """The job's fields that count one more attempt of `phase` (of cleanup: its own)."""
        if phase == State.CLEANUP:  # and no wait left from before (a canceled retry's)
            return {"cleanup_attempts": self.job.cleanup_attempts + 1, "retry_at": None}
        return self.job.attempt_fields(phase)

    async def begin_attempt(self, phase: State) -> None:
        """Count an attempt of `phase` before doing anything, so a crash counts too;
        already done if the runner counted it in the transition into `phase` (one
        commit less per phase)."""
        if self.counted == phase and self.job.phase == phase:
            attempts = self.job.attempts
        else:
            fields = self.attempt_fields(phase)
            await self.store.update_job(self.id, **fields)
            attempts = fields["attempts"]
            self.job = self.job.replace(phase=phase.value, attempts=attempts)
        self.counted = None
        self.attempt_begun = True
        if not self.retry.allows(attempts):
            raise AttemptsExhausted(f"{phase}: {attempts - 1} attempts used up")

    async def event(self, kind: str, **detail: Any) -> None:
        await self.store.add_event(self.id, kind, detail)

    async def tasks(self, kind: str | None = None) -> list[Task]:
        return await self.store.tasks(self.id, kind)

    async def activity_results(self) -> dict[str, dict[str, Any]]:
        """What each activity task reported when it finished: read once, after the
        activity phase (post-processing and store ask for it up to three times), unless
        the activity phase ran here (`know_activity_results`)."""
        if self._activity_results is None:
            self._activity_results = {t.name: t.result or {} for t in await self.tasks("activity")}
        return self._activity_results

    def know_activity_results(self, results: dict[str, dict[str, Any]]) -> None:
        """Every activity task's result, as the queue has them (or will, once the
        transition is committed): no read for them after the activity phase."""
        self._activity_results = json.loads(json.dumps(results))  # as read back

    async def reverify_after_restart(self, reported: dict[str, dict[str, Any]]) -> list[str]:
        return await self.staging.reverify_after_restart(self.id, reported, self.svc.hash_threads)

    def _started_later(self, tg: TaskGroup, kind: str, name: str) -> Callable[[], Awaitable[bool]]:
        """The task's start (`executing`, its attempt counted) committed once it has run
        START_AFTER seconds: one done sooner (most, in a burst of small jobs) is counted
        when it finishes, a commit less; one a crash cuts short before then runs again
        uncounted. Returns what the task calls when done: whether its start was
        committed, after waiting for that commit if it is under way."""
        waiting = anyio.CancelScope()
        marked = anyio.Event()
        started = False
        self.unstarted.add((kind, name))  # cut short meanwhile: abandon_tasks counts it

        async def mark() -> None:
            nonlocal started
            try:
                with waiting:
                    await anyio.sleep(START_AFTER)
                if not waiting.cancel_called:  # not done meanwhile: committed before it is
                    await self.store.start_task(self.id, kind, name)
                    started = True
                    self.unstarted.discard((kind, name))
            except Exception as exc:  # the queue's: the task goes on, its end counts it
                if lease_lost(exc):
                    raise  # the job is another daemon's now: stop at once, touch nothing
                log.warning("cannot record that a task started", task=name, error=describe(exc))
            finally:
                marked.set()

        async def done() -> bool:
            waiting.cancel()
            await marked.wait()
            return started

        tg.start_soon(mark)
        return done

    async def run_tasks(
        self,
        kind: str,
        slots: anyio.CapacityLimiter,
        work: Callable[[str], Awaitable[dict[str, Any]]],
        copy: Callable[[dict[str, Any]], NewCopy] | None = None,
        *,
        pending: list[str] | None = None,
        ends_with_transition: bool = False,
    ) -> list[TaskEnd]:
        """Run every unfinished task of `kind` (or the `pending` ones, if the caller read
        them already) concurrently; raise the first failure. Returns how they ended.

        `copy` makes the copy a finished storage task wrote of its result, recorded in
        the transaction that marks the task done.

        A task that ran long enough for its start to be committed has its end committed
        at once. The others (most, in a burst of small jobs) wait, up to FINISH_AFTER,
        for their siblings: they are committed together once all ended, or with the
        phase's transition (`ends_with_transition`: the runner takes `self.ended`), or
        with a failure's; a commit less a task. A crash before that runs them again.
        """
        if kind == "activity":
            self._activity_results = None  # they change: read again when asked for
        if pending is None and kind == "storage":
            pending, self.storage_pending = self.storage_pending, None
        if pending is None:
            pending = [t.name for t in await self.tasks(kind) if t.state != "completed"]
        failures: list[BaseException] = []
        ends: list[TaskEnd] = []
        store = self.store
        self.after_ends = None

        async def one(name: str) -> None:
            async with slots:
                started = self._started_later(tg, kind, name)
                ended: dict[str, Any]
                try:
                    result = await work(name)
                    json.dumps(result)  # what the queue keeps: else the task fails, not its commit
                except Exception as exc:
                    if lease_lost(exc):
                        raise
                    failures.append(exc)
                    ended = {"error": describe(exc)}
                else:
                    ended = {"result": result, "copy": copy(result) if copy is not None else None}
                # what the task did (its copy), recorded even if the job is canceled now
                with anyio.CancelScope(shield=True):
                    counted = not await started()
                    end = TaskEnd(kind, name, utcnow(), counted=counted, **ended)
                    ends.append(end)
                    if counted:  # kept for its siblings' commit, or the transition
                        self.unstarted.discard((kind, name))
                        self.ended.append(end)
                        return
                    await store.finish_tasks(self.id, [end])

        async with anyio.create_task_group() as outer:
            outer.start_soon(self._commit_ends_later)
            async with anyio.create_task_group() as tg:
                for name in pending:
                    tg.start_soon(one, name)
            outer.cancel_scope.cancel()
        if not ends_with_transition:
            # a failure's too: what was stored is on record
            self.after_ends = await self.commit_ends()
        if failures:
            raise failures[0]
        return ends

    async def _commit_ends_later(self) -> None:
        """The ends kept waiting, committed every FINISH_AFTER while tasks still run."""
        while True:
            await anyio.sleep(FINISH_AFTER)
            with anyio.CancelScope(shield=True):
                try:
                    await self.commit_ends()
                except Exception as exc:  # the queue's: they go with the transition
                    if lease_lost(exc):
                        raise
                    log.warning("cannot record that tasks ended", error=describe(exc))

    async def commit_ends(self) -> Job | None:
        """The tasks that ended and wait to be committed, committed now; the job as it
        was in that transaction (None if none waited)."""
        if not (waiting := list(self.ended)):
            return None
        job = await self.store.finish_tasks(self.id, waiting)
        del self.ended[: len(waiting)]  # only appended to meanwhile
        return job
