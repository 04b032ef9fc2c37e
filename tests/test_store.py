"""The queue store on a real SQLite file: migrations of a populated database, typed rows,
and what the claim takes."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from archived.states import State
from archived.store import Job, NewJob, Store, peeked, utcnow
from archived.store_sql import load_queries, migrations
from archived.store_sqlite import SqliteConnector, SqliteStore


def test_both_backends_name_the_same_queries() -> None:
    """One list of domain operations; PostgreSQL has the leases' on top."""
    sqlite, postgres = load_queries("sqlite").keys(), load_queries("postgres").keys()
    leases = {"hold_lease", "renew_leases", "lock_owner", "notify", "try_lead", "stop_leading"}
    leases |= {"lease_mine", "any_job"}  # and moving an SQLite queue in
    assert postgres - sqlite == leases
    assert sqlite <= postgres


def insert_old_job(db: sqlite3.Connection, job_id: str, state: str, **times: str) -> None:
    """A job row as migration 0001 knew it, its timestamps in the forms of the time."""
    created = times.pop("created_at", "2026-01-02T03:04:05.123456Z")
    db.execute(
        "INSERT INTO jobs (id, name, state, spec, spec_sha256, config, config_digest, "
        "created_at, updated_at, not_before, retry_at, phase) "
        "VALUES (?, 'old', ?, '{}', '-', '{}', 'd', ?, ?, ?, ?, ?)",
        (
            job_id,
            state,
            created,
            created,
            times.get("not_before"),
            times.get("retry_at"),
            times.get("phase"),
        ),
    )
    db.execute(
        "INSERT INTO history (job_id, state, at, reason) VALUES (?, ?, ?, 'old')",
        (job_id, state, created),
    )


async def test_a_populated_database_migrates_from_the_first_migration_to_the_last(
    tmp_path: Path,
) -> None:
    path = tmp_path / "archived.db"
    first = await SqliteConnector.open_at(path, upto=1)
    await first.close()
    db = sqlite3.connect(path, isolation_level=None)
    insert_old_job(db, "due", "queued", not_before="2020-01-01T00:00:00+00:00")
    insert_old_job(db, "later", "queued", not_before="2999-01-01T00:00:00Z")
    insert_old_job(
        db,
        "waits",
        "recoverable_error",
        created_at="2026-01-01T00:00:00Z",
        retry_at="2999-01-01T00:00:00.500000+00:00",
        phase="store",
    )
    db.execute(
        "INSERT INTO copies (job_id, target, path, size, sha256, verified_at) "
        "VALUES ('due', 't', 'p', 1, 's', '2026-01-02T03:04:06+00:00')"
    )
    db.close()
    store = await SqliteStore.open(path, "host")
    try:
        (version,) = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()
        assert version == migrations("sqlite")[-1][0]
        job = await store.job("waits")
        assert isinstance(job, Job) and job.state == State.RECOVERABLE_ERROR
        assert job.created_at == datetime(2026, 1, 1, tzinfo=UTC)
        assert job.retry_at == datetime(2999, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)
        assert job.waiting and job.owner is None
        (copy,) = await store.copies("due")
        assert copy.verified_at == datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC)
        (history,) = await store.history("due")
        assert history.at == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
        raw = sqlite3.connect(path).execute("SELECT not_before, retry_at FROM jobs").fetchall()
        assert all(len(t) == 27 and t.endswith("Z") for row in raw for t in row if t)

        # the claim compares the migrated times right: only the due job is taken
        claim = await store.claim_next("{}", "new")
        assert claim is not None and claim.job.id == "due" and claim.how == "triggered"
        assert claim.job.state == State.ACTIVITY_ARCHIVING and claim.job.owner == "host"
        assert await store.claim_next("{}", "new", busy={"due"}) is None
    finally:
        await store.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A store of each backend, on a real database."""
    if request.param == "sqlite":
        opened: Store = await SqliteStore.open(tmp_path / "archived.db", "host")
    else:
        from archived.store_pg import PgConnector, PgStore

        url = request.getfixturevalue("pg_url")
        opened = PgStore(await PgConnector.open(url), "host", lease=30)
    try:
        yield opened
    finally:
        await opened.close()


async def test_a_waiting_job_is_claimed_when_due_and_holds_nothing_before(
    store: Store,
) -> None:
    await store.insert_job(
        NewJob("j1", "one", "{}", "-", "{}", "d", None, (("activity", "a"),)), reason="new"
    )
    claim = await store.claim_next("{}", "d")
    assert claim is not None and claim.job.owner == "host"
    await store.update_job("j1", phase=State.ACTIVITY_ARCHIVING.value, attempts=1)
    await store.transition("j1", State.ACTIVITY_ARCHIVING, "error", "boom", error="boom")
    soon = utcnow() + timedelta(seconds=0.2)
    await store.transition("j1", State.ERROR, "recoverable", "again", retry_at=soon)
    assert await store.claim_next("{}", "d") is None  # not due yet
    assert await store.resumable() == []  # and nothing to resume: it runs nowhere
    claim = None
    while claim is None:  # polled until due (the test's own timeout bounds it)
        claim = await store.claim_next("{}", "d")
    assert utcnow() >= soon and claim.how == "retry"
    assert claim.job.state == State.ACTIVITY_ARCHIVING and claim.job.retry_at is None
    reasons = [h.reason for h in await store.history("j1")]
    assert reasons[-1] == "backoff over: re-entering activity_archiving"


def test_a_peek_leaves_out_tasks_whose_job_it_did_not_read() -> None:
    """A reader reads jobs, then tasks: a job queued between the two reads has tasks and
    no job yet. It is not there for this peek (submit --wait looks again), not a KeyError."""
    task = {
        "job_id": "new",
        "kind": "storage",
        "name": "primary",
        "state": "created",
        "attempts": 0,
        "error": None,
        "result": None,
    }
    assert peeked([], [task]) == {}
