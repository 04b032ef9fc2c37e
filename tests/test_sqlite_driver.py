"""Activity driver `sqlite`, through the daemon in process: a consistent snapshot while
another process writes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import anyio
import pytest
from conftest import Root, wait_until

from archived.drivers import sqlite as sqlite_driver

WRITER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
i = 0
while True:
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO t (n, pad) VALUES (?, randomblob(2000))", (i,))
    db.execute("UPDATE counter SET n = n + 1")
    db.execute("COMMIT")
    i += 1
"""


def written(path: Path) -> bool:
    db = sqlite3.connect(path, timeout=5)
    try:
        return bool(db.execute("SELECT n FROM counter").fetchone()[0])
    finally:
        db.close()


def db_job(root: Root, name: str, path: Path) -> Path:
    return root.job_file(name, activities=[{"name": "db", "driver": "sqlite", "path": str(path)}])


async def test_snapshot_of_a_database_being_written(root: Root, tmp_path: Path) -> None:
    db_path = root.sources / "live.db"
    db = sqlite3.connect(db_path)
    db.executescript(
        "PRAGMA journal_mode=WAL; CREATE TABLE t (n INTEGER, pad BLOB);"
        "CREATE TABLE counter (n INTEGER); INSERT INTO counter VALUES (0);"
    )
    db.executemany("INSERT INTO t VALUES (?, randomblob(2000))", [(i,) for i in range(5000)])
    db.commit()
    db.close()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db_path)])
    try:
        wait_until(lambda: written(db_path), 30, "the writer busy")
        (job_id,) = root.drop(db_job(root, "snap", db_path))
        await root.run_until_idle()
        job = await root.details(job_id)
    finally:
        writer.kill()
        writer.wait()
    assert job["state"] == "completed", job
    archive = root.archives("primary")[0]
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/data/db/live.db"))
        snapshot = tmp_path / "snapshot.db"
        f = tar.extractfile(member)
        assert f is not None
        snapshot.write_bytes(f.read())
    check = sqlite3.connect(snapshot)
    assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    rows, counter = check.execute("SELECT count(*), (SELECT n FROM counter) FROM t").fetchone()
    assert counter > 0  # the writer was busy while the snapshot was taken
    assert rows == 5000 + counter  # one consistent state: every insert with its count
    assert await root.command("verify", "--key", str(root.public_key), str(archive)) == 0


async def test_a_file_that_is_not_a_database_fails(root: Root) -> None:
    bogus = root.sources / "notes.db"
    bogus.write_text("this is not a database, just text " * 100)
    (job_id,) = root.drop(db_job(root, "bogus", bogus))
    await root.run_until_idle()
    job = await root.details(job_id)
    assert job["state"] == "failed"
    assert "not a database" in job["error"]
    assert root.all_target_files() == []


async def test_a_database_outside_the_roots_is_refused(
    root: Root, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = tmp_path / "elsewhere.db"
    sqlite3.connect(outside).close()
    assert await root.command("submit", str(db_job(root, "outside", outside))) == 2
    assert "outside sources.allowed_roots" in capsys.readouterr().err


HOLDER = """
import sqlite3, sys

db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()  # until the test closes it
db.execute("ROLLBACK")
"""


@pytest.mark.slow  # waits out the driver's busy timeout: about 15 s
async def test_a_locked_database_is_waited_for_not_failed(
    root: Root, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another program holds the database locked (a long write, a backup tool): the
    snapshot is tried again later, as with any error that may pass."""
    monkeypatch.setattr(sqlite_driver, "LOCK_WAIT", 1.0)  # 10 s in one attempt, by default
    db_path = root.sources / "busy.db"
    db = sqlite3.connect(db_path)
    db.executescript("CREATE TABLE t (n INTEGER); INSERT INTO t VALUES (1);")
    db.close()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(db_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline() == "locked\n"
    root.write_config(retry={"backoff": "200ms", "backoff_max": "1s", "max_attempts": 100})
    (job_id,) = root.drop(db_job(root, "busy", db_path))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(root.run_until_idle)
            job = await root.wait_for(job_id, "recoverable_error", "failed", "completed")
            assert job["state"] == "recoverable_error", job
            assert "locked" in job["error"]
            holder.stdin.close()
    finally:
        if not holder.stdin.closed:
            holder.stdin.close()
        holder.wait()
    job = await root.details(job_id)
    assert job["state"] == "completed", job
