"""The long-running process: lock, ingest the spool, claim due jobs, run them.

One task group holds the poll loop, the signal handler and one task per running
job. `max_concurrent_jobs` bounds the jobs in processing states; activity and
storage tasks are bounded across all jobs by the limiters in `Services`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import IO, Any

import anyio
import structlog
from anyio.abc import TaskGroup

from .config import Config
from .drivers import storage_driver
from .errors import ArchivedError, JobFileError
from .jobfile import parse_job, read_job_file
from .keys import KeyRing, load_signing_key
from .runner import JobRunner, Services
from .spool import Claimed, Spool
from .states import FINAL, PROCESSING, STOPPABLE, Event, State
from .store import StaleState, Store

log = structlog.get_logger("archived.daemon")


class AlreadyRunning(ArchivedError):
    pass


def lock_state_dir(state_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the state directory for the life of the process."""
    state_dir.mkdir(parents=True, exist_ok=True)
    handle = open(state_dir / "archived.lock", "a+")  # noqa: SIM115
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise AlreadyRunning(f"another archived daemon is running on {state_dir}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


async def check_targets(config: Config) -> None:
    for name, section in config.storage.items():
        driver_cls = storage_driver(section.driver)
        await driver_cls(name, driver_cls.options(config.storage_options(name))).check()


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.spool = Spool(config.daemon.spool_dir)
        self.running: dict[str, JobRunner] = {}
        self.wake = anyio.Event()

    async def run(self) -> None:
        config = self.config
        lock = lock_state_dir(config.daemon.state_dir)
        try:
            self.spool.create()
            await check_targets(config)
            keys = KeyRing()
            load_signing_key(config)  # fail at start, not at the first job's sign step
            store = await Store.open(config.daemon.state_dir / "archived.db")
            try:
                self.svc = Services(
                    store=store,
                    state_dir=config.daemon.state_dir,
                    keys=keys,
                    activity_slots=anyio.CapacityLimiter(config.limits.activity_tasks),
                    storage_slots=anyio.CapacityLimiter(config.limits.storage_tasks),
                    hash_threads=anyio.CapacityLimiter(config.limits.hash_threads),
                )
                await self._serve()
            finally:
                await store.close()
        finally:
            lock.close()
        log.info("stopped")

    async def _serve(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._signals, tg)
            await self._ingest_leftovers()
            await self._remove_stale_staging()
            for job in await self.svc.store.jobs_in(PROCESSING):
                self._start(tg, job)  # resume what a previous run left in flight
            log.info(
                "ready",
                state_dir=str(self.config.daemon.state_dir),
                spool_dir=str(self.config.daemon.spool_dir),
                targets=sorted(self.config.storage),
            )
            while not self.svc.stopping.is_set():
                await self._ingest()
                await self._handle_cancel_requests(tg)
                while len(self.running) < self.config.daemon.max_concurrent_jobs:
                    claimed = await self.svc.store.claim_next()
                    if claimed is None:
                        break
                    self._start(tg, claimed)
                with anyio.move_on_after(self.config.daemon.poll_interval):
                    await self.wake.wait()
                self.wake = anyio.Event()
            await self._drain()
            tg.cancel_scope.cancel()

    def _start(self, tg: TaskGroup, job: dict[str, Any]) -> None:
        job_id = str(job["id"])
        runner = JobRunner(self.svc, job)
        self.running[job_id] = runner

        async def run() -> None:
            try:
                await runner.run()
            except Exception:
                log.exception(
                    "job runner crashed; the job resumes at the next start",
                    job_id=job_id,
                    state=runner.state.value,
                )
            finally:
                self.running.pop(job_id, None)
                self.wake.set()

        tg.start_soon(run)

    async def _handle_cancel_requests(self, tg: TaskGroup) -> None:
        """`archived cancel` sets a flag in the database; act on it here."""
        store = self.svc.store
        requests = await store.fetchall("cancel_requests", states=json.dumps(sorted(STOPPABLE)))
        for request in requests:
            job_id = request["id"]
            if job_id in self.running:
                self.running[job_id].cancel()
            elif request["state"] == State.QUEUED:
                try:
                    await store.transition(
                        job_id,
                        State.QUEUED,
                        Event.CANCELED,
                        "canceled",
                        error="canceled while queued",
                    )
                except StaleState:
                    continue
                job = await store.job(job_id)
                assert job is not None
                self._start(tg, job)  # failure -> error_handling -> cleanup -> failed

    async def _remove_stale_staging(self) -> None:
        """Staging of jobs that are final (or unknown) is left over from a crash."""
        staging = self.config.daemon.state_dir / "staging"
        if not staging.is_dir():
            return
        states = {r["id"]: r["state"] for r in await self.svc.store.fetchall("job_ids")}
        for entry in staging.iterdir():
            if states.get(entry.name) in FINAL or entry.name not in states:
                log.info("removing stale staging", job_id=entry.name)
                await anyio.to_thread.run_sync(shutil.rmtree, entry, True)

    async def _drain(self) -> None:
        """Let running steps finish within shutdown_grace, then cancel them."""
        with anyio.move_on_after(self.config.daemon.shutdown_grace):
            while self.running:
                await anyio.sleep(0.05)
        for runner in list(self.running.values()):
            if runner.scope is not None:
                runner.scope.cancel()
        while self.running:
            await anyio.sleep(0.01)

    async def _signals(self, tg: TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if self.svc.stopping.is_set():
                    log.warning("second signal: exiting now", signal=signal.Signals(signum).name)
                    os._exit(0)
                log.info(
                    "stopping: no new work",
                    signal=signal.Signals(signum).name,
                    running=len(self.running),
                )
                self.svc.stopping.set()
                self.wake.set()

    # -- the spool ---------------------------------------------------------------------

    async def _ingest_leftovers(self) -> None:
        for claimed in await self.spool.leftovers():
            await self._accept(claimed)

    async def _ingest(self) -> None:
        for name in await self.spool.pending():
            if self.svc.stopping.is_set():
                return
            claimed = await self.spool.claim(name)
            if claimed is not None:
                await self._accept(claimed)

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
            if known["spec_sha256"] == digest:
                await self.spool.done(claimed)  # inserted before a crash; the file is spent
            else:
                await self._reject(claimed, f"job id {claimed.job_id} already exists")
            return
        try:
            spec = parse_job(data, claimed.original_name, config)
        except JobFileError as exc:
            await self._reject(claimed, str(exc))
            return
        tasks = [("activity", a.name) for a in spec.activities]
        tasks += [("storage", t) for t in spec.targets(config)]
        await store.insert_job(
            job_id=claimed.job_id,
            name=spec.name,
            spec=spec.model_dump_json(),
            spec_sha256=digest,
            config=config.snapshot(),
            config_digest=config.digest,
            not_before=spec.not_before_utc(),
            tasks=tasks,
        )
        await self.spool.done(claimed)
        log.info(
            "job queued",
            job_id=claimed.job_id,
            state="queued",
            name=spec.name,
            file=claimed.original_name,
        )

    async def _reject(self, claimed: Claimed, reason: str) -> None:
        target = await self.spool.reject(claimed, reason)
        log.error(
            "job file rejected", file=claimed.original_name, moved_to=str(target), reason=reason
        )
