"""The SQLite store's group commit: transactions queued behind one another share one
COMMIT (one flush), an error undoes its own transaction alone, a failed COMMIT fails
every member, and nothing is reported done before it is on disk."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from archived.store_sqlite import SqliteConnector, SqliteTx

SCHEMA = (
    "CREATE TABLE t (n INTEGER PRIMARY KEY)",
    "CREATE TABLE parent (id INTEGER PRIMARY KEY)",
    "CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)",
)


async def opened(path: Path) -> SqliteConnector:
    db = await SqliteConnector.open(path)
    async with db.transaction() as tx:
        for sql in SCHEMA:
            await tx.execute(sql, {})
    return db


def rows(path: Path, table: str = "t") -> list[int]:
    """What another connection sees: what was committed."""
    with sqlite3.connect(path) as db:
        return sorted(r[0] for r in db.execute(f"SELECT * FROM {table}"))


class Boom(Exception):
    pass


async def test_concurrent_transactions_share_one_commit(tmp_path: Path) -> None:
    db = await opened(tmp_path / "q.db")
    before = db.commits
    done: list[int] = []

    async def insert(n: int) -> None:
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO t (n) VALUES (:n)", {"n": n})
        done.append(n)
        assert n in rows(tmp_path / "q.db")  # returned: committed, for everyone

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(insert, n)
    assert sorted(done) == rows(tmp_path / "q.db") == list(range(8))
    assert db.commits - before == 1  # eight transactions, one COMMIT
    async with db.transaction() as tx:  # alone, a transaction commits at once
        await tx.execute("INSERT INTO t (n) VALUES (100)", {})
    assert db.commits - before == 2
    await db.close()


async def concurrently(
    db: SqliteConnector, count: int, then: Callable[[SqliteTx, int], Awaitable[None]]
) -> dict[int, str]:
    """`count` transactions at once, each inserting its number and then doing `then`;
    what became of each: "done", or the SQLite name (else the type) of its error."""
    outcome: dict[int, str] = {}

    async def one(n: int) -> None:
        try:
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO t (n) VALUES (:n)", {"n": n})
                await then(tx, n)
            outcome[n] = "done"
        except Exception as exc:
            outcome[n] = getattr(exc, "sqlite_errorname", type(exc).__name__)

    async with anyio.create_task_group() as tg:
        for n in range(count):
            tg.start_soon(one, n)
    return outcome


async def test_an_error_undoes_its_own_transaction_and_keeps_the_others(tmp_path: Path) -> None:
    db = await opened(tmp_path / "q.db")
    before = db.commits

    async def second_row(tx: SqliteTx, n: int) -> None:
        await tx.execute("INSERT INTO t (n) VALUES (:n)", {"n": n + 100})
        if n == 2:
            raise Boom

    outcome = await concurrently(db, 5, second_row)
    assert outcome == {0: "done", 1: "done", 2: "Boom", 3: "done", 4: "done"}
    assert rows(tmp_path / "q.db") == [0, 1, 3, 4, 100, 101, 103, 104]
    assert db.commits - before == 1
    with pytest.raises(Boom):  # a failing transaction alone leaves no transaction open
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO t (n) VALUES (7)", {})
            raise Boom
    with sqlite3.connect(tmp_path / "q.db", timeout=0.1) as other:  # the write lock is free
        other.execute("INSERT INTO t (n) VALUES (8)")
    assert rows(tmp_path / "q.db") == [0, 1, 3, 4, 8, 100, 101, 103, 104]
    await db.close()


async def test_a_failed_commit_fails_every_member_and_keeps_none(tmp_path: Path) -> None:
    """A deferred foreign key makes the group's COMMIT itself fail."""
    db = await opened(tmp_path / "q.db")

    async def orphan_child(tx: SqliteTx, n: int) -> None:
        if n == 1:  # no such parent: checked at COMMIT
            await tx.execute("INSERT INTO child (p) VALUES (42)", {})

    outcome = await concurrently(db, 3, orphan_child)
    assert set(outcome.values()) == {"SQLITE_CONSTRAINT_FOREIGNKEY"}, outcome
    assert rows(tmp_path / "q.db") == []
    async with db.transaction() as tx:  # and the next one goes through
        await tx.execute("INSERT INTO t (n) VALUES (9)", {})
    assert rows(tmp_path / "q.db") == [9]
    await db.close()


async def test_a_group_that_sqlite_rolled_back_fails_every_member_in_it(
    tmp_path: Path,
) -> None:
    """As on a full disk: a statement's error ends the whole transaction. Its members
    get that error (with its SQLite error name); the next transaction starts afresh."""
    db = await opened(tmp_path / "q.db")

    async def disk_full(tx: SqliteTx, n: int) -> None:
        if n == 1:
            await tx.execute("ROLLBACK", {})  # what SQLite does on SQLITE_FULL
            await tx.all("ping")  # a read sends the writes that wait
            full = sqlite3.OperationalError("database or disk is full")
            full.sqlite_errorname = "SQLITE_FULL"  # type: ignore[attr-defined]
            raise full

    outcome = await concurrently(db, 3, disk_full)
    assert outcome == {0: "SQLITE_FULL", 1: "SQLITE_FULL", 2: "done"}
    assert rows(tmp_path / "q.db") == [2]
    await db.close()


async def test_a_write_that_must_change_a_row_undoes_its_member_alone(tmp_path: Path) -> None:
    """`must_change` is checked when the member's statements reach SQLite (at its end):
    the member that changed nothing raises its error and is undone; the group's
    others commit."""
    db = await opened(tmp_path / "q.db")

    async def bump(tx: SqliteTx, n: int) -> None:
        await tx.execute("INSERT INTO t (n) VALUES (:n)", {"n": n + 10})
        if n == 1:  # no such copy: stale
            await tx.must_change("delete_copy", Boom("gone"), job_id="none", target="t")

    before = db.commits
    outcome = await concurrently(db, 3, bump)
    assert outcome == {0: "done", 1: "Boom", 2: "done"}
    assert rows(tmp_path / "q.db") == [0, 2, 10, 12]
    assert db.commits - before == 1
    await db.close()


async def test_a_transaction_alone_is_one_trip_to_the_database_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BEGIN, its writes and the COMMIT go to aiosqlite's thread at once; a read in
    between takes what waits with it."""
    import archived.store_sqlite as store_sqlite

    db = await opened(tmp_path / "q.db")
    trips: list[int] = []
    hop = store_sqlite._in_db_thread

    def counted(
        conn: object, fn: Callable[..., object], batch: list[object], *rest: object
    ) -> object:
        trips.append(len(batch))
        return hop(conn, fn, batch, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(store_sqlite, "_in_db_thread", counted)
    async with db.transaction() as tx:
        for n in range(5):
            await tx.execute("INSERT INTO t (n) VALUES (:n)", {"n": n})
    assert trips == [6]  # BEGIN and five INSERTs; the COMMIT with them
    async with db.transaction() as tx:
        await tx.execute("INSERT INTO t (n) VALUES (5)", {})
        assert len(await tx.all("ping")) == 1
        await tx.execute("INSERT INTO t (n) VALUES (6)", {})
    assert trips == [6, 3, 1]
    assert rows(tmp_path / "q.db") == list(range(7))
    await db.close()


async def test_reads_see_committed_data_only(tmp_path: Path) -> None:
    db = await opened(tmp_path / "q.db")
    async with db.transaction() as tx:
        await tx.execute("INSERT INTO t (n) VALUES (1)", {})
        assert await db.fetch_sql("SELECT n FROM t") == []
    assert await db.fetch_sql("SELECT n FROM t") == [{"n": 1}]
    await db.close()


CHILD = textwrap.dedent(
    """
    import sys, anyio
    from pathlib import Path
    from archived.store_sqlite import SqliteConnector

    async def main(path):
        db = await SqliteConnector.open(Path(path))
        async with db.transaction() as tx:
            await tx.execute("CREATE TABLE t (n INTEGER PRIMARY KEY)", {})
        print("ready", flush=True)

        async def writer(k):
            for i in range(k, 1_000_000, 4):
                async with db.transaction() as tx:
                    await tx.execute("INSERT INTO t (n) VALUES (:n)", {"n": i})
                print(i, flush=True)  # reported done

        async with anyio.create_task_group() as tg:
            for k in range(4):
                tg.start_soon(writer, k)

    anyio.run(main, sys.argv[1])
    """
)


def test_a_transaction_reported_done_survives_a_kill(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    reported: list[int] = []
    deadline = time.monotonic() + 60
    while len(reported) < 200 and time.monotonic() < deadline:
        reported.append(int(child.stdout.readline()))
    child.send_signal(signal.SIGKILL)
    child.wait()
    reported += [int(line) for line in child.stdout.read().split()]  # printed before the kill
    assert len(reported) >= 200
    kept = set(rows(path))
    assert set(reported) <= kept
