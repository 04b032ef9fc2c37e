"""The PostgreSQL backend: one queue that daemons on several hosts share.

psycopg 3 (the `postgres` extra, imported only when `[queue] url` is set): the URL is a
libpq URI with all its meaning (unix sockets, service files, .pgpass, sslmode), an
async connection pool serves the daemon, and LISTEN/NOTIFY wakes the other daemons at
once when a job is queued or a cancel is asked for.

Each job in a processing state has an owner (the daemon's host_id) and a lease on the
database's clock. The heartbeat renews all of a daemon's leases in one statement every
lease/3; a job whose lease lapsed is taken over by the next daemon that claims. Every
write about a job a daemon runs first locks the job's row and checks that the daemon
still owns it (LeaseLost if not), and a daemon that could not renew in time considers
its lease gone without asking: it stops the job and writes nothing more, to the
database or to the targets. The schema is created and migrated at start under an
advisory lock, one daemon at a time.
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
import structlog
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from .errors import ConfigError
from .store import TABLES, Job, LeaseLost, StoreUnavailable, Task, as_datetime, peeked
from .store_sql import PROCESSING_STATES, SqlStore, Tx, load_queries, migrations

if TYPE_CHECKING:
    from .config import Config

log = structlog.get_logger(component="store")

_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
LOCK_SPACE = 0x61726368  # "arch": the advisory locks of archived, with a key each
MIGRATION_KEY = 0


def _psycopg(sql: str) -> str:
    """`:name` parameters as psycopg spells them."""
    return _PARAM.sub(r"%(\1)s", sql)


Q = {name: _psycopg(sql) for name, sql in load_queries("postgres").items()}


_TIMES = frozenset(
    {"not_before", "retry_at", "created_at", "started_at", "updated_at", "expires_at"}
    | {"verified_at", "audited_at", "deleted_at", "at", "slot", "first_seen", "recorded_at"}
    | {"removed_at", "lease_until"}
)


def _load_value(column: str, value: Any) -> Any:
    """An SQLite value as PostgreSQL's column takes it."""
    if column in _TIMES:
        return as_datetime(value)
    if column in ("cancel_requested", "legal_hold"):
        return bool(value)
    return value


def _key(task: str) -> int:
    return zlib.crc32(task.encode()) & 0x7FFFFFFF or 1


class PgTx:
    """One transaction's statements. Inside `PgConnector.transaction` the connection is
    in pipeline mode: writes are sent without waiting for their results, which come
    with the next read or the COMMIT: a transition is two round trips to the server (the
    lease check, then the rest with the COMMIT), not seven. The checks of `must_change`
    and the rows of `rows_later` are settled by `finish()`, before the COMMIT."""

    def __init__(
        self,
        conn: psycopg.AsyncConnection[dict[str, Any]],
        pipeline: psycopg.AsyncPipeline | None = None,
    ) -> None:
        self._conn, self._pipeline = conn, pipeline
        self._checks: list[tuple[psycopg.AsyncCursor[dict[str, Any]], BaseException]] = []
        self._later: list[tuple[psycopg.AsyncCursor[dict[str, Any]], list[dict[str, Any]]]] = []

    async def run(self, query: str, **params: Any) -> None:
        await self._conn.execute(Q[query], params)

    async def must_change(self, query: str, stale: BaseException, **params: Any) -> None:
        self._checks.append((await self._conn.execute(Q[query], params), stale))

    async def count(self, query: str, **params: Any) -> int:
        cur = await self._conn.execute(Q[query], params)
        await self._sync()
        return cur.rowcount

    async def all(self, query: str, **params: Any) -> list[dict[str, Any]]:
        cur = await self._conn.execute(Q[query], params)
        return await cur.fetchall()

    async def rows_later(self, query: str, **params: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        self._later.append((await self._conn.execute(Q[query], params), rows))
        return rows

    async def execute(self, sql: str, params: Mapping[str, Any]) -> None:
        await self._conn.execute(_psycopg(sql), dict(params))

    async def finish(self) -> None:
        """The results of what was sent: StaleState (or what `must_change` was given)
        raised here undoes the transaction."""
        if self._checks or self._later:
            await self._sync()
        for cur, stale in self._checks:
            if cur.rowcount != 1:
                raise stale
        for cur, rows in self._later:
            rows[:] = await cur.fetchall()

    async def _sync(self) -> None:
        if self._pipeline is not None:
            await self._pipeline.sync()


class PgConnector:
    def __init__(self, url: str, pool: AsyncConnectionPool[Any]) -> None:
        self.url, self.pool = url, pool

    @classmethod
    async def open(cls, url: str, lease: float = 30.0) -> PgConnector:
        async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute("SET TIME ZONE 'UTC'")
            # a daemon frozen inside a transaction (SIGSTOP, a VM paused) must not hold
            # its jobs' rows locked past its lease: the server ends its session
            ms = max(int(lease * 1000), 1000)
            await conn.execute(f"SET idle_in_transaction_session_timeout = {ms}")

        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=10,
            open=False,
            kwargs={"autocommit": True, "row_factory": dict_row},
            configure=configure,
            name="archived",
        )
        try:
            await pool.open(wait=True, timeout=30)
        except Exception as exc:
            await pool.close()
            raise ConfigError(f"queue.url: cannot connect to PostgreSQL: {exc}") from None
        connector = cls(url, pool)
        try:
            await connector.migrate()
        except BaseException:
            await connector.close()
            raise
        return connector

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.pool.close()

    async def migrate(self) -> None:
        """Create or migrate the schema, one daemon at a time (an advisory lock)."""
        async with self.pool.connection() as conn:
            await conn.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_SPACE, MIGRATION_KEY))
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                cur = await conn.execute("SELECT max(version) AS v FROM schema_migrations")
                row = await cur.fetchone()
                version = (row or {}).get("v") or 0
                for number, script in migrations("postgres"):
                    if number <= version:
                        continue
                    async with conn.transaction():
                        await conn.execute(script)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version) VALUES (%s)", (number,)
                        )
                    log.info("queue schema migrated", version=number)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_SPACE, MIGRATION_KEY))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PgTx]:
        with anyio.CancelScope(shield=True):
            async with (
                self.pool.connection() as conn,
                conn.pipeline() as pipeline,
                conn.transaction(),
            ):
                tx = PgTx(conn, pipeline)
                yield tx
                await tx.finish()

    async def fetch(self, query: str, **params: Any) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(Q[query], params)
            rows: list[dict[str, Any]] = await cur.fetchall()
            return rows


class PgStore(SqlStore):
    """A queue that several daemons share."""

    shared = True

    def __init__(self, db: PgConnector, host_id: str, lease: float) -> None:
        super().__init__(db, host_id)
        self.pg, self.lease = db, lease
        self._until: dict[str, float] = {}  # job id -> lease end on time.monotonic()

    @classmethod
    async def open(cls, config: Config, host_id: str) -> PgStore:
        lease = config.queue.lease
        return cls(await PgConnector.open(config.queue.url, lease), host_id, lease)

    # -- leases ------------------------------------------------------------------------

    @asynccontextmanager
    async def _owned(self, job_id: str) -> AsyncIterator[Tx]:
        self.check_lease(job_id)
        async with self.db.transaction() as tx:
            rows = await tx.all("lock_owner", id=job_id)
            owner = rows[0]["owner"] if rows else None
            if owner != self.host_id:
                self._until.pop(job_id, None)
                raise LeaseLost(f"job {job_id} is {owner or 'no daemon'}'s now")
            yield tx

    def check_lease(self, job_id: str) -> None:
        until = self._until.get(job_id)
        if until is not None and time.monotonic() > until:
            raise LeaseLost(f"the lease on job {job_id} was not renewed in time")

    async def _hold(self, tx: Tx, job_id: str) -> None:
        sent = time.monotonic()
        await tx.run("hold_lease", id=job_id, me=self.host_id, lease=self.lease)
        self._leases_renewed({job_id}, sent)

    def _leases_renewed(self, job_ids: set[str], sent: float) -> None:
        for job_id in job_ids:
            self._until[job_id] = sent + self.lease

    async def renew_leases(self) -> set[str]:
        sent = time.monotonic()
        rows = await self.db.fetch(
            "renew_leases", me=self.host_id, lease=self.lease, processing=PROCESSING_STATES
        )
        mine = {r["id"] for r in rows}
        self._leases_renewed(mine, sent)
        return mine

    async def load(self, rows: Mapping[str, list[dict[str, Any]]]) -> dict[str, int]:
        """Another queue's rows (an SQLite one's, see TABLES), into this empty queue."""
        counts = {}
        async with self.db.transaction() as tx:
            if await tx.all("any_job"):
                raise StoreUnavailable("the PostgreSQL queue has jobs already: nothing moved")
            for table in TABLES:
                for row in rows.get(table, []):
                    values = {k: _load_value(k, v) for k, v in row.items() if k != "seq"}
                    if table == "jobs" and row["state"] in PROCESSING_STATES:
                        values |= {"owner": self.host_id, "lease_until": None}
                    columns = ", ".join(values)
                    marks = ", ".join(f":{c}" for c in values)
                    await tx.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", values)
                counts[table] = len(rows.get(table, []))
            await tx.run("lease_mine", me=self.host_id, lease=self.lease)
        return counts

    # -- the other daemons -------------------------------------------------------------

    async def _announce(self, tx: Tx, what: str) -> None:
        await tx.run("notify", what=what)

    async def listen(self, on_news: Callable[[], None]) -> None:
        """LISTEN on a connection of its own, again after a broken one."""
        delay = 0.5
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.pg.url, autocommit=True)
            except psycopg.OperationalError as exc:
                log.warning("cannot listen for new jobs; polling meanwhile", error=str(exc))
                await anyio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            try:
                await conn.execute("LISTEN archived")
                delay = 0.5
                on_news()  # whatever came while we were not listening
                async for _ in conn.notifies():
                    on_news()
            except psycopg.OperationalError as exc:
                log.warning("lost the connection that listens for new jobs", error=str(exc))
            finally:
                with anyio.CancelScope(shield=True):
                    await conn.close()

    @asynccontextmanager
    async def leading(self, task: str) -> AsyncIterator[bool]:
        """An advisory lock on a connection held for the while: another daemon that
        asks meanwhile is told no; a daemon that dies lets go with its connection."""
        async with self.pg.pool.connection() as conn:
            tx = PgTx(conn)
            where = {"space": LOCK_SPACE, "key": _key(task)}
            (row,) = await tx.all("try_lead", **where)
            try:
                yield bool(row["leader"])
            finally:
                if row["leader"]:
                    with anyio.CancelScope(shield=True):
                        await tx.all("stop_leading", **where)


class PgStateReader:
    """`submit --wait`'s quick synchronous reads, on one connection."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.Connection[dict[str, Any]] | None = None

    def peek(self, ids: Iterable[str]) -> dict[str, tuple[Job, list[Task]]]:
        wanted = {"ids": list(ids)}
        try:
            if self._conn is None:
                self._conn = psycopg.connect(
                    self._url, autocommit=True, connect_timeout=5, row_factory=dict_row
                )
            jobs = self._conn.execute(Q["jobs_by_id"], wanted).fetchall()
            tasks = self._conn.execute(Q["tasks_of_jobs"], wanted).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}  # no daemon made the schema yet
        except psycopg.OperationalError as exc:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            raise StoreUnavailable(str(exc).strip()) from None
        return peeked(jobs, tasks)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
