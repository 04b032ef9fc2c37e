"""Schedules: `[schedules.NAME]` makes the daemon create jobs by itself.

Each tick, every schedule's latest cron slot at or before now is due unless it was
acted on already; the job is inserted in the same transaction as the slot's row in
`schedule_runs`, whose primary key (schedule, slot) makes a second job for one slot
impossible, across restarts too. Slots that passed while the daemon was down:
`missed = "latest"` runs the latest of them once (the older ones are not run),
`missed = "skip"` runs none. A schedule never fires for slots before it first
appeared in a config. With `skip_unchanged`, a slot whose sources have the same
fingerprint (names, sizes, mtimes) as the last completed job's is recorded as
`skipped` instead; a `command` activity always counts as changed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import anyio
import structlog
from croniter import croniter

from .config import Config, ScheduleConfig
from .drivers import activity_driver
from .errors import JobFileError
from .jobfile import JobSpec, parse_job
from .moments import iso_seconds
from .spool import new_job_id
from .store import ScheduleRun, Store

log = structlog.get_logger(component="schedules")

# Inserts the job with its slot's row; False if another daemon acted on the slot first.
CreateJob = Callable[[JobSpec, str, str, ScheduleRun], Awaitable[bool]]


def _slots(schedule: ScheduleConfig, now: datetime) -> croniter:
    return croniter(schedule.cron, now.astimezone(ZoneInfo(schedule.timezone)))


def latest_slot(schedule: ScheduleConfig, now: datetime) -> datetime:
    """The latest slot before `now`, in UTC (a slot exactly at `now` is the next tick's)."""
    slot: datetime = _slots(schedule, now).get_prev(datetime)
    return slot.astimezone(UTC)


def next_slot(schedule: ScheduleConfig, now: datetime) -> datetime:
    """The first slot after `now`, in UTC."""
    slot: datetime = _slots(schedule, now).get_next(datetime)
    return slot.astimezone(UTC)


def period(schedule: ScheduleConfig, now: datetime, slots: int = 64) -> float:
    """The longest gap, in seconds, between two of the next `slots` slots: how long a
    schedule may go without a job (a weekday cron's weekend, a DST change included),
    for the alert on a schedule that stopped doing its work."""
    cron = _slots(schedule, now)
    times = [cron.get_next(datetime).astimezone(UTC) for _ in range(slots)]
    return max((b - a).total_seconds() for a, b in itertools.pairwise(times))


def fingerprint(spec: JobSpec) -> str | None:
    """The sources' fingerprint, each activity's driver's; None when one cannot tell."""
    lines: list[str] = []
    for activity in spec.activities:
        driver_cls = activity_driver(activity.driver)
        lines_of = driver_cls(activity.name, driver_cls.options(activity.options())).fingerprint()
        if lines_of is None:
            return None
        lines += lines_of
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


class Scheduler:
    def __init__(self, store: Store, create_job: CreateJob) -> None:
        self.store = store
        self.create_job = create_job
        self.started: dict[str, datetime] = {}  # when this process first saw each schedule

    async def tick(self, config: Config) -> None:
        now = datetime.now(UTC)
        for name, schedule in config.schedules.items():
            try:
                await self._tick_one(config, name, schedule, now)
            except Exception:
                log.exception("schedule failed", schedule=name)

    async def _tick_one(
        self, config: Config, name: str, schedule: ScheduleConfig, now: datetime
    ) -> None:
        self.started.setdefault(name, now)
        after = await self.store.schedule_first_seen(name)
        if (last := await self.store.last_schedule_slot(name)) is not None:
            after = max(after, last)
        if schedule.missed == "skip":
            after = max(after, self.started[name])
        slot = latest_slot(schedule, now)
        if slot <= after:
            return
        template = json.dumps(schedule.job, default=str).encode()

        def prepared() -> tuple[JobSpec, str | None]:
            """The slot's job, and its sources' fingerprint: in a worker thread, as every
            look at a source (the check looks up where its paths really lie, and a source
            on a mount that does not answer blocks whoever looks)."""
            spec = parse_job(template, "template.json", config)
            metadata = {
                "Archived-Schedule": name,
                "Archived-Schedule-Slot": iso_seconds(slot),
                **spec.metadata,
            }
            spec = spec.model_copy(update={"metadata": metadata})
            return spec, fingerprint(spec)

        try:
            spec, print_ = await anyio.to_thread.run_sync(prepared)
        except JobFileError as exc:
            await self._record(name, slot, "rejected", detail=str(exc))
            log.error(
                "scheduled job rejected", schedule=name, slot=iso_seconds(slot), reason=str(exc)
            )
            return
        if (
            schedule.skip_unchanged
            and print_ is not None
            and await self.store.last_completed_fingerprint(name) == print_
        ):
            await self._record(
                name,
                slot,
                "skipped",
                fingerprint=print_,
                detail="sources unchanged since the last completed job",
            )
            log.info(
                "scheduled job skipped: sources unchanged", schedule=name, slot=iso_seconds(slot)
            )
            return
        job_id = new_job_id()
        run = ScheduleRun(name, slot, "created", job_id=job_id, fingerprint=print_)
        digest = hashlib.sha256(template + iso_seconds(slot).encode()).hexdigest()
        if not await self.create_job(spec, job_id, digest, run):
            return  # another daemon on this queue made the slot's job
        log.info(
            "scheduled job created",
            schedule=name,
            slot=iso_seconds(slot),
            job_id=job_id,
            state="queued",
        )

    async def _record(
        self,
        name: str,
        slot: datetime,
        result: str,
        *,
        fingerprint: str | None = None,
        detail: str = "",
    ) -> None:
        await self.store.record_schedule_run(
            ScheduleRun(name, slot, result, fingerprint=fingerprint, detail=detail)
        )
