"""The `activity_archiving` phase: every activity writes its sources into staging.

One task per activity, run concurrently (bounded by the daemon's activity slots); each
writes its tar fragment and records through an `ArtifactWriter` and reports its progress
every second. Before anything is staged, the staging file system must have room for
what the unfinished activities' sources will take there.
"""

from __future__ import annotations

from typing import Any

import anyio
import structlog

from . import failpoints
from .artifacts import ArtifactWriter
from .drivers import activity_driver
from .drivers.base import ActivityContext, ActivityDriver, Estimate
from .jobfile import check_against
from .phase import JobContext, Outcome
from .progress import Report
from .staging import Staging, boot_id
from .states import Event, State
from .store import Task, now_iso

log = structlog.get_logger(component="activities")


class Activities:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.estimates: dict[str, Estimate] = {}  # by activity, from the space check

    async def run(self) -> Outcome:
        ctx = self.ctx
        await ctx.begin_attempt(State.ACTIVITY_ARCHIVING)
        tasks = await ctx.tasks()
        pending = [t.name for t in tasks if t.kind == "activity" and t.state != "completed"]
        await self._check_before_start(pending)
        await self._sync_storage_tasks(tasks)
        await failpoints.reach("activity_archiving")
        ends = await ctx.run_tasks(
            "activity",
            ctx.svc.activity_slots,
            self._activity,
            pending=pending,
            ends_with_transition=True,  # a commit less: the results go with the DONE
        )
        done = {
            t.name: t.result or {} for t in tasks if t.kind == "activity" and t.name not in pending
        }
        ctx.know_activity_results(done | {end.name: end.result or {} for end in ends})
        return Outcome(Event.DONE, "every activity task completed")

    async def _sync_storage_tasks(self, tasks: list[Task]) -> None:
        """One storage task per target the job stores to under the config it runs on
        (no commit when they are there already, as they are on a job's first start).
        Those left to run are then known to the store phase, if it runs here next."""
        ctx = self.ctx
        wanted = ctx.spec.targets(ctx.config)
        storage = [t for t in tasks if t.kind == "storage"]
        if {t.name for t in storage} != set(wanted):
            await ctx.store.sync_storage_tasks(ctx.id, wanted)
            ctx.storage_pending = None  # as the queue has them now: read then
        else:
            ctx.storage_pending = [t.name for t in storage if t.state != "completed"]

    def _driver(self, name: str) -> ActivityDriver:
        activity = next(a for a in self.ctx.spec.activities if a.name == name)
        driver_cls = activity_driver(activity.driver)
        return driver_cls(name, driver_cls.options(activity.options()))

    def _writer(self, name: str) -> ArtifactWriter:
        return self.ctx.staging.writer(name, self.ctx.bag_name)

    async def _check_before_start(self, pending: list[str]) -> None:
        """In one trip to a worker thread: the job checked against the config it starts
        on (a reload may have changed it since it was accepted); then NoSpace
        (recoverable) before anything is staged, when the staging file system has less
        room than the `pending` activities' sources will take there. What the drivers
        know of their sources is kept: their progress is shown against it. Not on the
        event loop: the check looks up where the sources really lie, and a source on a
        mount that does not answer blocks whoever looks (the job only, then)."""
        ctx = self.ctx

        def check() -> None:
            check_against(ctx.spec, ctx.config)
            needed = 0
            for name in pending:
                writer = self._writer(name)
                Staging.clear_activity(writer)  # what an unfinished earlier try left
                estimate = self._driver(name).estimate(f"{ctx.bag_name}/data/{name}/")
                if estimate is not None:
                    self.estimates[name] = estimate
                    needed += estimate.staged
            if needed:
                ctx.staging.require_space(needed)

        await anyio.to_thread.run_sync(check, limiter=ctx.svc.hash_threads)

    async def _activity(self, name: str) -> dict[str, Any]:
        ctx = self.ctx
        writer = self._writer(name)  # cleared by _check_before_start, just before
        driver = self._driver(name)
        activity = ActivityContext(ctx.id, ctx.config, writer, ctx.svc.hash_threads)
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._report_progress, name, writer)
            try:
                await failpoints.reach("activity_task")
                result = await driver.run(activity)
            except Exception as exc:  # raised as itself below, not inside an ExceptionGroup
                error = exc
            finally:
                writer.close()
            tg.cancel_scope.cancel()
        if error is not None:
            raise error
        if activity.notes:
            await ctx.event(
                "activity_notes",
                activity=name,
                notes=activity.notes[:1000],
                count=len(activity.notes),
            )
        log.info("activity task completed", activity=name, **result)
        return {**result, "boot": boot_id()}

    async def _report_progress(self, name: str, writer: ArtifactWriter) -> None:
        """Every second, how far the task has come against what its driver knew of the
        source, for `archived show` and `archived submit --wait`. Not at once: a task done
        within the second (most, in a burst of small jobs) costs no commit for it."""
        since = now_iso()
        estimate = self.estimates.get(name, Estimate(0))
        while True:
            await anyio.sleep(1)
            report = Report(
                writer.files, writer.moved, estimate.files, estimate.bytes, since, now_iso()
            )
            await self.ctx.store.task_progress(self.ctx.id, "activity", name, report.dumps())
