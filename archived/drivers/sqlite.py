"""Activity driver `sqlite`: a consistent snapshot of a live SQLite database.

SQLite's online backup API copies the database page by page while other
connections keep writing, restarting when they change a page it already copied,
so the snapshot is one consistent state, never a torn copy of a busy file. The
snapshot is checked with `PRAGMA integrity_check` before it counts.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
from pydantic import Field

from ..artifacts import member_bytes
from ..config import Config
from ..errors import IntegrityError, SourceError, TransientError
from .base import ActivityContext, ActivityDriver, DriverOptions, Estimate
from .files import check_under_roots


class SqliteOptions(DriverOptions):
    path: Path
    output: str = Field(default="", pattern=r"^$|^[A-Za-z0-9._-]{1,100}$")
    # 0: copy in one step under one read lock, which always finishes; N > 0 copies N
    # pages a step, letting writers in between, but restarts whenever they change it
    pages_per_step: int = Field(default=0, ge=0)


LOCK_WAIT = 10.0  # seconds a snapshot waits for another program's lock in one attempt


class SqliteDriver(ActivityDriver):
    Options = SqliteOptions
    opts: SqliteOptions
    _locked_since: float | None = None

    @classmethod
    def check(cls, options: Any, config: Config) -> None:
        check_under_roots(options.path, config)

    def estimate(self, member_prefix: str) -> Estimate:
        """The snapshot is staged twice at the most (a spool file, then its member); it is
        no bigger than the database and its write-ahead log, and about as big."""
        size = 0
        for path in (self.opts.path, Path(f"{self.opts.path}-wal")):
            try:
                size += path.stat().st_size
            except OSError:
                continue
        name = member_prefix + (self.opts.output or self.opts.path.name)
        return Estimate(2 * member_bytes(name, size), 1, size)

    def fingerprint(self) -> list[str]:
        """The database and its write-ahead log: sizes and mtimes."""
        lines = []
        for p in (self.opts.path, self.opts.path.with_name(self.opts.path.name + "-wal")):
            if p.exists():
                st = p.stat()
                lines.append(f"{self.name}\0{p.name}\0{st.st_size}\0{st.st_mtime_ns}")
        return lines

    async def run(self, ctx: ActivityContext) -> dict[str, Any]:
        return await self.checked_in_thread(ctx, lambda: self._snapshot(ctx))

    def _snapshot(self, ctx: ActivityContext) -> dict[str, Any]:
        source = self.opts.path
        if not source.is_file():
            raise SourceError(f"source {source} does not exist or is not a file")
        name = self.opts.output or source.name
        writer = ctx.writer
        writer.start()
        target = writer.spool  # the snapshot, until it joins the fragment
        target.unlink(missing_ok=True)
        try:
            src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise SourceError(f"source {source}: {exc}") from None
        try:
            dst = sqlite3.connect(target)
            try:
                src.backup(dst, pages=self.opts.pages_per_step or -1, progress=self._progress)
                check = dst.execute("PRAGMA integrity_check").fetchall()
            finally:
                dst.close()
        except sqlite3.DatabaseError as exc:
            raise SourceError(f"source {source}: {exc}") from None
        finally:
            src.close()
        if check != [("ok",)]:
            raise IntegrityError(f"snapshot of {source} fails integrity_check: {check[:3]}")
        writer.adopt(name, target)
        ctx.notes.append(f"sqlite snapshot of {source}: integrity_check ok")
        return writer.finish()

    def _progress(self, status: int, remaining: int, total: int) -> None:
        """Called after every step, also one that found the database locked (the backup
        then sleeps 250 ms and tries again, for ever): a lock held longer than LOCK_WAIT
        is an error that may pass, and the job tries again after its backoff."""
        anyio.from_thread.check_cancelled()
        if status not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            self._locked_since = None
            return
        now = time.monotonic()
        if self._locked_since is None:
            self._locked_since = now
        elif now - self._locked_since > LOCK_WAIT:
            raise TransientError(
                f"source {self.opts.path}: database is locked by another program "
                f"for over {LOCK_WAIT:.0f} s"
            )
