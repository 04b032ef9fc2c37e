"""Housekeeping: what the daemon does beside running jobs, each a loop of its own.

The systemd watchdog, periodic fixity audits, retention (with the orphans cleanup left
behind), the metrics text file, and the removal of staging a crash left. Each reads the
config in force at every turn (a reload applies at once); a round that fails is logged
and the next one runs as planned. With several daemons on the queue, one of them leads
each audit and retention round.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Callable
from datetime import UTC, datetime

import anyio
import structlog
from anyio.abc import TaskGroup

from .audit import Auditor
from .config import Config
from .metrics import Stored, write_textfile
from .notify import Notifier
from .orphans import remove_orphans
from .phase import Services
from .retention import expire_due
from .staging import END_NAME, Staging
from .states import FINAL, State

log = structlog.get_logger(component="housekeeping")


class Housekeeping:
    def __init__(
        self,
        svc: Services,
        config: Callable[[], Config],
        reloaded: Callable[[], anyio.Event],
    ) -> None:
        self.svc = svc
        self.config = config  # the config in force: it changes on reload
        self.reloaded = reloaded  # set by the next reload that applies

    def start(self, tg: TaskGroup, notify: Notifier) -> None:
        if notify.watchdog_seconds:
            tg.start_soon(self.watchdog, notify, notify.watchdog_seconds)
        tg.start_soon(self.metrics)
        tg.start_soon(self.audits)
        tg.start_soon(self.retention)

    async def watchdog(self, notify: Notifier, interval: float) -> None:
        """WATCHDOG=1 only while the event loop turns and the database answers."""
        while True:
            with anyio.move_on_after(interval / 2):
                await self.svc.store.ping()
                notify.watchdog()
            await anyio.sleep(interval / 2)

    async def audits(self) -> None:
        """Periodic fixity audits, `audit.copies_per_round` copies every `audit.interval`.

        A round is due one interval after the last audit the database knows of (so a
        restart does not put it off), or after this process's last round. A reload
        wakes this loop: audits turned on, or an interval shortened, apply at once.
        """
        last_round: datetime | None = None
        while True:
            reloaded = self.reloaded()
            audit = self.config().audit
            wait = math.inf
            if audit.interval > 0:
                known = await self.svc.store.last_audited()
                last = max([t for t in (known, last_round) if t is not None], default=None)
                now = datetime.now(UTC)
                wait = 0 if last is None else (last - now).total_seconds() + audit.interval
                if wait <= 0:
                    last_round = now
                    await self.audit_round()
                    continue
            with anyio.move_on_after(wait):
                await reloaded.wait()

    async def audit_round(self) -> None:
        config = self.config()
        audit = config.audit
        auditor = Auditor(self.svc.store, config, config.daemon.state_dir / "audit")
        try:
            async with self.svc.store.leading("audit") as leader:
                if leader:  # else another daemon on the queue runs this round
                    await auditor.round(
                        copies=audit.copies_per_round, max_bytes=audit.bytes_per_round
                    )
        except Exception:
            log.exception("audit round failed; the next one runs as planned")

    async def retention(self) -> None:
        while True:
            await anyio.sleep(self.config().retention.check_interval)
            config = self.config()
            try:
                async with self.svc.store.leading("retention") as leader:
                    deleted = []
                    if leader:  # else another daemon on the queue runs this round
                        await remove_orphans(self.svc.store, config)
                        deleted = await expire_due(self.svc.store, config)
            except Exception:
                log.exception("retention round failed; the next one tries again")
                continue
            for job_id in deleted:
                self.svc.metrics.transition(State.DELETED)
                log.info("job deleted by retention", job_id=job_id, state="deleted")

    async def metrics(self) -> None:
        while True:
            config = self.config()
            textfile = config.metrics.textfile
            if textfile is not None:
                text = self.svc.metrics.render(await Stored.read(self.svc.store, config))
                try:
                    await anyio.to_thread.run_sync(write_textfile, textfile, text)
                except OSError as exc:
                    log.warning("cannot write metrics", path=str(textfile), error=str(exc))
            await anyio.sleep(self.config().metrics.interval)

    async def remove_stale_staging(self, only: str | None = None) -> None:
        """Staging of jobs that are final (or unknown) is left over from a crash; with
        several daemons, so is the staging of jobs another daemon runs now."""
        staging = self.config().daemon.state_dir / "staging"
        if not staging.is_dir():
            return
        store = self.svc.store
        for entry in staging.iterdir():
            if only is None and entry.name.startswith(f".{END_NAME}.") and entry.is_file():
                with contextlib.suppress(OSError):  # the shared end's, from a write cut short
                    entry.unlink()
            if (only is not None and entry.name != only) or not entry.is_dir():
                continue  # (a file: the archives' shared end)
            job = await store.job(entry.name)
            stale = job is None or job.state in FINAL
            if store.shared and job is not None:
                stale = stale or job.owner != store.host_id
            if stale:
                log.info("removing stale staging", job_id=entry.name)
                await anyio.to_thread.run_sync(shutil.rmtree, entry, True)
            elif only is None and await anyio.to_thread.run_sync(
                Staging.adopt_earlier_layout, entry
            ):
                log.info("staging of an earlier version moved into this layout", job_id=entry.name)
