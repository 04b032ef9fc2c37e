"""The queue store on a real SQLite file: migrations of a populated database, typed rows,
and what the claim takes."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from archived.states import State
from archived.store import Job, NewEvent, NewJob, StaleState, Store, now_iso, peeked, utcnow
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


async def test_the_claim_counts_the_first_phase_attempt_in_its_commit(store: Store) -> None:
    """No commit of its own for the attempt of activity_archiving: the claim counts it."""
    await store.insert_job(
        NewJob("j1", "one", "{}", "-", "{}", "d", None, (("activity", "a"),)), reason="new"
    )
    claim = await store.claim_next("{}", "d")
    assert claim is not None and claim.how == "triggered"
    assert (claim.job.state, claim.job.phase, claim.job.attempts) == (
        State.ACTIVITY_ARCHIVING,
        State.ACTIVITY_ARCHIVING.value,
        1,
    )
    stored = await store.job("j1")
    assert stored is not None and (stored.phase, stored.attempts) == ("activity_archiving", 1)


async def test_a_transition_from_a_state_the_job_left_changes_nothing(store: Store) -> None:
    """StaleState, and the transaction undone: no history row, no field changed (the
    check goes with the writes, not before them)."""
    await store.insert_job(
        NewJob("j1", "one", "{}", "-", "{}", "d", None, (("activity", "a"),)), reason="new"
    )
    assert await store.claim_next("{}", "d") is not None  # activity_archiving, ours
    before = await store.history("j1")
    with pytest.raises(StaleState, match="no longer post_processing"):
        await store.transition(
            "j1", State.POST_PROCESSING, "error", "boom", error="should not be kept"
        )
    job = await store.job("j1")
    assert job is not None and (job.state, job.error) == (State.ACTIVITY_ARCHIVING, None)
    assert await store.history("j1") == before
    moved = await store.transition("j1", State.ACTIVITY_ARCHIVING, "done", "by hand")
    assert moved.state == State.POST_PROCESSING


async def test_the_job_log_is_its_history_and_its_events_in_one_read(store: Store) -> None:
    """What the bag's event log is made of, read at once, as the two reads give it:
    transitions and events each in their order, details as they were recorded."""
    await store.insert_job(
        NewJob("j1", "one", "{}", "-", "{}", "d", None, (("activity", "a"),)), reason="new"
    )
    await store.insert_job(
        NewJob("j2", "two", "{}", "-", "{}", "d", None, (("activity", "a"),)), reason="new"
    )
    for _ in ("j1", "j2"):  # both ours
        assert await store.claim_next("{}", "d") is not None
    await store.add_event("j1", "first", {"n": 1, "text": "ä\n"})
    await store.transition(
        "j1",
        State.ACTIVITY_ARCHIVING,
        "done",
        "moved",
        events=[NewEvent("second", {"list": [1, 2]}, utcnow())],
    )
    await store.add_event("j2", "other job", {})
    history, events = await store.job_log("j1")
    assert (history, events) == (await store.history("j1"), await store.events("j1"))
    assert [h.state for h in history] == ["uninitialized", "queued", "activity_archiving",
                                          "post_processing"]  # fmt: skip
    assert [(e.kind, e.detail) for e in events] == [
        ("first", {"n": 1, "text": "ä\n"}),
        ("second", {"list": [1, 2]}),
    ]
    assert await store.job_log("nothing") == ([], [])


# -- every migration, one at a time, over rows written in the form of their time ---------

T0 = "2026-01-02T03:04:05+00:00"  # forms that older code wrote: offset, no fraction, ...
T1 = "2026-01-02T03:04:06.500000Z"
T2 = "2026-01-03T01:00:00.123456+00:00"
KEYS = {  # each table's rows, told apart
    "jobs": ("id",),
    "tasks": ("job_id", "kind", "name"),
    "history": ("seq",),
    "events": ("seq",),
    "copies": ("job_id", "target"),
    "audits": ("seq",),
    "audit_totals": ("result",),
    "schedule_runs": ("schedule", "slot"),
    "schedules_seen": ("schedule",),
    "orphans": ("job_id", "target", "key"),
}


def job_row(job_id: str, state: str = "completed", **more: Any) -> tuple[str, dict[str, Any]]:
    return "jobs", {
        "id": job_id,
        "name": f"job {job_id}",
        "state": state,
        "spec": "{}",
        "spec_sha256": "-",
        "config": "{}",
        "config_digest": "d",
        "created_at": T0,
        "updated_at": T1,
        **more,
    }


# What each migration's schema could hold that the one before could not, written right
# after that migration: the next ones must keep all of it.
ROWS_OF_THEIR_TIME: dict[int, list[tuple[str, dict[str, Any]]]] = {
    1: [
        job_row("j1", archive_name="a.tar", archive_size=10, started_at=T0),
        (
            "tasks",
            {
                "job_id": "j1",
                "kind": "activity",
                "name": "a",
                "state": "completed",
                "result": '{"files": 1}',
                "updated_at": T1,
            },
        ),
        ("history", {"job_id": "j1", "state": "queued", "at": T0, "reason": "accepted"}),
        ("events", {"job_id": "j1", "at": T1, "kind": "warning", "detail": '{"message": "m"}'}),
        (
            "copies",
            {
                "job_id": "j1",
                "target": "primary",
                "path": "/p/a.tar",
                "size": 10,
                "sha256": "s",
                "verified_at": T1,
            },
        ),
        job_row("j2", "recoverable_error", retry_at=T2, phase="store", attempts=2),
    ],
    2: [
        (
            "tasks",
            {
                "job_id": "j2",
                "kind": "storage",
                "name": "primary",
                "state": "executing",
                "updated_at": T2,
                "progress": '{"bytes": 5}',
            },
        )
    ],
    3: [
        (
            "copies",
            {
                "job_id": "j2",
                "target": "offsite",
                "path": "/o/a.tar",
                "size": 10,
                "sha256": "s",
                "verified_at": T0,
                "audited_at": T1,
                "audit_result": "ok",
            },
        ),
        (
            "audits",
            {
                "job_id": "j1",
                "target": "primary",
                "at": T1,
                "result": "damaged",
                "detail": "sha256 differs",
            },
        ),
    ],
    4: [job_row("j3", expires_at=T2, legal_hold=1)],
    5: [
        (
            "schedule_runs",
            {
                "schedule": "nightly",
                "slot": T2,
                "result": "created",
                "job_id": "j3",
                "fingerprint": "f",
                "at": T2,
            },
        ),
        ("schedules_seen", {"schedule": "nightly", "first_seen": T0}),
    ],
    6: [
        (
            "orphans",
            {
                "job_id": "j1",
                "target": "offsite",
                "key": "k/a.tar",
                "reason": "gone",
                "recorded_at": T1,
            },
        )
    ],
    7: [
        job_row("j4", "cleanup", cleanup_attempts=2),
        (
            "audits",
            {
                "job_id": "j1",
                "target": "offsite",
                "at": T2,
                "result": "unreachable",
                "detail": "no answer",
            },
        ),
    ],
    8: [  # the form of today: fixed-width UTC
        job_row(
            "j5",
            "store",
            owner="host",
            lease_until="2026-01-03T01:00:30.000000Z",
            created_at="2026-01-03T01:00:00.000000Z",
            updated_at="2026-01-03T01:00:00.000000Z",
        )
    ],
}


def same(value: Any) -> Any:
    """A value as a migration may rewrite it without changing it: times to the instant."""
    if isinstance(value, str) and len(value) >= 19 and value[4] == "-" and value[10] == "T":
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return value


def snapshot(path: Path) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    found = {
        table: {
            tuple(same(row[k]) for k in keys): {k: same(row[k]) for k in row.keys()}  # noqa: SIM118
            for row in db.execute(f"SELECT * FROM {table}")
        }
        for table, keys in KEYS.items()
        if table in tables
    }
    db.close()
    return found


async def test_each_migration_keeps_every_row_written_before_it(tmp_path: Path) -> None:
    path = tmp_path / "archived.db"
    numbers = [number for number, _ in migrations("sqlite")]
    assert sorted(ROWS_OF_THEIR_TIME) == numbers, "a new migration: add the rows of its time"
    before: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    for number in numbers:
        connector = await SqliteConnector.open_at(path, upto=number)
        await connector.close()
        after = snapshot(path)
        for table, rows in before.items():
            for key, row in rows.items():
                assert key in after[table], f"migration {number} lost {table} {key}"
                kept = {k: after[table][key][k] for k in row}
                assert kept == row, f"migration {number} changed {table} {key}"
        db = sqlite3.connect(path, isolation_level=None)
        for table, values in ROWS_OF_THEIR_TIME[number]:
            names = ", ".join(values)
            marks = ", ".join("?" * len(values))
            db.execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", tuple(values.values()))
        db.close()
        before = snapshot(path)

    store = await SqliteStore.open(path, "host")  # the last migration already ran
    try:
        assert {j.id for j in await store.jobs()} == {"j1", "j2", "j3", "j4", "j5"}
        waits = await store.job("j2")
        assert waits is not None and waits.waiting
        assert waits.retry_at == datetime(2026, 1, 3, 1, 0, 0, 123456, tzinfo=UTC)
        held = await store.job("j3")
        assert held is not None and held.legal_hold and held.expires_at is not None
        assert [a.result for a in await store.audits("j1")] == ["damaged", "unreachable"]
        (orphan,) = await store.orphans("j1")
        assert orphan.recorded_at == datetime(2026, 1, 2, 3, 4, 6, 500000, tzinfo=UTC)
        (run,) = await store.schedule_runs("nightly", 10)
        assert run.job_id == "j3" and run.slot == datetime(2026, 1, 3, 1, 0, 0, 123456, tzinfo=UTC)
        raw = sqlite3.connect(path).execute("SELECT created_at, retry_at FROM jobs").fetchall()
        assert all(len(t) == 27 and t.endswith("Z") for row in raw for t in row if t)
    finally:
        await store.close()


def test_a_peek_that_sees_tasks_of_a_job_it_did_not_see_leaves_them_out() -> None:
    """A state reader reads jobs, then tasks, in two statements: a job inserted between
    the two has tasks but no row yet. `submit --wait` (and the tests' `wait_state`)
    must not fail on it; the next peek sees both."""
    task = {"job_id": "new", "kind": "activity", "name": "a", "state": "created"}
    task |= {"attempts": 0, "error": None, "result": None, "updated_at": now_iso()}
    assert peeked([], [task]) == {}


async def test_two_openers_of_a_new_database_migrate_it_once(tmp_path: Path) -> None:
    """The daemon's first start and an `archived show` at that moment: both find no
    schema and migrate; the second waits for the first and finds its work done, not
    "table jobs already exists"."""
    path = tmp_path / "archived.db"
    opened: list[SqliteConnector] = []

    async def open_one() -> None:
        opened.append(await SqliteConnector.open_at(path))

    for _ in range(3):  # a race: give it a few chances to show
        path.unlink(missing_ok=True)
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(open_one)
        for connector in opened:
            await connector.close()
        opened.clear()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == max(
            n for n, _ in migrations("sqlite")
        )
    finally:
        db.close()
