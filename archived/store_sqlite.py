"""The SQLite backend: `<state_dir>/archived.db`, one daemon, through aiosqlite.

WAL, one connection for writes and one for reads. Every write is an explicit
`BEGIN IMMEDIATE` transaction behind one lock, shielded from cancellation: a cancelled
await does not stop the statement already running in aiosqlite's thread, so we never
walk away from one. Busy or locked is told by the error's `sqlite_errorname`, not by
its text.

Group commit: each COMMIT waits for the disk (`synchronous = FULL`), and a daemon's
runners write many small transactions at once. The ones that queue up for the write
lock while another runs share its database transaction, each after the first inside
its own SAVEPOINT (an error undoes that one alone), and then one COMMIT: one flush for
all of them. A transaction with nobody waiting behind it commits at once. Nobody
returns before that COMMIT: a transaction reported done is durable. If the COMMIT
fails, or SQLite itself rolls the transaction back (disk full, I/O error), every member
of the group gets that error and none of them is kept. Reads go to the second
connection, which sees committed data only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import anyio

from .store import TABLES, Job, StoreUnavailable, Task, iso, peeked
from .store_sql import SqlStore, load_queries, migrations

Q = load_queries("sqlite")
T = TypeVar("T")
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


async def _while_busy(
    attempt: Callable[[], Awaitable[T]],
    again: Callable[[], bool] = lambda: True,
    patience: float = math.inf,
) -> T:
    """`attempt()`, tried again after a growing pause (10 ms doubling to 1 s) while SQLite
    answers busy or locked and `again()` allows it; for at most `patience` seconds of
    pauses, then its error."""
    delay = waited = 0.01
    while True:
        try:
            return await attempt()
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or not again() or waited > patience:
                raise
        await anyio.sleep(delay)
        delay = min(delay * 2, 1.0)
        waited += delay


class _Statement:
    __slots__ = ("into", "params", "sql", "stale")

    def __init__(
        self,
        sql: str,
        params: Mapping[str, Any],
        stale: BaseException | None = None,
        into: list[dict[str, Any]] | None = None,
    ) -> None:
        self.sql, self.params = sql, params
        self.stale = stale  # raised unless the statement changes exactly one row
        self.into = into  # filled with the rows it reads


def _in_db_thread(db: aiosqlite.Connection, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(connection, *args)` in aiosqlite's thread: one hop for many statements.

    aiosqlite hops to its thread and back for every call (an execute, a fetch and a
    close are three), each ~100 us of thread switching here; a job's ~50 statements
    took 185 hops. `_execute` and `_conn` are aiosqlite's own (unchanged since 0.17);
    its public API has no batch of statements with parameters.
    """
    return db._execute(fn, db._conn, *args)  # type: ignore[no-untyped-call]


class SqliteTx:
    """One member of a group's transaction. Writes wait here and go to SQLite with the
    next read, or with the member's end, in one hop: a write's error (and a
    `must_change` that changed no row) may surface only then, still inside the member,
    which is undone as a whole."""

    def __init__(self, db: aiosqlite.Connection, opening: str) -> None:
        self._db = db
        self._pending = [_Statement(opening, {})]
        self.ran = 0  # statements SQLite ran: 0 means not even the opening one

    async def run(self, query: str, **params: Any) -> None:
        self._pending.append(_Statement(Q[query], _params(params)))

    async def execute(self, sql: str, params: Mapping[str, Any]) -> None:
        self._pending.append(_Statement(sql, _params(params)))

    async def must_change(self, query: str, stale: BaseException, **params: Any) -> None:
        self._pending.append(_Statement(Q[query], _params(params), stale))

    async def rows_later(self, query: str, **params: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        self._pending.append(_Statement(Q[query], _params(params), into=rows))
        return rows

    async def count(self, query: str, **params: Any) -> int:
        return int((await self._flush(_Statement(Q[query], _params(params))))[1])

    async def all(self, query: str, **params: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = (await self._flush(_Statement(Q[query], _params(params))))[0]
        return rows

    async def finish(self, closing: list[str], commit: bool) -> sqlite3.Error | None:
        """What waits, then `closing`, then a COMMIT if asked for: the COMMIT's error is
        returned, not raised (it is the whole group's)."""
        self._pending += [_Statement(sql, {}) for sql in closing]
        return (await self._flush(None, commit))[2]

    async def _flush(
        self, last: _Statement | None, commit: bool = False
    ) -> tuple[list[dict[str, Any]], int, sqlite3.Error | None]:
        batch, self._pending = self._pending, []
        if last is not None:
            batch.append(last)
        done: tuple[list[dict[str, Any]], int, sqlite3.Error | None]
        # BEGIN IMMEDIATE again while busy (busy_timeout ran out: another process writes
        # for long); never once a statement ran
        done = await _while_busy(
            lambda: _in_db_thread(self._db, self._run, batch, last is not None, commit),
            lambda: not self.ran,
        )
        return done

    def _run(
        self, conn: sqlite3.Connection, batch: list[_Statement], fetch: bool, commit: bool
    ) -> tuple[list[dict[str, Any]], int, sqlite3.Error | None]:
        """In the database's thread: the statements in order."""
        rows: list[dict[str, Any]] = []
        count = 0
        for statement in batch:
            cur = conn.execute(statement.sql, statement.params)
            try:
                count = cur.rowcount
                if statement.stale is not None and count != 1:
                    raise statement.stale
                if statement.into is not None:
                    statement.into[:] = [dict(r) for r in cur.fetchall()]
                elif fetch and statement is batch[-1]:
                    rows = [dict(r) for r in cur.fetchall()]
            finally:
                cur.close()
            self.ran += 1
        if commit:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:  # full, I/O error: SQLite may have kept it open
                return rows, count, exc
        return rows, count, None


class _Group:
    """Transactions sharing one BEGIN ... COMMIT."""

    def __init__(self) -> None:
        self.waiting = 0  # members done with their statements, waiting for the COMMIT
        self.done = False
        self.error: BaseException | None = None  # the COMMIT's, or what undid them all

    def failed(self) -> BaseException:
        assert self.error is not None
        return copy.copy(self.error)  # each member raises its own (own traceback)


class SqliteConnector:
    def __init__(self, db: aiosqlite.Connection, reader: aiosqlite.Connection) -> None:
        self._db, self._reader = db, reader
        self._lock = anyio.Lock()
        self._group: _Group | None = None
        self.commits = 0  # COMMITs that reached the disk (tests and benchmarks)

    @classmethod
    async def open(cls, path: Path) -> SqliteConnector:
        return await cls.open_at(path)

    @classmethod
    async def open_at(cls, path: Path, upto: int | None = None) -> SqliteConnector:
        """Opened and migrated (up to migration `upto`: tests of the migrations)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await cls._connect(path)
        # a new database's first openers at once: SQLite does not wait here
        await _while_busy(lambda: db.execute("PRAGMA journal_mode = WAL"), patience=10.0)
        await db.execute("PRAGMA synchronous = FULL")
        await db.execute("PRAGMA foreign_keys = ON")
        reader = await cls._connect(path)
        connector = cls(db, reader)
        await connector.migrate(upto)
        return connector

    @staticmethod
    async def _connect(path: Path) -> aiosqlite.Connection:
        db = await aiosqlite.connect(path, isolation_level=None)
        db.row_factory = sqlite3.Row
        await db.execute("PRAGMA busy_timeout = 10000")
        return db

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._reader.close()
            await self._db.close()

    async def migrate(self, upto: int | None = None) -> None:
        """Every migration after the database's user_version (up to `upto`), each in
        its own transaction with the version it reaches. Another process may migrate the
        same new database at the same time (the daemon's first start and an `archived
        show`): the one that waited for the other's transaction finds its migration
        failed on what is now there, and the version past it: that one is done."""
        version = await self._version()
        for number, script in migrations("sqlite"):
            if number <= version or (upto is not None and number > upto):
                continue
            async with self._lock:
                with anyio.CancelScope(shield=True):
                    try:
                        await self._db.executescript(
                            f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;"
                        )
                    except sqlite3.Error:
                        if self._db.in_transaction:
                            await self._db.execute("ROLLBACK")
                        if await self._version() < number:
                            raise

    async def _version(self) -> int:
        async with self._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTx]:
        """A member of the group's BEGIN IMMEDIATE ... COMMIT, all of it shielded;
        undone on error. Returns once the group's COMMIT is on disk (see above)."""
        async with self._lock:
            with anyio.CancelScope(shield=True):
                joined = self._group is not None
                group = self._group = self._group or _Group()
                # the first member: undone by a ROLLBACK of it all; a later one: by a
                # ROLLBACK TO its savepoint
                tx = SqliteTx(self._db, "SAVEPOINT tx" if joined else "BEGIN IMMEDIATE")
                try:
                    yield tx
                    alone = not self._lock.statistics().tasks_waiting  # commit at once
                    failed = await tx.finish(["RELEASE tx"] if joined else [], commit=alone)
                except BaseException as exc:
                    await self._undo(group, joined, tx, exc)
                    raise
                group.waiting += 1
                if alone:
                    await self._committed(group, failed)
        if not group.done:
            # Those queued for the lock meanwhile join the group; the first member to
            # get the lock back commits for all.
            with anyio.CancelScope(shield=True):
                async with self._lock:
                    if not group.done:
                        await self._commit(group)
        if group.error is not None:
            raise group.failed()

    async def _undo(self, group: _Group, joined: bool, tx: SqliteTx, exc: BaseException) -> None:
        """The failed member's statements gone, the group's others kept; if SQLite
        itself ended the transaction (full, I/O error), the whole group is lost."""
        if not joined:
            assert not group.waiting  # it held the lock since its BEGIN
        elif not self._db.in_transaction:  # the others get the error that ended it
            group.error = (
                exc
                if isinstance(exc, sqlite3.Error)
                else sqlite3.OperationalError("the transaction was rolled back")
            )
        elif tx.ran:  # its SAVEPOINT was made
            try:
                await self._db.execute("ROLLBACK TO tx")
                await self._db.execute("RELEASE tx")
            except sqlite3.Error as exc:
                group.error = exc
        if group.error is not None or not group.waiting:  # nothing left to commit
            self._group, group.done = None, True
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("ROLLBACK")

    async def _commit(self, group: _Group) -> None:
        try:
            await self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            await self._committed(group, exc)
        else:
            await self._committed(group, None)

    async def _committed(self, group: _Group, failed: sqlite3.Error | None) -> None:
        """The group's COMMIT ran; if it failed (full, I/O error), every member gets its
        error, and what SQLite may have kept open is rolled back."""
        self._group, group.done = None, True
        if failed is None:
            self.commits += 1
            return
        group.error = failed
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                await self._db.execute("ROLLBACK")

    async def fetch(self, query: str, **params: Any) -> list[dict[str, Any]]:
        return await self.fetch_sql(Q[query], **params)

    async def fetch_sql(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        """On the reading connection: what is committed, without waiting for writers."""
        return [dict(r) for r in await self._reader.execute_fetchall(sql, _params(params))]


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
