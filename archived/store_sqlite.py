"""The SQLite backend: `<state_dir>/archived.db`, one daemon, through aiosqlite.

One connection, WAL, and every write in an explicit `BEGIN IMMEDIATE` transaction
behind one lock, shielded from cancellation: a cancelled await does not stop the
statement already running in aiosqlite's thread, so we never walk away from one.
Busy or locked is told by the error's `sqlite_errorname`, not by its text.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite
import anyio

from .store import TABLES, Job, StoreUnavailable, Task, iso, peeked
from .store_sql import SqlStore, load_queries, migrations

Q = load_queries("sqlite")
_BUSY = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED"})


def _busy(exc: sqlite3.OperationalError) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith(tuple(_BUSY))


def _param(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, list | tuple | frozenset | set):
        return json.dumps(list(value))
    return value


def _params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {name: _param(value) for name, value in params.items()}


class SqliteTx:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def run(self, query: str, **params: Any) -> int:
        return await self.execute(Q[query], params)

    async def all(self, query: str, **params: Any) -> list[dict[str, Any]]:
        async with self._db.execute(Q[query], _params(params)) as cur:
            return [dict(r) for r in await cur.fetchall()]

    async def execute(self, sql: str, params: Mapping[str, Any]) -> int:
        cur = await self._db.execute(sql, _params(params))
        count = cur.rowcount
        await cur.close()
        return count


class SqliteConnector:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = anyio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SqliteConnector:
        return await cls.open_at(path)

    @classmethod
    async def open_at(cls, path: Path, upto: int | None = None) -> SqliteConnector:
        """Opened and migrated (up to migration `upto`: tests of the migrations)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        db.row_factory = sqlite3.Row
        await db.execute("PRAGMA busy_timeout = 10000")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = FULL")
        await db.execute("PRAGMA foreign_keys = ON")
        connector = cls(db)
        await connector.migrate(upto)
        return connector

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._db.close()

    async def migrate(self, upto: int | None = None) -> None:
        """Every migration after the database's user_version (up to `upto`), each in
        its own transaction with the version it reaches."""
        async with self._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = row[0] if row else 0
        for number, script in migrations("sqlite"):
            if number <= version or (upto is not None and number > upto):
                continue
            async with self._lock:
                with anyio.CancelScope(shield=True):
                    await self._db.executescript(
                        f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;"
                    )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTx]:
        """BEGIN IMMEDIATE ... COMMIT, all of it shielded; ROLLBACK on error."""
        async with self._lock:
            with anyio.CancelScope(shield=True):
                await self._begin()
                try:
                    yield SqliteTx(self._db)
                except BaseException:
                    await self._db.execute("ROLLBACK")
                    raise
                try:
                    await self._db.execute("COMMIT")
                except sqlite3.Error:  # full, I/O error: SQLite may have kept it open
                    if self._db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            await self._db.execute("ROLLBACK")
                    raise

    async def _begin(self) -> None:
        delay = 0.01
        while True:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise
                await anyio.sleep(delay)  # busy_timeout ran out: another writer is slow
                delay = min(delay * 2, 1.0)

    async def fetch(self, query: str, **params: Any) -> list[dict[str, Any]]:
        return await self.fetch_sql(Q[query], **params)

    async def fetch_sql(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        async with self._lock, self._db.execute(sql, _params(params)) as cur:
            return [dict(r) for r in await cur.fetchall()]


class SqliteStore(SqlStore):
    """One daemon's queue in its state directory."""

    def __init__(self, db: SqliteConnector, host_id: str) -> None:
        super().__init__(db, host_id)
        self.sqlite = db

    @classmethod
    async def open(cls, path: Path, host_id: str) -> SqliteStore:
        return cls(await SqliteConnector.open(path), host_id)

    async def export(self) -> dict[str, list[dict[str, Any]]]:
        """Every row of every table, oldest first: `archived migrate-queue` moves them."""
        return {
            table: await self.sqlite.fetch_sql(f"SELECT * FROM {table} ORDER BY {order}")
            for table, order in TABLES.items()
        }


class SqliteStateReader:
    """Read-only, with the standard library's sqlite3: a waiting `submit` starts and
    ends quickly, without an event loop; a short busy timeout, so that a locked
    database never outlasts the caller's own timeout."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None

    def peek(self, ids: Iterable[str]) -> dict[str, tuple[Job, list[Task]]]:
        wanted = {"ids": json.dumps(list(ids))}
        try:
            if self._db is None:
                if not self._path.exists():
                    return {}
                self._db = sqlite3.connect(f"{self._path.as_uri()}?mode=ro", uri=True, timeout=0.1)
                self._db.row_factory = sqlite3.Row
            jobs = self._db.execute(Q["jobs_by_id"], wanted).fetchall()
            tasks = self._db.execute(Q["tasks_of_jobs"], wanted).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # the daemon is creating the database
                return {}
            raise StoreUnavailable(str(exc)) from None
        return peeked([dict(r) for r in jobs], [dict(r) for r in tasks])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
