"""The long-running process: lock, ingest the spool, claim due jobs, run them.

One task group holds the poll loop, the signal handler, the housekeeping loops
(housekeeping.py) and one task per running job (running.py). Each poll turn takes the
spool's job files in (intake.py), creates the jobs schedules are due for, acts on
cancel requests and claims due jobs up to `max_concurrent_jobs`; activity and storage
tasks are bounded across all jobs by the limiters in `Services`. SIGHUP reloads the
config; SIGTERM or SIGINT stops taking work and drains what runs.
"""

from __future__ import annotations

import os
import signal

import anyio
import structlog

from . import children, cpus, loader, preflight
from .config import Config
from .drivers import open_storage
from .errors import ArchivedError, ConfigError, Kind, TargetUnavailable, classify
from .housekeeping import Housekeeping
from .intake import Intake, Once, Pinned
from .keys import KeyRing, load_signing_key
from .lock import lock_state_dir
from .moments import iso_seconds, utcnow
from .notify import Notifier
from .phase import Services
from .running import RunningJobs
from .schedules import Scheduler
from .spool import Spool
from .states import PROCESSING, State
from .store_open import open_store
from .timestamp import load_ca_bundle
from .wakeup import SpoolWatch

log = structlog.get_logger(component="daemon")

# The STATUS= line systemd shows: counted at most this often (seconds), not at every turn
# of the poll loop, which a burst of small jobs turns hundreds of times a second.
STATUS_EVERY = 1.0


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
    # in a thread: it looks up where the sources' roots really lie (a mount may hang)
    problems += await anyio.to_thread.run_sync(preflight.path_problems, config, roots)
    return problems, warnings


async def check_config(config: Config, *, key: bool = True) -> list[str]:
    """Everything a config needs beyond its schema: targets usable, directories apart,
    programs there, signing key readable. ConfigError names every problem; returns the
    warnings (targets that cannot be reached now)."""
    problems, warnings = await check_targets(config)
    problems += await anyio.to_thread.run_sync(preflight.program_problems, config)
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


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.pinned = Pinned.of(config)  # what jobs are queued and triggered on
        self.spool = Spool(config.daemon.spool_dir)
        self.wake = anyio.Event()
        self.news = False  # the next turn of the poll loop is a full one (see _serve)
        self.reload_requested = anyio.Event()
        self.reloaded = anyio.Event()  # set (and replaced) by every reload that applied
        self.notify = Notifier()
        self.last_reload = "none"
        self.queue_problem = Once()  # the queue's error, said once for as long as it lasts
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
                self.intake = Intake(self.spool, self.svc, lambda: self.pinned, self._wake)
                self.housekeeping = Housekeeping(
                    self.svc, lambda: self.config, lambda: self.reloaded
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
            jobs = self.jobs = RunningJobs(
                self.svc,
                tg,
                lambda: self.pinned,
                self._wake,
                self.housekeeping.remove_stale_staging,
            )
            if not self.until_idle:
                tg.start_soon(self._signals)
            if store.shared:
                tg.start_soon(jobs.heartbeat)
                tg.start_soon(store.listen, self._news)
            await self.intake.ingest_leftovers()
            resumed = await store.resumable()
            await self.housekeeping.remove_stale_staging()
            jobs.resume(resumed)  # what a previous run left in flight
            log.info(
                "ready",
                state_dir=str(self.config.daemon.state_dir),
                spool_dir=str(self.config.daemon.spool_dir),
                targets=sorted(self.config.storage),
                host_id=store.host_id,
                queue="postgresql" if store.shared else "sqlite",
                cpu=cpus.pinned(),  # its threads' CPU (cpus.py); None: not pinned
            )
            self.notify.ready(await self._status())
            tg.start_soon(self._reloader)
            tg.start_soon(self._watch_spool)
            self.housekeeping.start(tg, self.notify)
            status, status_due, full_due = "", 0.0, 0.0
            scheduler = Scheduler(self.svc.store, self.intake.create_scheduled)
            while not self.svc.stopping.is_set():
                try:
                    # The spool, the schedules and the cancels at every poll interval and
                    # when there is news of them; a turn woken by a job's end (a free
                    # slot: hundreds a second in a burst of small jobs) only claims.
                    if self.news or anyio.current_time() >= full_due:
                        self.news = False
                        full_due = anyio.current_time() + self.config.daemon.poll_interval
                        await self.intake.ingest()
                        await scheduler.tick(self.config)
                        await jobs.handle_cancel_requests()
                    await jobs.restart_stalled()
                    await jobs.claim()
                    if self.until_idle and await self._idle():
                        self.svc.stopping.set()
                        self.wake.set()
                    if anyio.current_time() >= status_due:  # a count over every job: not
                        status_due = anyio.current_time() + STATUS_EVERY  # each turn
                        if (new_status := await self._status()) != status:
                            status = new_status
                            self.notify.status(status)
                    self.queue_problem.over("")
                except Exception as exc:  # the queue's disk full, its server gone: wait
                    if classify(exc) != Kind.RECOVERABLE:
                        raise
                    self.queue_problem.say("", "the queue cannot be written now; waiting", exc)
                with anyio.move_on_after(max(0.0, full_due - anyio.current_time())):
                    await self.wake.wait()  # a full turn at least every poll_interval
                self.wake = anyio.Event()
            self.notify.stopping()
            await jobs.drain()
            tg.cancel_scope.cancel()

    async def _idle(self) -> bool:
        """Nothing runs, nothing waits to run again, the spool holds nothing to take."""
        jobs = self.jobs
        if len(jobs) or jobs.stalled or jobs.resuming or await self.spool.pending():
            return False
        counts = await self.svc.store.job_counts()
        return not any(State(state) in PROCESSING for state, n in counts.items() if n)

    async def _watch_spool(self) -> None:
        watch = SpoolWatch.open(self.spool.incoming)
        if watch is None:
            log.info(
                "no inotify for the spool: polling it only", every=self.config.daemon.poll_interval
            )
            return
        await watch.run(self._news)

    def _wake(self) -> None:
        """The poll loop's next turn now (its event is new every turn)."""
        self.wake.set()

    def _news(self) -> None:
        """The next turn now, and a full one: the spool changed, or another process
        queued a job or asked for a cancel."""
        self.news = True
        self.wake.set()

    async def _status(self) -> str:
        counts = await self.svc.store.job_counts()
        busy = sum(n for state, n in counts.items() if State(state) in PROCESSING)
        return (
            f"{busy} processing, {counts.get('queued', 0)} queued, "
            f"{counts.get('completed', 0)} completed, {counts.get('failed', 0)} failed; "
            f"last reload: {self.last_reload}"
        )

    # -- reload ------------------------------------------------------------------------

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
                self._news()  # a full turn: the schedules may have changed

    async def _reload(self) -> None:
        path = self.config.source
        stamp = iso_seconds(utcnow())
        try:
            if path is None:
                raise ConfigError("running on the embedded default: there is no file to reload")
            new = await anyio.to_thread.run_sync(loader.load, path)
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
        self.config, self.pinned = new, Pinned.of(new)
        self.svc.keys.clear()
        self.svc.activity_slots.total_tokens = new.limits.activity_tasks
        self.svc.storage_slots.total_tokens = new.limits.storage_tasks
        self.svc.hash_threads.total_tokens = new.limits.hash_threads
        self.last_reload = f"ok at {stamp} (config {self.pinned.digest})"
        self.svc.metrics.reloads["ok"] += 1
        log.info("config reloaded", digest=self.pinned.digest, targets=sorted(new.storage))
        self.wake.set()
        self.reloaded.set()
        self.reloaded = anyio.Event()

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
                log.info("stopping: no new work", signal=name, running=len(self.jobs))
                self.svc.stopping.set()
                self.wake.set()
