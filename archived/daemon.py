"""The long-running process: lock, ingest the spool, claim due jobs, run them.

One task group holds the poll loop, the signal handler and one task per running
job. `max_concurrent_jobs` bounds the jobs in processing states; activity and
storage tasks are bounded across all jobs by the limiters in `Services`.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import signal
from datetime import UTC, datetime

import anyio
import structlog
from anyio.abc import TaskGroup

from . import children, preflight
from . import config as configmod
from .audit import Auditor
from .config import Config
from .drivers import open_storage
from .errors import (
    ArchivedError,
    ConfigError,
    JobFileError,
    Kind,
    TargetUnavailable,
    classify,
    describe,
)
from .jobfile import JobSpec, parse_job, read_job_file
from .keys import KeyRing, load_signing_key
from .lock import lock_state_dir
from .metrics import Stored, write_textfile
from .notify import Notifier
from .orphans import remove_orphans
from .retention import expire_due
from .runner import JobRunner, Services
from .schedules import Scheduler, iso
from .spool import Claimed, Spool, new_job_id, printable
from .states import FINAL, PROCESSING, STOPPABLE, State
from .store import (
    Claim,
    Job,
    LeaseLost,
    NewJob,
    ScheduleRun,
    StaleState,
    as_datetime,
    now_iso,
    open_store,
)
from .timestamp import load_ca_bundle
from .wakeup import SpoolWatch

log = structlog.get_logger("archived.daemon")


async def check_targets(config: Config) -> tuple[list[str], list[str]]:
    """Problems (the target can never work as configured) and warnings (it cannot be
    reached now: an unmounted disk, a missing marker, an endpoint off the network)."""
    problems: list[str] = []
    warnings: list[str] = []
    roots = {}
    for name in config.storage:
        driver = open_storage(config, name)
        if driver.local_root is not None:
            roots[name] = driver.local_root
        try:
            await driver.ready()
        except TargetUnavailable as exc:
            warnings.append(f"{exc}; jobs that store there wait for it")
        except ConfigError as exc:
            problems += exc.problems
    problems += preflight.path_problems(config, roots)
    return problems, warnings


async def check_config(config: Config, *, key: bool = True) -> list[str]:
    """Everything a config needs beyond its schema: targets usable, directories apart,
    programs there, signing key readable. ConfigError names every problem; returns the
    warnings (targets that cannot be reached now)."""
    problems, warnings = await check_targets(config)
    problems += preflight.program_problems(config)
    if key:
        try:
            await anyio.to_thread.run_sync(load_signing_key, config)
        except ConfigError as exc:
            problems += exc.problems
    if config.signing.tsa_ca is not None:
        try:
            load_ca_bundle(config.signing.tsa_ca)
        except ArchivedError as exc:
            problems.append(f"signing.tsa_ca: {exc}")
    if problems:
        raise ConfigError(*problems)
    return warnings


def log_unavailable(warnings: list[str]) -> None:
    for warning in warnings:
        log.warning("storage target unavailable", reason=warning)


def shared_storage_warnings(config: Config) -> list[str]:
    """With a PostgreSQL queue, every daemon writes every target, and a daemon that
    takes a job over removes what the dead one stored: a local directory is only right
    if it is one network file system, mounted at the same path on every host."""
    if not config.queue.url:
        return []
    return [
        f"storage.{name}: a localdir target with a PostgreSQL queue: every host must mount "
        f"the same shared file system at {config.storage_options(name).get('path')}"
        for name, section in sorted(config.storage.items())
        if section.driver == "localdir"
    ]


QUEUE_PROBLEM = "\0queue"  # the key of the queue's problem among those said once


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.spool = Spool(config.daemon.spool_dir)
        self.running: dict[str, JobRunner] = {}
        self.whole_job: dict[str, anyio.CancelScope] = {}  # what shutdown cancels at the end
        self.wake = anyio.Event()
        self.reload_requested = anyio.Event()
        self.reloaded = anyio.Event()  # set (and replaced) by every reload that applied
        self.notify = Notifier()
        self.last_reload = "none"
        self.said: dict[str, str] = {}  # spool errors already logged, by entry name
        # jobs whose runner stopped on an error of the queue that may pass (its disk full):
        # run again from what the queue says once it answers, as a restart would
        # (when to try, the delay after that), doubling up to retry.backoff_max
        self.stalled: dict[str, tuple[float, float]] = {}
        self.until_idle = False  # run_until_idle(): stop once there is nothing to do

    async def run_until_idle(self) -> None:
        """Burst mode, in this process (tests): what `run()` does, but return once
        nothing runs, nothing is due or waiting to retry, and the spool is empty. No
        signal handler is installed: the caller's stay in force."""
        self.until_idle = True
        await self.run()

    async def run(self) -> None:
        config = self.config
        lock = lock_state_dir(config.daemon.state_dir)
        try:
            self.spool.create()
            # fail at start, not at the first job's sign step; an unreachable target is
            # no reason not to start (the others work): jobs wait for it
            log_unavailable(await check_config(config))
            for warning in shared_storage_warnings(config):
                log.warning("storage target not shared?", reason=warning)
            store = await open_store(config)
            assert store is not None
            try:
                self.svc = Services(
                    store=store,
                    state_dir=config.daemon.state_dir,
                    keys=KeyRing(),
                    activity_slots=anyio.CapacityLimiter(config.limits.activity_tasks),
                    storage_slots=anyio.CapacityLimiter(config.limits.storage_tasks),
                    hash_threads=anyio.CapacityLimiter(config.limits.hash_threads),
                )
                await self._serve()
            finally:
                await store.close()
        finally:
            self.notify.close()
            lock.close()
        log.info("stopped")

    async def _serve(self) -> None:
        store = self.svc.store
        async with anyio.create_task_group() as tg:
            if not self.until_idle:
                tg.start_soon(self._signals)
            if store.shared:
                tg.start_soon(self._heartbeat)
                tg.start_soon(store.listen, lambda: self.wake.set())
            await self._ingest_leftovers()
            resumed = await store.resumable()
            await self._remove_stale_staging()
            for job in resumed:
                self._start(tg, job)  # resume what a previous run left in flight
            log.info(
                "ready",
                state_dir=str(self.config.daemon.state_dir),
                spool_dir=str(self.config.daemon.spool_dir),
                targets=sorted(self.config.storage),
                host_id=store.host_id,
                queue="postgresql" if store.shared else "sqlite",
            )
            self.notify.ready(await self._status())
            tg.start_soon(self._reloader)
            tg.start_soon(self._watch_spool)
            if self.notify.watchdog_seconds:
                tg.start_soon(self._watchdog, self.notify.watchdog_seconds)
            tg.start_soon(self._metrics_writer)
            tg.start_soon(self._auditor)
            tg.start_soon(self._retention)
            status = ""
            scheduler = Scheduler(self.svc.store, self._create_scheduled)
            while not self.svc.stopping.is_set():
                try:
                    await self._ingest()
                    await scheduler.tick(self.config)
                    await self._handle_cancel_requests(tg)
                    await self._restart_stalled(tg)
                    while len(self.running) < self.config.daemon.max_concurrent_jobs:
                        config = self.config
                        claim = await store.claim_next(
                            config.snapshot(), config.digest, busy=set(self.running)
                        )
                        if claim is None:
                            break
                        self._claimed(claim)
                        self._start(tg, claim.job)
                    if self.until_idle and await self._idle():
                        self.svc.stopping.set()
                        self.wake.set()
                    if (new_status := await self._status()) != status:
                        status = new_status
                        self.notify.status(status)
                    self.said.pop(QUEUE_PROBLEM, None)
                except Exception as exc:  # the queue's disk full, its server gone: wait
                    if classify(exc) != Kind.RECOVERABLE:
                        raise
                    self._say_once(QUEUE_PROBLEM, "the queue cannot be written now; waiting", exc)
                with anyio.move_on_after(self.config.daemon.poll_interval):
                    await self.wake.wait()
                self.wake = anyio.Event()
            self.notify.stopping()
            await self._drain()
            tg.cancel_scope.cancel()

    async def _idle(self) -> bool:
        """Nothing runs, nothing waits to run again, the spool holds nothing to take."""
        if self.running or self.stalled or await self.spool.pending():
            return False
        states = await self.svc.store.job_states()
        return not any(state in PROCESSING for state in states.values())

    async def _watch_spool(self) -> None:
        watch = SpoolWatch.open(self.spool.incoming)
        if watch is None:
            log.info(
                "no inotify for the spool: polling it only", every=self.config.daemon.poll_interval
            )
            return
        await watch.run(lambda: self.wake.set())

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

    async def _heartbeat(self) -> None:
        """Several daemons on the queue: renew the leases on our jobs every lease/3, and
        stop at once each job another daemon took over, or whose lease we could not
        renew in time (the database out of reach: another daemon may take it over)."""
        store = self.svc.store
        while True:
            await anyio.sleep(self.config.queue.lease / 3)
            try:
                mine: set[str] | None = await store.renew_leases()
            except Exception as exc:
                log.warning("cannot renew the leases on our jobs", error=describe(exc))
                mine = None
            for job_id, runner in list(self.running.items()):
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

    async def _status(self) -> str:
        counts = await self.svc.store.job_counts()
        busy = sum(n for state, n in counts.items() if State(state) in PROCESSING)
        return (
            f"{busy} processing, {counts.get('queued', 0)} queued, "
            f"{counts.get('completed', 0)} completed, {counts.get('failed', 0)} failed; "
            f"last reload: {self.last_reload}"
        )

    # -- reload, watchdog, metrics -----------------------------------------------------

    async def _reloader(self) -> None:
        """One reload at a time; SIGHUPs that arrive during one are coalesced into one more."""
        while True:
            await self.reload_requested.wait()
            self.reload_requested = anyio.Event()
            self.notify.reloading()
            try:
                await self._reload()
            finally:
                self.notify.ready(await self._status())

    async def _reload(self) -> None:
        path = self.config.source
        stamp = now_iso()[:19] + "Z"
        try:
            if path is None:
                raise ConfigError("running on the embedded default: there is no file to reload")
            new = await anyio.to_thread.run_sync(configmod.load, path)
            for fixed in ("state_dir", "spool_dir"):
                if getattr(new.daemon, fixed) != getattr(self.config.daemon, fixed):
                    raise ConfigError(f"daemon.{fixed} cannot change on reload; restart instead")
            if new.queue != self.config.queue:
                raise ConfigError("[queue] cannot change on reload; restart instead")
            warnings = await check_config(new)
        except ArchivedError as exc:
            self.last_reload = f"rejected at {stamp}: {exc}"
            self.svc.metrics.reloads["rejected"] += 1
            log.error("reload rejected; the old config stays in force", reason=str(exc))
            return
        log_unavailable(warnings)
        self.config = new
        self.svc.keys.clear()
        self.svc.activity_slots.total_tokens = new.limits.activity_tasks
        self.svc.storage_slots.total_tokens = new.limits.storage_tasks
        self.svc.hash_threads.total_tokens = new.limits.hash_threads
        self.last_reload = f"ok at {stamp} (config {new.digest})"
        self.svc.metrics.reloads["ok"] += 1
        log.info("config reloaded", digest=new.digest, targets=sorted(new.storage))
        self.wake.set()
        self.reloaded.set()
        self.reloaded = anyio.Event()

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 only while the event loop turns and the database answers."""
        while True:
            with anyio.move_on_after(interval / 2):
                await self.svc.store.ping()
                self.notify.watchdog()
            await anyio.sleep(interval / 2)

    async def _auditor(self) -> None:
        """Periodic fixity audits, `audit.copies_per_round` copies every `audit.interval`.

        A round is due one interval after the last audit the database knows of (so a
        restart does not put it off), or after this process's last round. A reload
        wakes this loop: audits turned on, or an interval shortened, apply at once.
        """
        last_round: datetime | None = None
        while True:
            reloaded = self.reloaded
            audit = self.config.audit
            wait = math.inf
            if audit.interval > 0:
                known = await self.svc.store.last_audited()
                last = max([t for t in (known, last_round) if t is not None], default=None)
                now = datetime.now(UTC)
                wait = 0 if last is None else (last - now).total_seconds() + audit.interval
                if wait <= 0:
                    last_round = now
                    await self._audit_round()
                    continue
            with anyio.move_on_after(wait):
                await reloaded.wait()

    async def _audit_round(self) -> None:
        audit = self.config.audit
        auditor = Auditor(self.svc.store, self.config, self.config.daemon.state_dir / "audit")
        try:
            async with self.svc.store.leading("audit") as leader:
                if leader:  # else another daemon on the queue runs this round
                    await auditor.round(
                        copies=audit.copies_per_round, max_bytes=audit.bytes_per_round
                    )
        except Exception:
            log.exception("audit round failed; the next one runs as planned")

    async def _retention(self) -> None:
        while True:
            await anyio.sleep(self.config.retention.check_interval)
            try:
                async with self.svc.store.leading("retention") as leader:
                    deleted = []
                    if leader:  # else another daemon on the queue runs this round
                        await remove_orphans(self.svc.store, self.config)
                        deleted = await expire_due(self.svc.store, self.config)
            except Exception:
                log.exception("retention round failed; the next one tries again")
                continue
            for job_id in deleted:
                self.svc.metrics.transition(State.DELETED)
                log.info("job deleted by retention", job_id=job_id, state="deleted")

    async def _metrics_writer(self) -> None:
        while True:
            textfile = self.config.metrics.textfile
            if textfile is not None:
                text = self.svc.metrics.render(await Stored.read(self.svc.store, self.config))
                try:
                    await anyio.to_thread.run_sync(write_textfile, textfile, text)
                except OSError as exc:
                    log.warning("cannot write metrics", path=str(textfile), error=str(exc))
            await anyio.sleep(self.config.metrics.interval)

    def _start(self, tg: TaskGroup, job: Job) -> None:
        job_id = job.id
        runner = JobRunner(self.svc, job)
        self.running[job_id] = runner
        whole = self.whole_job[job_id] = runner.whole = anyio.CancelScope()

        async def run() -> None:
            try:
                with whole:
                    await runner.run()
            except Exception as exc:
                if classify(exc) == Kind.RECOVERABLE:
                    retry = self.config.retry
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
                self.running.pop(job_id, None)
                self.whole_job.pop(job_id, None)
                self.wake.set()
            if runner.lost:  # our staging of it is of no use to the daemon that has it now
                await self._remove_stale_staging(job_id)

        tg.start_soon(run)

    async def _restart_stalled(self, tg: TaskGroup) -> None:
        store = self.svc.store
        for job_id, (due, delay) in sorted(self.stalled.items()):
            if len(self.running) >= self.config.daemon.max_concurrent_jobs:
                return
            if due > anyio.current_time():
                continue
            job = await store.job(job_id)
            if (
                job is None
                or job.state not in PROCESSING
                or job.state == State.RECOVERABLE_ERROR  # the claim takes it when due
                or (store.shared and job.owner != store.host_id)  # taken over meanwhile
                or job_id in self.running
            ):
                del self.stalled[job_id]
                continue
            self.stalled[job_id] = (float("inf"), delay)  # the delay doubles if it stops again
            log.info("job resumes: the queue answers again", job_id=job_id, state=job.state.value)
            self._start(tg, job)

    async def _handle_cancel_requests(self, tg: TaskGroup) -> None:
        """`archived cancel` sets a flag in the database; act on it here."""
        store = self.svc.store
        for job in await store.cancel_requests():
            if job.id in self.running:
                self.running[job.id].cancel()
            elif job.state in (State.QUEUED, State.RECOVERABLE_ERROR):  # no daemon runs it
                try:
                    job = await store.cancel_waiting(job)
                except StaleState:
                    continue
                self.svc.metrics.transition(State.FAILURE)
                self._start(tg, job)  # failure -> error_handling -> cleanup -> failed

    async def _remove_stale_staging(self, only: str | None = None) -> None:
        """Staging of jobs that are final (or unknown) is left over from a crash; with
        several daemons, so is the staging of jobs another daemon runs now."""
        staging = self.config.daemon.state_dir / "staging"
        if not staging.is_dir():
            return
        store = self.svc.store
        for entry in staging.iterdir():
            if only is not None and entry.name != only:
                continue
            job = await store.job(entry.name)
            stale = job is None or job.state in FINAL
            if store.shared and job is not None:
                stale = stale or job.owner != store.host_id
            if stale:
                log.info("removing stale staging", job_id=entry.name)
                await anyio.to_thread.run_sync(shutil.rmtree, entry, True)

    async def _drain(self) -> None:
        """Let running steps finish within shutdown_grace, then cancel them."""
        with anyio.move_on_after(self.config.daemon.shutdown_grace):
            while self.running:
                await anyio.sleep(0.05)
        for job_id, runner in list(self.running.items()):
            if runner.scope is not None and runner.state in STOPPABLE:
                runner.scope.cancel()  # the step gives its attempt back
            else:  # the failure path (a hook, cleanup): it runs again at the next start
                self.whole_job[job_id].cancel()
        while self.running:
            await anyio.sleep(0.01)

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log.info("reload requested", signal=name)
                    self.reload_requested.set()
                    continue
                if self.svc.stopping.is_set():
                    log.warning("second signal: exiting now, running work abandoned", signal=name)
                    children.kill_all()
                    os._exit(128 + signum)  # not 0: work was abandoned
                log.info("stopping: no new work", signal=name, running=len(self.running))
                self.svc.stopping.set()
                self.wake.set()

    # -- the spool ---------------------------------------------------------------------

    async def _ingest_leftovers(self) -> None:
        for claimed in await self.spool.leftovers():
            await self._accept_or_reject(claimed)

    async def _ingest(self) -> None:
        """Take every entry of incoming/; an error with one is about that entry only."""
        try:
            await self._ingest_leftovers()  # after a crash, or an error worth another try
            names = await self.spool.pending()
        except OSError as exc:
            self._say_once("", "cannot read the spool; trying again", exc)
            await anyio.to_thread.run_sync(self.spool.create)  # an operator removed a folder?
            return
        for name in names:
            if self.svc.stopping.is_set():
                return
            try:
                claimed = await self.spool.claim(name)
            except OSError as exc:
                entry = Claimed(self.spool.incoming / name, new_job_id(), name)
                await self._cannot_take(entry, exc)
                continue
            if claimed is not None:
                await self._accept_or_reject(claimed)

    async def _accept_or_reject(self, claimed: Claimed) -> None:
        try:
            await self._accept(claimed)
        except Exception as exc:
            await self._cannot_take(claimed, exc)

    async def _cannot_take(self, entry: Claimed, exc: Exception) -> None:
        """Into corrupt/ with the reason, unless the error may pass (EMFILE, ENOSPC, EBUSY,
        ...): then it stays for the next poll. What cannot be moved is said once, skipped."""
        if isinstance(exc, FileNotFoundError):
            return  # gone: taken by someone else, or removed
        if classify(exc) == Kind.RECOVERABLE:
            self._say_once(entry.original_name, "cannot take a spool entry now; trying again", exc)
            return
        reason = f"cannot take it: {describe(exc)}"
        if not isinstance(exc, OSError):  # a bug: its traceback, and no crash loop
            log.exception("error while reading a job file", file=printable(entry.original_name))
            reason = f"internal error while reading it: {describe(exc)}"
        try:
            await self._reject(entry, reason)
        except FileNotFoundError:
            return
        except Exception as again:  # a bug's too: about this entry only, no crash loop
            self._say_once(entry.original_name, "cannot move a spool entry to corrupt/", again)

    def _say_once(self, key: str, message: str, exc: BaseException) -> None:
        """Log an error that every poll would meet again, once for as long as it lasts."""
        error = describe(exc)
        if self.said.get(key) != error:
            self.said[key] = error
            where = {} if key == QUEUE_PROBLEM else {"file": printable(key)}
            log.error(message, error=error, **where)

    async def _accept(self, claimed: Claimed) -> None:
        """Turn a claimed spool file into a queued job, or move it to corrupt/."""
        store, config = self.svc.store, self.config
        try:
            data = await anyio.to_thread.run_sync(
                read_job_file, claimed.path, config.limits.max_job_file_bytes
            )
        except JobFileError as exc:
            await self._reject(claimed, str(exc))
            return
        digest = hashlib.sha256(data).hexdigest()
        known = await store.job(claimed.job_id)
        if known is not None:
            if known.spec_sha256 == digest:
                await self.spool.done(claimed)  # inserted before a crash; the file is spent
            else:
                await self._reject(claimed, f"job id {claimed.job_id} already exists")
            return
        try:
            spec = parse_job(data, claimed.original_name, config)
        except JobFileError as exc:
            await self._reject(claimed, str(exc))
            return
        await self._insert(spec, claimed.job_id, digest, reason="job file accepted")
        await self.spool.done(claimed)
        self.said.pop(claimed.original_name, None)
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
    ) -> bool:
        config = self.config
        tasks = [("activity", a.name) for a in spec.activities]
        tasks += [("storage", t) for t in spec.targets(config)]
        job = NewJob(
            id=job_id,
            name=spec.name,
            spec=spec.model_dump_json(),
            spec_sha256=digest,
            config=config.snapshot(),
            config_digest=config.digest,
            not_before=as_datetime(spec.not_before_utc()),
            tasks=tuple(tasks),
        )
        if not await self.svc.store.insert_job(job, reason=reason, schedule_run=schedule_run):
            return False
        self.svc.metrics.transition(State.UNINITIALIZED)
        self.svc.metrics.transition(State.QUEUED)
        return True

    async def _create_scheduled(
        self, spec: JobSpec, job_id: str, digest: str, run: ScheduleRun
    ) -> bool:
        made = await self._insert(
            spec,
            job_id,
            digest,
            schedule_run=run,
            reason=f"created by schedule {run.schedule} for {iso(run.slot)}",
        )
        self.wake.set()
        return made

    async def _reject(self, entry: Claimed, reason: str) -> None:
        target = await self.spool.reject(entry, reason)
        self.said.pop(entry.original_name, None)
        log.error(
            "job file rejected",
            file=printable(entry.original_name),
            moved_to=printable(str(target)),
            reason=reason,
        )
