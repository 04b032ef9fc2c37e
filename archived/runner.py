"""Runs one job through the state machine, one committed step at a time.

`JobRunner.run()` reads the job's state, calls that state's handler, and commits the
transition the handler's event leads to (see states.py). Because every step starts
from what the database says, a restarted daemon resumes a job by simply running it
again: finished tasks are skipped, finished post-processing steps are skipped.

A job that must wait to retry (`recoverable_error`, a cleanup backing off) ends its
runner and holds no slot: the store's claim hands it back when its `retry_at` has come.
With several daemons on one queue, a runner whose daemon lost the job's lease (another
daemon took it over) stops at once, writing nothing more about it (see store_pg.py).
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import tarfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import structlog

from . import bag, children, failpoints, orphans
from .config import Config
from .drivers import activity_driver, open_storage
from .drivers.base import (
    ActivityContext,
    ActivityDriver,
    ArtifactWriter,
    Digest,
    Estimate,
    Lock,
    StorageDriver,
    file_sha256,
    parts_size,
    require_space,
)
from .errors import IntegrityError, Kind, StorageError, classify, describe
from .jobfile import JobSpec, check_against
from .keys import KeyRing
from .metrics import Metrics
from .names import Collisions
from .progress import Report
from .retention import expiry, hold_copies
from .states import FINAL, RETRY_EVENT, STOPPABLE, Event, State
from .store import (
    Copy,
    Job,
    LeaseLost,
    NewCopy,
    StaleState,
    Store,
    Task,
    iso,
    lease_lost,
    now_iso,
    utcnow,
)
from .timestamp import request_token

log = structlog.get_logger("archived.runner")


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
    event: Event
    reason: str
    fields: dict[str, Any] = field(default_factory=dict)


class AttemptsExhausted(Exception):
    pass


POST_STEPS = ("check_integrity", "calculate_checksums", "sign")
COLLISIONS_SHOWN = 100  # sets of colliding names a job's warning event lists


def boot_id() -> str:
    """Which start of the machine this is (Linux); staging from another may have holes."""
    if override := os.environ.get("ARCHIVED_BOOT_ID"):  # tests: as if the machine restarted
        return override
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class JobRunner:
    def __init__(self, svc: Services, job: Job) -> None:
        self.svc, self.job = svc, job
        self.id = job.id
        self.config = Config.from_snapshot(job.config)
        self.spec = JobSpec.model_validate_json(job.spec)
        self.staging = svc.state_dir / "staging" / self.id
        self.bag_dir = self.staging / "bag"  # the tag files
        self.records_dir: Path = self.staging / "records"  # per activity: sha256 size path
        self.parts_dir: Path = self.staging / "parts"  # per activity: its tar fragment
        self.head = self.staging / "head.tar"  # the tag files' tar members
        self.end = self.staging / "end.tar"
        self.last_error: BaseException | None = None
        self.scope: anyio.CancelScope | None = None
        self.whole: anyio.CancelScope | None = None  # the daemon's scope around run()
        self.canceled = False
        self.lost = False  # another daemon took the job over: touch nothing of it
        self.attempt_begun = False
        self.step_events: list[tuple[str, dict[str, Any]]] = []
        self.estimates: dict[str, Estimate] = {}  # by activity, from the space check
        self.handlers: dict[State, Callable[[], Awaitable[Outcome | None]]] = {
            State.ACTIVITY_ARCHIVING: self.activity_archiving,
            State.POST_PROCESSING: self.post_processing,
            State.STORE: self.store,
            State.ERROR: self.classify_error,
            State.FAILURE: self.failure,
            State.ERROR_HANDLING: self.error_handling,
            State.CLEANUP: self.cleanup,
        }

    @property
    def state(self) -> State:
        return self.job.state

    @property
    def bag_name(self) -> str:
        """`<name>-<job id>-<UTC start>`: fixed when the job first starts, since the
        activities write it into their tar members (and kept when a retry stores the
        archive of an earlier start)."""
        if self.job.archive_name:
            return self.job.archive_name.removesuffix(".tar")
        started = self.job.started_at or utcnow()
        return f"{self.spec.name}-{self.id}-{started.strftime('%Y%m%dT%H%M%SZ')}"

    def _fragment(self, activity: str) -> Path:
        return self.parts_dir / f"{activity}.tar"

    def _records_of(self, activity: str) -> Path:
        return self.records_dir / f"{activity}.records"

    def _archive_parts(self) -> list[Path]:
        """The files whose concatenation is the archive, in order."""
        fragments = [self._fragment(a.name) for a in self.spec.activities]
        return [self.head, *fragments, self.end]

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
                return  # shutting down: the next start resumes from this state
            try:
                new = await self.svc.store.transition(
                    self.id, state, outcome.event, outcome.reason, **outcome.fields
                )
            except StaleState:
                log.warning("job moved under us; re-reading")
                new = state
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
            job = await self.svc.store.job(self.id)
            assert job is not None
            self.job = job

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
        self.attempt_begun = False
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
        if self.attempt_begun:  # shutdown is not the step's fault: give the attempt back
            await self.svc.store.update_job(self.id, attempts=self.job.attempts - 1)
        return None

    async def _abandon_executing_tasks(self) -> None:
        await self.svc.store.abandon_tasks(self.id)

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

    async def _begin_attempt(self, phase: State) -> None:
        """Count an attempt of `phase` before doing anything, so a crash counts too."""
        attempts = self.job.attempts + 1 if self.job.phase == phase else 1
        await self.svc.store.update_job(self.id, phase=phase.value, attempts=attempts)
        self.job = self.job.replace(phase=phase.value, attempts=attempts)
        self.attempt_begun = True
        if attempts > self.config.retry.max_attempts:
            raise AttemptsExhausted(f"{phase}: {attempts - 1} attempts used up")

    async def _event(self, kind: str, **detail: Any) -> None:
        await self.svc.store.add_event(self.id, kind, detail)

    def _step_event(self, kind: str, **detail: Any) -> None:
        """An event committed with the post-processing step that logs it (once, even if
        the daemon dies in between and the step runs again)."""
        self.step_events.append((kind, detail))

    async def _tasks(self, kind: str) -> list[Task]:
        return await self.svc.store.tasks(self.id, kind)

    async def _run_tasks(
        self,
        kind: str,
        slots: anyio.CapacityLimiter,
        work: Callable[[str], Awaitable[dict[str, Any]]],
        copy: Callable[[dict[str, Any]], NewCopy] | None = None,
    ) -> None:
        """Run every unfinished task of `kind` concurrently; raise the first failure.

        `copy` makes the copy a finished storage task wrote of its result, recorded in
        the transaction that marks the task done.
        """
        pending = [t.name for t in await self._tasks(kind) if t.state != "completed"]
        failures: list[BaseException] = []
        store = self.svc.store

        async def one(name: str) -> None:
            async with slots:
                await store.start_task(self.id, kind, name)
                try:
                    result = await work(name)
                except Exception as exc:
                    if lease_lost(exc):
                        raise
                    failures.append(exc)
                    await store.finish_task(self.id, kind, name, error=describe(exc))
                    return
                made = copy(result) if copy is not None else None
                await store.finish_task(self.id, kind, name, result=result, copy=made)

        async with anyio.create_task_group() as tg:
            for name in pending:
                tg.start_soon(one, name)
        if failures:
            raise failures[0]

    # -- activity_archiving ------------------------------------------------------------

    async def activity_archiving(self) -> Outcome:
        await self._begin_attempt(State.ACTIVITY_ARCHIVING)
        # The job may start on a newer config than it was accepted under (SIGHUP).
        check_against(self.spec, self.config)
        await self._sync_storage_tasks()
        await failpoints.reach("activity_archiving")
        await self._check_staging_space()
        await self._run_tasks("activity", self.svc.activity_slots, self._activity)
        return Outcome(Event.DONE, "every activity task completed")

    async def _sync_storage_tasks(self) -> None:
        """One storage task per target the job stores to under the config it runs on."""
        await self.svc.store.sync_storage_tasks(self.id, self.spec.targets(self.config))

    def _driver(self, name: str) -> ActivityDriver:
        activity = next(a for a in self.spec.activities if a.name == name)
        driver_cls = activity_driver(activity.driver)
        return driver_cls(name, driver_cls.options(activity.options()))

    def _writer(self, name: str) -> ArtifactWriter:
        return ArtifactWriter(self._fragment(name), self.bag_name, name, self._records_of(name))

    async def _check_staging_space(self) -> None:
        """NoSpace (recoverable) before anything is staged, when the staging file system
        has less room than the unfinished activities' sources will take there. What the
        drivers know of their sources is kept: their progress is shown against it."""
        pending = [t.name for t in await self._tasks("activity") if t.state != "completed"]
        needed = 0
        for name in pending:
            await anyio.to_thread.run_sync(self._clear_activity, self._writer(name))
            estimate = await anyio.to_thread.run_sync(
                self._driver(name).estimate,
                f"{self.bag_name}/data/{name}/",
                limiter=self.svc.hash_threads,
            )
            if estimate is not None:
                self.estimates[name] = estimate
                needed += estimate.staged
        if needed:
            await anyio.to_thread.run_sync(self._require_staging_space, needed)

    def _require_staging_space(self, needed: int) -> None:
        self.staging.mkdir(parents=True, exist_ok=True)
        require_space(self.staging, needed, "staging")

    async def _activity(self, name: str) -> dict[str, Any]:
        writer = self._writer(name)
        await anyio.to_thread.run_sync(self._clear_activity, writer)
        driver = self._driver(name)
        ctx = ActivityContext(self.id, self.config, writer, self.svc.hash_threads)
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._report_progress, name, writer)
            try:
                await failpoints.reach("activity_task")
                result = await driver.run(ctx)
            except Exception as exc:  # raised as itself below, not inside an ExceptionGroup
                error = exc
            finally:
                writer.close()
            tg.cancel_scope.cancel()
        if error is not None:
            raise error
        if ctx.notes:
            await self._event(
                "activity_notes", activity=name, notes=ctx.notes[:1000], count=len(ctx.notes)
            )
        log.info("activity task completed", activity=name, **result)
        return {**result, "boot": boot_id()}

    async def _report_progress(self, name: str, writer: ArtifactWriter) -> None:
        """At once and then every second, how far the task has come against what its
        driver knew of the source, for `archived show` and `archived submit --wait`."""
        since = now_iso()
        estimate = self.estimates.get(name, Estimate(0))
        while True:
            report = Report(
                writer.files, writer.moved, estimate.files, estimate.bytes, since, now_iso()
            )
            await self.svc.store.task_progress(self.id, "activity", name, report.dumps())
            await anyio.sleep(1)

    @staticmethod
    def _clear_activity(writer: ArtifactWriter) -> None:
        """Remove what an unfinished earlier try of this task left behind."""
        for path in (writer.fragment, writer.spool, writer.records_path):
            path.unlink(missing_ok=True)
        writer.records_path.with_name(writer.records_path.name + ".part").unlink(missing_ok=True)

    # -- post_processing ---------------------------------------------------------------

    def _records(self) -> list[Path]:
        return [self._records_of(a.name) for a in self.spec.activities]

    async def post_processing(self) -> Outcome:
        await self._begin_attempt(State.POST_PROCESSING)
        done = self.job.step
        start = POST_STEPS.index(done) + 1 if done in POST_STEPS else 0
        for step in POST_STEPS[start:]:
            await failpoints.reach(step)
            self.step_events = []
            fields = await getattr(self, step)()
            await self.svc.store.finish_step(self.id, step, fields, self.step_events)
            self.job = self.job.replace(step=step, **fields)
            log.info("post-processing step done", step=step)
        return Outcome(Event.DONE, "integrity checked, checksums calculated, signed")

    async def check_integrity(self) -> dict[str, Any]:
        reported = await self._activity_results()
        checked = await anyio.to_thread.run_sync(
            self._check_integrity, reported, limiter=self.svc.hash_threads
        )
        reread = await self._reverify_after_restart(reported)
        self._step_event(
            "check_integrity",
            result="ok",
            files=checked[0],
            bytes=checked[1],
            **({"reread_after_restart": reread} if reread else {}),
        )
        return {}

    async def _activity_results(self) -> dict[str, dict[str, Any]]:
        return {t.name: t.result or {} for t in await self._tasks("activity")}

    async def _reverify_after_restart(self, reported: dict[str, dict[str, Any]]) -> list[str]:
        """Re-read, against their records, the fragments written before the machine
        last started: staging is not fsynced, so they may have holes. Returns the
        activities re-read; IntegrityError names the first file that does not match."""
        boot = boot_id()
        stale = [name for name, result in reported.items() if result.get("boot") != boot]
        for name in stale:
            log.warning("the machine restarted since this activity ran: re-reading", activity=name)
            try:
                await anyio.to_thread.run_sync(
                    bag.verify_fragment,
                    self._fragment(name),
                    self._records_of(name),
                    anyio.from_thread.check_cancelled,
                    limiter=self.svc.hash_threads,
                )
            except (IntegrityError, OSError, tarfile.TarError) as exc:
                raise IntegrityError(
                    f"activity {name}, staged before the machine restarted: {describe(exc)}; "
                    f"`archived retry {self.id}` archives it again"
                ) from exc
        return stale

    def _check_integrity(self, reported: dict[str, dict[str, Any]]) -> tuple[int, int]:
        """Each activity's records and fragment are what its task reported when it
        finished, and staging holds no fragment of anything else.

        Memory stays flat however many files there are: records are streamed.
        """
        fragments = {self._fragment(a.name).name for a in self.spec.activities}
        extra = sorted(set(os.listdir(self.parts_dir)) - fragments)
        if extra:
            raise IntegrityError(f"staging holds {extra[0]}, which no activity wrote")
        files = total = 0
        for activity in self.spec.activities:
            result = reported[activity.name]
            count = size = 0
            for fields in bag.record_fields([self._records_of(activity.name)]):
                count += 1
                size += int(fields[1])
            if (count, size) != (result["files"], result["bytes"]):
                raise IntegrityError(
                    f"activity {activity.name}: {count} files of {size} bytes recorded, "
                    f"{result['files']} files of {result['bytes']} bytes written"
                )
            try:
                staged = os.lstat(self._fragment(activity.name)).st_size
            except FileNotFoundError:
                raise IntegrityError(
                    f"activity {activity.name}: its tar fragment is gone"
                ) from None
            if staged != result["tar_bytes"]:
                raise IntegrityError(
                    f"activity {activity.name}: tar fragment has {staged} bytes staged, "
                    f"{result['tar_bytes']} written"
                )
            files += count
            total += size
        return files, total

    async def calculate_checksums(self) -> dict[str, Any]:
        def write() -> tuple[bag.Oxum, list[list[str]]]:
            self.bag_dir.mkdir(parents=True, exist_ok=True)
            oxum = bag.write_payload_manifest(self.bag_dir, self._records())
            info = bag.bag_info(
                job_id=self.id,
                bagging_date=datetime.now(UTC).date().isoformat(),
                oxum=oxum,
                metadata=self.spec.metadata,
                timestamped=bool(self.config.signing.tsa_url),
            )
            bag.write_tag_files(self.bag_dir, info=info)
            with Collisions(path=self.staging / "names.db") as names:
                names.add(bag.payload_paths(self._records()))
                return oxum, list(names.groups())

        oxum, collisions = await anyio.to_thread.run_sync(write, limiter=self.svc.hash_threads)
        self._step_event("calculate_checksums", algorithm="sha256", payload_oxum=str(oxum))
        if collisions:
            message = (
                f"{len(collisions)} sets of payload names differ only in case or Unicode "
                "normalization: bsdtar, and case-insensitive or normalizing file systems, "
                "keep one file of each set when they extract the archive"
            )
            log.warning(message, names=collisions[:10])
            self._step_event("warning", message=message, names=collisions[:COLLISIONS_SHOWN])
        return {"payload_files": oxum.files, "payload_bytes": oxum.bytes}

    async def sign(self) -> dict[str, Any]:
        bag_name = self.bag_name
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        secret = self.svc.keys.secret(self.config)
        events = await self._event_log()

        def sign_manifest() -> bytes:
            bag.write_events(self.bag_dir, events)
            manifest = bag.write_tag_manifest(self.bag_dir)
            signature = secret.sign(
                manifest,
                trusted_comment=(f"archived job {self.id} bag {bag_name} timestamp {stamp}"),
            )
            bag.write_atomic(self.bag_dir / bag.SIGNATURE, signature.encode())
            return manifest

        def seal(token: bytes | None) -> int:
            stale = self.bag_dir / bag.TIMESTAMP  # from an earlier try of this step
            if token is None:
                stale.unlink(missing_ok=True)
            else:
                bag.write_atomic(stale, token)
            bag.write_head(self.bag_dir, bag_name, self.head)
            bag.write_atomic(self.end, bag.END)
            return parts_size(self._archive_parts())

        manifest = await anyio.to_thread.run_sync(sign_manifest, limiter=self.svc.hash_threads)
        token = None
        signing = self.config.signing
        if signing.tsa_url:
            assert signing.tsa_ca is not None  # the config requires it with tsa_url
            stamped = await request_token(
                signing.tsa_url, manifest, ca=signing.tsa_ca, timeout=signing.tsa_timeout
            )
            token = stamped.response
            self._step_event(
                "timestamp",
                tsa=signing.tsa_url,
                gen_time=stamped.gen_time.isoformat(),
                serial=stamped.serial,
            )
        size = await anyio.to_thread.run_sync(seal, token, limiter=self.svc.hash_threads)
        log.info(
            "archive sealed",
            archive=bag_name + ".tar",
            size=size,
            key_id=secret.public_key().key_id_hex,
        )
        return {"archive_name": bag_name + ".tar", "archive_size": size}

    async def _event_log(self) -> list[dict[str, Any]]:
        history = await self.svc.store.history(self.id)
        events = await self.svc.store.events(self.id)
        lines: list[dict[str, Any]] = [
            {"type": "transition", "state": h.state, "at": iso(h.at), "reason": h.reason}
            for h in history
        ]
        lines += [{"type": e.kind, "at": iso(e.at), **e.detail} for e in events]
        lines.append({"type": "sign", "at": iso(utcnow()), "algorithm": "ed25519-minisign"})
        return sorted(lines, key=lambda e: str(e["at"]))

    # -- store -------------------------------------------------------------------------

    async def store(self) -> Outcome:
        """Every target's copy, while the archive's sha256 is computed from staging.

        The copies are checked against that digest only once written, so hashing the
        staged archive overlaps with writing them to disk (S3 waits for it up front).
        """
        await self._begin_attempt(State.STORE)
        await failpoints.reach("store")
        kept = await self.svc.store.copies(self.id, live=True)
        if kept and not self.head.exists():
            # an operator's retry of a job that failed with verified copies: the
            # archive comes from one of them, not from sources archived again
            parts = [await self._restore_archive(kept)]
        else:
            parts = self._archive_parts()
            if await self._reverify_after_restart(await self._activity_results()):
                # the tag files are fsynced, the head made of them is not: make it again
                await anyio.to_thread.run_sync(
                    bag.write_head, self.bag_dir, self.bag_name, self.head
                )
        digest: Digest = Future()
        # locked (where a target can) until the job's retention passes, never later
        lock = Lock(
            until=expiry(self.spec.retention_days, datetime.now(UTC)),
            legal_hold=self.job.legal_hold,
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._hash_archive, parts, digest)
            await self._run_tasks(
                "storage",
                self.svc.storage_slots,
                lambda target: self._store_one(target, parts, digest, lock),
                lambda stored: NewCopy(**stored),
            )
        await self._hold_if_changed_meanwhile(lock)
        return Outcome(
            Event.DONE,
            f"stored on {', '.join(self.spec.targets(self.config))}"
            ", every copy read back and verified",
            {"archive_sha256": digest.result()},
        )

    async def _restore_archive(self, kept: list[Copy]) -> Path:
        """The archive in staging again, fetched from a verified copy and checked
        against its digest; the next copy if one does not read back as recorded."""
        archive: Path = self.staging / "archive.tar"
        archive.unlink(missing_ok=True)
        await anyio.to_thread.run_sync(self._require_staging_space, self.job.archive_size or 0)
        problems = []
        for copy in kept:
            try:
                await self._storage(copy.target).fetch(self._key(), archive)
                got = await anyio.to_thread.run_sync(
                    file_sha256, archive, limiter=self.svc.hash_threads
                )
            except Exception as exc:
                problems.append(f"{copy.target}: {describe(exc)}")
                continue
            if got == (copy.sha256, copy.size):
                log.info("archive fetched from a kept copy", target=copy.target)
                return archive
            problems.append(f"{copy.target}: sha256 {got[0]} ({got[1]} bytes)")
        raise StorageError(
            "no kept copy reads back as recorded: " + "; ".join(problems), recoverable=True
        )

    def _key(self) -> str:
        return f"{self.spec.name}/{self.job.archive_name}"

    async def _hash_archive(self, parts: list[Path], digest: Digest) -> None:
        """Resolve `digest`, whatever happens: storage threads may be waiting for it.

        An error goes into `digest`, so each storage task fails with it (and is
        recorded so) rather than being cancelled under its feet.
        """
        try:
            packed = await anyio.to_thread.run_sync(
                bag.digest,
                parts,
                anyio.from_thread.check_cancelled,
                limiter=self.svc.hash_threads,
            )
        except Exception as exc:
            digest.set_exception(exc)
            return
        except BaseException:
            digest.set_exception(StorageError("cancelled", recoverable=True))
            raise
        if packed.size != self.job.archive_size:
            digest.set_exception(
                IntegrityError(
                    f"the staged archive has {packed.size} bytes, "
                    f"{self.job.archive_size} when it was sealed"
                )
            )
            return
        digest.set_result(packed.sha256)
        log.info("archive hashed", size=packed.size, sha256=packed.sha256)

    async def _hold_if_changed_meanwhile(self, lock: Lock) -> None:
        """A legal hold placed (or released) while the copies were written: `archived
        hold` sets the copies recorded when it ran, this the ones recorded since. Each
        reads what the other committed first, so no copy slips through."""
        job = await self.svc.store.job(self.id)
        if job is not None and job.legal_hold != lock.legal_hold:
            await hold_copies(self.svc.store, self.config, job, job.legal_hold)

    async def _store_one(
        self, target: str, parts: list[Path], digest: Digest, lock: Lock
    ) -> dict[str, Any]:
        driver = self._storage(target)
        self.svc.store.check_lease(self.id)  # a daemon that lost the job writes nothing
        copy = await driver.put(parts, self._key(), digest, self.job.archive_size or 0, lock)
        log.info("stored", target=target, path=copy.path)
        return {"path": copy.path, "size": copy.size, "sha256": copy.sha256}

    def _storage(self, target: str) -> StorageDriver:
        return open_storage(self.config, target)

    # -- the error path ----------------------------------------------------------------

    async def classify_error(self) -> Outcome:
        error = self.last_error
        attempts, limit = self.job.attempts, self.config.retry.max_attempts
        phase = self.job.phase
        if isinstance(error, AttemptsExhausted) or (
            error is not None and classify(error) == Kind.RECOVERABLE and attempts >= limit
        ):
            return Outcome(
                Event.EXHAUSTED,
                f"{phase}: gave up after {min(attempts, limit)} attempts",
                {"error": f"{self.job.error} (after {limit} attempts)"},
            )
        # Resumed after a crash in this state, the exception is gone: try again.
        if error is not None and classify(error) == Kind.FATAL:
            return Outcome(Event.FATAL, f"not recoverable: {self.job.error}")
        delay, retry_at = self._backoff(attempts)
        return Outcome(
            Event.RECOVERABLE,
            f"recoverable; attempt {attempts + 1} of {limit} in {delay:.1f}s",
            {"retry_at": retry_at},
        )

    def _backoff(self, attempts: int) -> tuple[float, datetime]:
        """How long to wait after `attempts` failed attempts, and until when. The job
        waits in the queue meanwhile, holding no slot: the claim takes it when due."""
        cap = min(self.config.retry.backoff_max, self.config.retry.backoff * 2 ** (attempts - 1))
        delay = random.uniform(0, cap)  # full jitter
        return delay, utcnow() + timedelta(seconds=delay)

    async def failure(self) -> Outcome:
        return Outcome(Event.HANDLED, f"failure: {self.job.error}")

    async def error_handling(self) -> Outcome:
        """Run hooks.on_failure once, bounded; a failing hook is logged, never retried."""
        argv = self.config.hooks.on_failure
        if not argv:
            return Outcome(Event.HANDLED, "no failure hook configured")
        env = {
            **os.environ,
            "ARCHIVED_JOB_ID": self.id,
            "ARCHIVED_JOB_NAME": self.spec.name,
            "ARCHIVED_FAILED_STATE": self.job.phase or "queued",
            "ARCHIVED_REASON": self.job.error or "",
        }
        try:
            code, stderr = await anyio.to_thread.run_sync(
                functools.partial(
                    children.run,
                    argv,
                    env=env,
                    timeout=self.config.hooks.timeout,
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
        await self._event("failure_hook", hook=argv, result=result)
        return Outcome(Event.HANDLED, f"failure hook {argv[0]}: {result}")

    async def cleanup(self) -> Outcome | None:
        """Remove staging (and, for a failed job, what it left on the targets).

        Never fatal, never stuck: an error is retried with backoff in this state; on the
        last attempt, or for an error no retry fixes, cleanup gives up on what is left,
        records it (orphans on targets are removed later), and the job reaches its
        final state all the same. A job whose copies were stored stays `completed`.
        """
        attempt = self.job.cleanup_attempts + 1  # counted before anything, as phases are
        await self.svc.store.update_job(self.id, cleanup_attempts=attempt)
        self.job = self.job.replace(cleanup_attempts=attempt)
        last = attempt >= self.config.retry.max_attempts
        failed = bool(self.job.error)
        # what an earlier attempt left on the targets (one taken over from a dead daemon)
        self.svc.store.check_lease(self.id)
        await orphans.remove_orphans(self.svc.store, self.config, job_id=self.id)
        try:
            await failpoints.reach("cleanup")
            if failed:
                await self._remove_failed_copies(last)
            await anyio.to_thread.run_sync(shutil.rmtree, self.staging, True)
        except Exception as exc:
            if not last and classify(exc) == Kind.RECOVERABLE:
                delay, retry_at = self._backoff(attempt)
                return Outcome(
                    Event.CLEANUP_FAILED,
                    f"cleanup: {describe(exc)}; attempt {attempt + 1} of "
                    f"{self.config.retry.max_attempts} in {delay:.1f}s",
                    {"retry_at": retry_at},
                )
            log.error("cleanup gave up", error=describe(exc), attempt=attempt)
            await self._event("cleanup_gave_up", error=describe(exc), attempt=attempt)
        done: dict[str, Any] = {"retry_at": None, "cleanup_attempts": 0}
        if failed:
            kept = [c.target for c in await self.svc.store.copies(self.id, live=True)]
            reason = "staging and partial copies removed"
            if kept:
                reason += f"; verified copies kept on {', '.join(sorted(kept))}"
            return Outcome(Event.CLEANED_AFTER_FAILURE, reason, done)
        if expires := expiry(self.spec.retention_days, utcnow()):
            done["expires_at"] = expires
        return Outcome(Event.CLEANED, "staging removed; every target holds a verified copy", done)

    async def _remove_failed_copies(self, last: bool) -> None:
        """What a failed job leaves on its targets: partial files always; verified copies
        only when the operator canceled it (a copy is never thrown away because another
        target failed). What cannot be removed now raises, to be retried, or on the
        `last` attempt (or when no retry would help) is recorded as an orphan."""
        if not self.job.archive_name:
            return  # never sealed, so never stored
        key = self._key()
        copies = {c.target for c in await self.svc.store.copies(self.id, live=True)}
        keep = copies if not self.job.cancel_requested else set()
        problems: list[tuple[str, Exception]] = []
        for target in sorted(set(self.spec.targets(self.config)) | copies):
            if target in keep:
                continue
            self.svc.store.check_lease(self.id)
            try:
                removed = await self._storage(target).delete(key)
            except Exception as exc:
                problems.append((target, exc))
                continue
            await self.svc.store.forget_copy(self.id, target)
            if removed:
                log.info("removed the copy of a failed job", target=target, key=key)
                await self._event("copy_removed", target=target, key=key)
        retry = [error for _, error in problems if classify(error) == Kind.RECOVERABLE]
        if retry and not last:
            raise retry[0]
        for target, error in problems:
            reason = describe(error)
            log.error("cannot remove from a target yet: orphan", target=target, key=key)
            await self.svc.store.record_orphan(self.id, target, key, reason)
