"""Intake: job files from the spool, and a schedule's jobs, into job rows.

`Intake.ingest()` claims every entry of the spool's incoming/, reads and parses it, and
inserts the job, queued, with the config it will run on; what can never be a job goes to
corrupt/ with the reason. Entries are taken in batches (claimed and read in one trip to
a thread, their jobs inserted at once so that their transactions share a commit, their
files removed in one trip): a burst of small jobs spends its time on the jobs. An error
with one entry is about that entry only: one that may pass (EMFILE, ENOSPC, EBUSY, the
queue's disk full) leaves it for the next poll, said once for as long as it lasts
(`Once`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import anyio
import structlog

from .config import Config
from .errors import JobFileError, Kind, TransientError, classify, describe
from .jobfile import JobSpec, parse_job, read_job_file
from .moments import iso_seconds
from .phase import Services
from .spool import Claimed, Spool, new_job_id, printable, submitted_id
from .states import State
from .store import Job, NewJob, ScheduleRun, as_datetime

log = structlog.get_logger(component="intake")

# Spool entries taken at once (see Intake._ingest_batch).
BATCH = 32


def _batches(names: list[str]) -> Iterator[list[str]]:
    """`names` in order, in batches of at most BATCH, none holding two names of one job
    id (`<id>.toml` and `<id>.json`): the second must find the first one's job."""
    batch: list[str] = []
    ids: set[str] = set()
    for name in names:
        job_id = submitted_id(name)
        if len(batch) == BATCH or job_id in ids:
            yield batch
            batch, ids = [], set()
        batch.append(name)
        if job_id is not None:
            ids.add(job_id)
    if batch:
        yield batch


def _read(claimed: Claimed, pinned: Pinned) -> _Taken:
    """In a thread: a claimed entry's bytes and its job, parsed and checked against
    `pinned`'s config (or why not; it is queued on that one), or the error reading them.
    Checked here, not on the event loop: the check looks up where the job's sources
    really lie, and a source on a mount that does not answer blocks whoever looks."""
    try:
        data = read_job_file(claimed.path, pinned.config.limits.max_job_file_bytes)
    except Exception as exc:
        return _Taken(claimed, exc)
    try:
        parsed: JobSpec | Exception = parse_job(data, claimed.original_name, pinned.config)
    except Exception as exc:  # JobFileError: to corrupt/; another (a bug): see _accept
        parsed = exc
    return _Taken(claimed, data=data, parsed=parsed)


def _read_all(entries: list[Claimed], pinned: Pinned) -> list[_Taken]:
    return [_read(claimed, pinned) for claimed in entries]


class QueueDown(Exception):
    """The queue could not be read: intake stops for this poll, files where they are."""


@dataclass(frozen=True)
class _Taken:
    """A spool entry claimed and read (`data`, and its job `parsed`, or why not), or
    what went wrong (`error`): claiming it (the entry still in incoming/) or reading it."""

    claimed: Claimed
    error: Exception | None = None
    data: bytes | None = None
    parsed: JobSpec | Exception | None = None


@dataclass(frozen=True)
class Pinned:
    """The config in force and the snapshot jobs are queued and triggered on: serialized
    once when the config is loaded, not on every poll turn."""

    config: Config
    snapshot: str
    digest: str

    @classmethod
    def of(cls, config: Config) -> Pinned:
        snapshot = config.snapshot()
        # Config.digest, without serializing the whole config a second time
        return cls(config, snapshot, hashlib.sha256(snapshot.encode()).hexdigest()[:16])


class Once:
    """Errors that every poll would meet again, logged once for as long as they last."""

    def __init__(self) -> None:
        self.said: dict[str, str] = {}  # the error last logged, by what it is about

    def say(self, key: str, message: str, exc: BaseException, **where: str) -> None:
        error = describe(exc)
        if self.said.get(key) != error:
            self.said[key] = error
            log.error(message, error=error, **where)

    def over(self, key: str) -> None:
        self.said.pop(key, None)


class Intake:
    def __init__(
        self, spool: Spool, svc: Services, pinned: Callable[[], Pinned], wake: Callable[[], None]
    ) -> None:
        self.spool, self.svc = spool, svc
        self.pinned = pinned  # the config in force: it changes on reload
        self.wake = wake
        self.once = Once()  # by spool entry name
        self.rejecting = anyio.Lock()
        # a batch's inserts at once: SQLite's share a commit; PostgreSQL's each take one
        # of the pool's connections, so fewer there (the runners and the lease's
        # heartbeat need theirs)
        self.inserting = anyio.CapacityLimiter(4 if svc.store.shared else BATCH)

    async def ingest_leftovers(self) -> None:
        """Entries claimed before a crash, or left by an error worth another try, in
        batches as new ones are. QueueDown if the queue cannot be read: they wait."""
        leftovers = await self.spool.leftovers()
        for start in range(0, len(leftovers), BATCH):
            if self.svc.stopping.is_set():
                return
            batch = leftovers[start : start + BATCH]
            await self._ingest_taken(functools.partial(_read_all, batch))

    async def _known(self, ids: list[str]) -> dict[str, Job]:
        """The jobs of `ids` already in the queue; QueueDown if it cannot be read."""
        try:
            return await self.svc.store.jobs_by_id(ids) if ids else {}
        except Exception as exc:
            raise QueueDown(describe(exc)) from exc

    async def ingest(self) -> None:
        """Take every entry of incoming/; an error with one is about that entry only."""
        try:
            await self.ingest_leftovers()
            names = await self.spool.pending()
            for batch in _batches(names):
                if self.svc.stopping.is_set():
                    return
                await self._ingest_batch(batch)
        except QueueDown as exc:  # what was claimed waits in active/ for the next poll
            self.once.say("queue", "cannot read the queue; the spool waits", exc, file="")
            return
        except OSError as exc:
            self.once.say("", "cannot read the spool; trying again", exc, file="")
            await anyio.to_thread.run_sync(self.spool.create)  # an operator removed a folder?
            return
        self.once.over("queue")

    async def _ingest_batch(self, names: list[str]) -> None:
        """Entries claimed and read in one trip to a thread, then taken in."""
        await self._ingest_taken(functools.partial(self._take, names))

    async def _ingest_taken(self, read: Callable[[Pinned], list[_Taken]]) -> None:
        """Entries claimed and read by `read` in one trip to a thread, against the config
        in force then; their jobs queued on that config (not on one a reload brought
        meanwhile) at once, in the entries' order (their transactions share a commit:
        see store_sqlite.py), and their files removed in one trip once the jobs are in
        the queue; the others to corrupt/, or left for the next poll."""
        pinned = self.pinned()
        taken = await anyio.to_thread.run_sync(read, pinned)
        known = await self._known([t.claimed.job_id for t in taken if t.data is not None])
        spent: list[Claimed] = []
        async with anyio.create_task_group() as tg:
            for t in taken:  # in order: the limiter lets them insert first in, first out
                if t.data is not None:
                    job = known.get(t.claimed.job_id)
                    tg.start_soon(self._accept_or_reject, t, pinned, job, spent)
                elif isinstance(t.error, JobFileError):  # claimed, but not a job file
                    tg.start_soon(self._reject_or_keep, t.claimed, str(t.error))
                else:
                    assert t.error is not None
                    tg.start_soon(self._cannot_take, t.claimed, t.error)
        await self._spent(spent)

    def _take(self, names: list[str], pinned: Pinned) -> list[_Taken]:
        """In a thread: each entry claimed (moved into active/), then read."""
        taken = []
        for name in names:  # an error is about its entry only, whatever it is
            try:
                claimed = self.spool.claim(name)
            except Exception as exc:
                taken.append(_Taken(Claimed(self.spool.incoming / name, new_job_id(), name), exc))
                continue
            if claimed is not None:  # else gone: taken by someone else, or removed
                taken.append(_read(claimed, pinned))
        return taken

    async def _spent(self, spent: list[Claimed]) -> None:
        """The files of jobs now in the queue removed; if that fails they stay in active/,
        and the next poll finds their jobs queued and removes them then."""
        if not spent:
            return
        try:
            await self.spool.done(*spent)
        except OSError as exc:
            self.once.say("", "cannot remove a spool entry whose job is queued", exc, file="")

    async def create_scheduled(
        self, spec: JobSpec, job_id: str, digest: str, run: ScheduleRun
    ) -> bool:
        """The Scheduler's way in: False if another daemon acted on the slot already."""
        made = await self._insert(
            spec,
            job_id,
            digest,
            schedule_run=run,
            reason=f"created by schedule {run.schedule} for {iso_seconds(run.slot)}",
        )
        self.wake()
        return made

    async def _accept_or_reject(
        self, t: _Taken, pinned: Pinned, known: Job | None, spent: list[Claimed]
    ) -> None:
        try:
            await self._accept(t, pinned, known, spent)
        except Exception as exc:
            await self._cannot_take(t.claimed, exc)

    async def _reject_or_keep(self, entry: Claimed, reason: str) -> None:
        try:
            await self._reject(entry, reason)
        except Exception as exc:
            await self._cannot_take(entry, exc)

    async def _cannot_take(self, entry: Claimed, exc: Exception) -> None:
        """Into corrupt/ with the reason, unless the error may pass (EMFILE, ENOSPC, EBUSY,
        ...): then it stays for the next poll. What cannot be moved is said once, skipped."""
        if isinstance(exc, FileNotFoundError):
            return  # gone: taken by someone else, or removed
        name = entry.original_name
        if classify(exc) == Kind.RECOVERABLE:
            self.once.say(
                name, "cannot take a spool entry now; trying again", exc, file=printable(name)
            )
            return
        reason = f"cannot take it: {describe(exc)}"
        if not isinstance(exc, OSError):  # a bug: its traceback, and no crash loop
            log.exception("error while reading a job file", file=printable(name))
            reason = f"internal error while reading it: {describe(exc)}"
        try:
            await self._reject(entry, reason)
        except FileNotFoundError:
            return
        except Exception as again:  # a bug's too: about this entry only, no crash loop
            self.once.say(
                name, "cannot move a spool entry to corrupt/", again, file=printable(name)
            )

    async def _accept(
        self, t: _Taken, pinned: Pinned, known: Job | None, spent: list[Claimed]
    ) -> None:
        """Turn a claimed spool file read (`t.data`, its job `t.parsed` or why it is none:
        see _read) into a job queued on `pinned`, the config it was checked against (its
        file then `spent`), or move it to corrupt/. `known`: the job of its id already in
        the queue."""
        claimed, parsed = t.claimed, t.parsed
        assert t.data is not None
        digest = hashlib.sha256(t.data).hexdigest()
        if known is not None:
            if known.spec_sha256 == digest:
                spent.append(claimed)  # inserted before a crash; the file is spent
            else:
                await self._reject(claimed, f"job id {claimed.job_id} already exists")
            return
        if isinstance(parsed, JobFileError):
            await self._reject(claimed, str(parsed))
            return
        if isinstance(parsed, Exception):
            raise parsed  # not the job file's fault: see _cannot_take
        assert parsed is not None
        spec = parsed
        async with self.inserting:
            await self._insert(
                spec, claimed.job_id, digest, reason="job file accepted", pinned=pinned
            )
        spent.append(claimed)
        self.once.over(claimed.original_name)
        log.info(
            "job queued",
            job_id=claimed.job_id,
            state="queued",
            name=spec.name,
            file=claimed.original_name,
        )

    async def _insert(
        self,
        spec: JobSpec,
        job_id: str,
        digest: str,
        *,
        reason: str,
        schedule_run: ScheduleRun | None = None,
        pinned: Pinned | None = None,
    ) -> bool:
        """The job queued on `pinned` (the config it was checked against; by default the
        one in force), in its own transaction."""
        pinned = pinned or self.pinned()
        tasks = [("activity", a.name) for a in spec.activities]
        tasks += [("storage", t) for t in spec.targets(pinned.config)]
        job = NewJob(
            id=job_id,
            name=spec.name,
            spec=spec.model_dump_json(),
            spec_sha256=digest,
            config=pinned.snapshot,
            config_digest=pinned.digest,
            not_before=as_datetime(spec.not_before_utc()),
            tasks=tuple(tasks),
        )
        try:
            made = await self.svc.store.insert_job(job, reason=reason, schedule_run=schedule_run)
        except Exception as exc:
            if schedule_run is not None:
                raise  # the scheduler's to handle
            # the queue's error, not the file's: it waits in active/ for the next poll
            raise TransientError(f"the queue: {describe(exc)}") from exc
        if not made:
            return False
        self.svc.metrics.transition(State.UNINITIALIZED)
        self.svc.metrics.transition(State.QUEUED)
        return True

    async def _reject(self, entry: Claimed, reason: str) -> None:
        # one at a time: the entries of a batch are taken at once, and two of them may
        # be meant for one name in corrupt/ (long names shortened alike), which the
        # first to get there takes
        async with self.rejecting:
            target = await self.spool.reject(entry, reason)
        self.once.over(entry.original_name)
        log.error(
            "job file rejected",
            file=printable(entry.original_name),
            moved_to=printable(str(target)),
            reason=reason,
        )
