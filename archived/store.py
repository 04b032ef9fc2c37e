"""The queue store: jobs, tasks, history and copies in SQLite, through aiosqlite.

One connection, WAL, and every write in an explicit `BEGIN IMMEDIATE` transaction
behind one lock, shielded from cancellation: a cancelled await does not stop the
statement already running in aiosqlite's thread, so we never walk away from one.
The SQL lives in sql/queries.sql, the schema in numbered files in sql/migrations/.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

import aiosqlite
import anyio

from .states import Event, State, next_state

Row = dict[str, Any]

_SQL = files("archived") / "sql"
_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
JOB_COLUMNS = frozenset(
    {
        "phase",
        "step",
        "attempts",
        "retry_at",
        "error",
        "cancel_requested",
        "archive_name",
        "archive_sha256",
        "archive_size",
        "payload_files",
        "payload_bytes",
        "started_at",
        "config",
        "config_digest",
        "expires_at",
        "cleanup_attempts",
    }
)


def _load_queries() -> dict[str, str]:
    text = (_SQL / "queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)[1:]
    return {name: body.strip() for name, body in zip(parts[::2], parts[1::2], strict=True)}


Q = _load_queries()


def now_iso() -> str:
    return _iso(datetime.now(UTC))


def _iso(moment: datetime) -> str:
    """A time as the database keeps it: UTC, microseconds, `Z` (they sort as text)."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def peek_job(db: sqlite3.Connection, job_id: str) -> Row | None:
    """A job's row with its `tasks`, read with the standard library's sqlite3, for a
    `submit --wait` that polls without an event loop; None while it is not there."""
    try:
        job = db.execute(Q["get_job"], {"id": job_id})
        job.row_factory = sqlite3.Row
        row = job.fetchone()
        if row is None:
            return None
        tasks = db.execute(Q["tasks"], {"job_id": job_id})
        tasks.row_factory = sqlite3.Row
        return {**dict(row), "tasks": [dict(t) for t in tasks.fetchall()]}
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # the daemon is creating the database
            return None
        raise


class StaleState(Exception):
    """The job was not in the state the caller thought: someone else moved it."""


class Store:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = anyio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        db.row_factory = sqlite3.Row
        await db.execute("PRAGMA busy_timeout = 10000")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = FULL")
        await db.execute("PRAGMA foreign_keys = ON")
        store = cls(db)
        await store._migrate()
        return store

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._db.close()

    async def _migrate(self) -> None:
        async with self._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = row[0] if row else 0
        migrations = sorted(
            (p for p in (_SQL / "migrations").iterdir() if p.name.endswith(".sql")),
            key=lambda p: p.name,
        )
        for migration in migrations:
            number = int(migration.name.split("_", 1)[0])
            if number <= version:
                continue
            script = migration.read_text(encoding="utf-8")
            async with self._lock:
                with anyio.CancelScope(shield=True):
                    await self._db.executescript(
                        f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;"
                    )

    # -- plumbing ----------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """BEGIN IMMEDIATE ... COMMIT, all of it shielded; ROLLBACK on error."""
        async with self._lock:
            with anyio.CancelScope(shield=True):
                await self._begin()
                try:
                    yield Tx(self._db)
                except BaseException:
                    await self._db.execute("ROLLBACK")
                    raise
                await self._db.execute("COMMIT")

    async def _begin(self) -> None:
        delay = 0.01
        while True:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                await anyio.sleep(delay)  # busy_timeout ran out: another writer is slow
                delay = min(delay * 2, 1.0)

    async def fetchall(self, query: str, **params: Any) -> list[Row]:
        async with self._lock, self._db.execute(Q[query], params) as cur:
            return [dict(r) for r in await cur.fetchall()]

    async def fetchone(self, query: str, **params: Any) -> Row | None:
        rows = await self.fetchall(query, **params)
        return rows[0] if rows else None

    # -- the queue ---------------------------------------------------------------------

    async def insert_job(
        self,
        *,
        job_id: str,
        name: str,
        spec: str,
        spec_sha256: str,
        config: str,
        config_digest: str,
        not_before: str | None,
        tasks: Iterable[tuple[str, str]],
        reason: str = "job file accepted",
        schedule_run: dict[str, Any] | None = None,
    ) -> None:
        """Insert a job, its tasks and its first history line, then mark it queued.

        With `schedule_run`, the schedule slot's row goes in the same transaction.
        """
        now = now_iso()
        async with self.transaction() as tx:
            await tx.run(
                "insert_job",
                id=job_id,
                name=name,
                spec=spec,
                spec_sha256=spec_sha256,
                config=config,
                config_digest=config_digest,
                not_before=not_before,
                now=now,
            )
            await tx.run(
                "insert_history",
                job_id=job_id,
                state=State.UNINITIALIZED,
                now=now,
                reason=reason,
            )
            for kind, task in tasks:
                await tx.run("insert_task", job_id=job_id, kind=kind, name=task, now=now)
            if schedule_run is not None:
                await tx.run("insert_schedule_run", **schedule_run)
            await tx.transition(
                job_id,
                State.UNINITIALIZED,
                Event.INITIALIZED,
                f"ready; not before {not_before}" if not_before else "ready",
            )

    async def transition(
        self, job_id: str, state: State, event: Event, reason: str, **fields: Any
    ) -> State:
        async with self.transaction() as tx:
            return await tx.transition(job_id, state, event, reason, **fields)

    async def claim_next(self, config: str, config_digest: str) -> Row | None:
        """The oldest due queued job, now activity_archiving on `config`; or None."""
        async with self.transaction() as tx:
            rows = await tx.all(
                "claim_next",
                to_state=State.ACTIVITY_ARCHIVING,
                now=now_iso(),
                config=config,
                config_digest=config_digest,
            )
            if not rows:
                return None
            job = rows[0]
            await tx.run(
                "insert_history",
                job_id=job["id"],
                state=job["state"],
                now=job["updated_at"],
                reason=f"triggered by the poll loop; config {config_digest}",
            )
            return job

    async def update_job(self, job_id: str, **fields: Any) -> None:
        async with self.transaction() as tx:
            await tx.update_job(job_id, **fields)

    async def job(self, job_id: str) -> Row | None:
        return await self.fetchone("get_job", id=job_id)

    async def jobs_in(self, states: Iterable[State]) -> list[Row]:
        return await self.fetchall("jobs_in_states", states=json.dumps(sorted(states)))

    async def queue_depth(self, now: datetime) -> tuple[int, datetime | None]:
        """How many queued jobs are due at `now`, and since when the one waiting longest
        has been due (None: the queue is empty)."""
        row = await self.fetchone("queue_depth", now=_iso(now))
        if row is None or not row["n"]:
            return 0, None
        return int(row["n"]), datetime.fromisoformat(row["oldest"])

    async def last_success_by_schedule(self) -> dict[str, datetime]:
        """When each schedule last completed a job, or skipped a slot as unchanged since."""
        rows = await self.fetchall("last_success_by_schedule")
        return {r["schedule"]: datetime.fromisoformat(r["at"]) for r in rows}

    async def schedules_first_seen(self) -> dict[str, datetime]:
        """When each schedule first appeared in a config the daemon ran on."""
        rows = await self.fetchall("schedules_first_seen")
        return {r["schedule"]: datetime.fromisoformat(r["first_seen"]) for r in rows}


class Tx:
    """The statements of one open transaction."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def run(self, query: str, **params: Any) -> int:
        cur = await self._db.execute(Q[query], params)
        count = cur.rowcount
        await cur.close()
        return count

    async def all(self, query: str, **params: Any) -> list[Row]:
        async with self._db.execute(Q[query], params) as cur:
            return [dict(r) for r in await cur.fetchall()]

    async def update_job(self, job_id: str, **fields: Any) -> None:
        if not fields:
            return
        unknown = set(fields) - JOB_COLUMNS
        assert not unknown, f"not a job column: {unknown}"
        assignments = ", ".join(f"{column} = :{column}" for column in sorted(fields))
        await self._db.execute(
            f"UPDATE jobs SET {assignments} WHERE id = :id", {**fields, "id": job_id}
        )

    async def transition(
        self, job_id: str, state: State, event: Event, reason: str, **fields: Any
    ) -> State:
        """Move the job from `state` by `event`, with history; StaleState if it moved."""
        to_state = next_state(state, event)
        now = now_iso()
        changed = await self.run(
            "set_state", id=job_id, from_state=state, to_state=to_state, now=now
        )
        if changed != 1:
            raise StaleState(f"job {job_id} is no longer {state}")
        await self.update_job(job_id, **fields)
        await self.run("insert_history", job_id=job_id, state=to_state, now=now, reason=reason)
        return to_state
