"""Intake in-process: job files in the spool into job rows on a real queue, or into
corrupt/ with the reason; and a schedule's job, which wakes the poll loop."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from jobrows import services, write_config
from structlog.testing import capture_logs

from archived.config import Config
from archived.intake import Intake, Pinned
from archived.jobfile import parse_job
from archived.spool import Spool
from archived.states import State
from archived.store import ScheduleRun
from archived.store_open import open_store


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return write_config(tmp_path)


@pytest.fixture
def woken() -> list[int]:
    """Each time intake woke the poll loop."""
    return []


@pytest.fixture
async def intake(config: Config, woken: list[int]) -> AsyncIterator[Intake]:
    store = await open_store(config)
    assert store is not None
    svc = services(store, config)
    spool = Spool(config.daemon.spool_dir)
    spool.create()
    pinned = Pinned.of(config)
    try:
        yield Intake(spool, svc, lambda: pinned, lambda: woken.append(1))
    finally:
        await store.close()


def job_file(config: Config, name: str = "nightly") -> bytes:
    source = str(config.sources.allowed_roots[0])
    activity = {"name": "a", "driver": "files", "path": source}
    return json.dumps({"name": name, "activities": [activity]}).encode()


async def test_a_job_file_becomes_a_queued_job(intake: Intake, config: Config) -> None:
    job_id = intake.spool.submit(job_file(config), ".json")
    with capture_logs() as events:
        await intake.ingest()
    job = await intake.svc.store.job(job_id)
    assert job is not None and job.state == State.QUEUED and job.name == "nightly"
    pinned = Pinned.of(config)
    assert (job.config, job.config_digest) == (pinned.snapshot, pinned.digest)
    tasks = sorted((t.kind, t.name) for t in await intake.svc.store.tasks(job_id))
    assert tasks == [("activity", "a"), ("storage", "primary")]
    assert await intake.spool.pending() == []
    assert [e["event"] for e in events] == ["job queued"]


async def test_a_bad_job_file_goes_to_corrupt_with_the_reason(
    intake: Intake, config: Config
) -> None:
    job_id = intake.spool.submit(b'{"name": "x", "activities": []', ".json")
    with capture_logs() as events:
        await intake.ingest()
    assert await intake.svc.store.job(job_id) is None
    (reason,) = (config.daemon.spool_dir / "corrupt").glob(f"{job_id}.*.reason")
    assert reason.read_text()
    (event,) = events
    assert event["event"] == "job file rejected" and event["log_level"] == "error"


async def test_a_schedules_job_wakes_the_poll_loop(
    intake: Intake, config: Config, woken: list[int]
) -> None:
    spec = parse_job(job_file(config, "from-cron"), "from-cron.json", config)
    slot = datetime(2026, 1, 1, tzinfo=UTC)
    run = ScheduleRun(schedule="nightly", slot=slot, result="created", job_id="s1", detail="")
    assert await intake.create_scheduled(spec, "s1", "0" * 64, run)
    job = await intake.svc.store.job("s1")
    assert job is not None and job.state == State.QUEUED
    assert woken == [1]
    # the slot is taken: a second daemon's try inserts nothing
    assert not await intake.create_scheduled(spec, "s2", "0" * 64, run)
    assert await intake.svc.store.job("s2") is None


async def test_a_burst_of_job_files_is_queued_in_their_order_sharing_commits(
    intake: Intake, config: Config
) -> None:
    """Intake takes entries in batches: their jobs' transactions share a commit, and the
    jobs are queued in the order of their files (oldest first)."""
    ids = []
    for i in range(40):
        job_id = intake.spool.submit(job_file(config, f"j{i}"), ".json")
        os.utime(intake.spool.incoming / f"{job_id}.json", ns=(i * 10**9, i * 10**9))
        ids.append(job_id)
    connector = intake.svc.store.sqlite  # type: ignore[attr-defined]
    commits = connector.commits
    with capture_logs() as events:
        await intake.ingest()
    assert [e["event"] for e in events] == ["job queued"] * 40
    jobs = [await intake.svc.store.job(job_id) for job_id in ids]
    assert all(j is not None and j.state == State.QUEUED for j in jobs)
    created = [j.created_at for j in jobs if j is not None]
    assert created == sorted(created) and len(set(created)) == 40
    assert connector.commits - commits <= 40 // 8, connector.commits - commits
    assert await intake.spool.pending() == []
    assert list(intake.spool.active.iterdir()) == []


async def test_two_files_of_one_job_id_in_one_burst_make_one_job(
    intake: Intake, config: Config
) -> None:
    """`<id>.json` and `<id>.toml` taken in one poll: the second finds the first's job
    (the same bytes: spent; other bytes: corrupt/, the id exists)."""
    data = job_file(config)
    first = intake.spool.submit(data, ".json")
    (intake.spool.incoming / f"{first}.toml").write_bytes(data)
    second = intake.spool.submit(data, ".json")
    (intake.spool.incoming / f"{second}.toml").write_bytes(job_file(config, "other"))
    with capture_logs() as events:
        await intake.ingest()
    assert [e["event"] for e in events].count("job queued") == 2
    (rejected,) = [e for e in events if e["event"] == "job file rejected"]
    assert rejected["file"] == f"{second}.toml" and "already exists" in rejected["reason"]
    assert await intake.spool.pending() == [] and list(intake.spool.active.iterdir()) == []
    for job_id in (first, second):
        job = await intake.svc.store.job(job_id)
        assert job is not None and job.name == "nightly"


async def test_entries_a_crash_left_claimed_are_queued_oldest_first(
    intake: Intake, config: Config
) -> None:
    """A batch claimed before a crash is taken again in the order the files came in
    (their times), not in the order of the job ids their names now start with."""
    ids = ["f" * 12, "a" * 12, "c" * 12]
    for i, job_id in enumerate(ids):
        path = intake.spool.active / f"{job_id}__j{i}.json"
        path.write_bytes(job_file(config, f"j{i}"))
        os.utime(path, ns=(i * 10**9, i * 10**9))
    await intake.ingest()
    jobs = [await intake.svc.store.job(job_id) for job_id in ids]
    created = [j.created_at for j in jobs if j is not None]
    assert len(created) == 3 and created == sorted(created), created
    assert list(intake.spool.active.iterdir()) == []


@pytest.mark.parametrize("failing", ["insert_job", "jobs_by_id"])
async def test_an_error_of_the_queue_keeps_the_job_files_for_the_next_poll(
    intake: Intake, config: Config, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """Whatever the queue answers (here: an error no class makes recoverable), for as
    many polls as it lasts (the second takes the first's claimed files as leftovers),
    the files wait in the spool, none goes to corrupt/, intake does not raise, and the
    poll after it queues them."""
    store = intake.svc.store
    ids = [intake.spool.submit(job_file(config, f"j{i}"), ".json") for i in range(3)]

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the connection went away")

    monkeypatch.setattr(store, failing, broken)
    for _ in range(2):
        with capture_logs() as events:
            await intake.ingest()
        assert "job file rejected" not in [e["event"] for e in events]
        assert list((config.daemon.spool_dir / "corrupt").iterdir()) == []
        assert len(list(intake.spool.active.iterdir())) == 3
    monkeypatch.undo()
    await intake.ingest()
    for job_id in ids:
        job = await store.job(job_id)
        assert job is not None and job.state == State.QUEUED
    assert list(intake.spool.active.iterdir()) == []


async def test_a_job_is_queued_on_the_config_it_was_checked_against(
    intake: Intake, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload while a batch is read and checked (in a thread: a source's mount may
    hang there) leaves its jobs on the config they were checked against, not the new
    one: the check and the snapshot go together."""
    import archived.intake

    before = Pinned.of(config)
    newer = config.model_copy(
        update={"limits": config.limits.model_copy(update={"hash_threads": 7})}
    )
    after = Pinned.of(newer)
    assert after.digest != before.digest
    in_force = [before]
    intake.pinned = lambda: in_force[-1]
    checked = archived.intake.parse_job

    def check_then_reload(*args: object) -> object:
        spec = checked(*args)  # type: ignore[arg-type]
        in_force.append(after)  # SIGHUP, meanwhile
        return spec

    monkeypatch.setattr(archived.intake, "parse_job", check_then_reload)
    job_id = intake.spool.submit(job_file(config), ".json")
    await intake.ingest()
    job = await intake.svc.store.job(job_id)
    assert job is not None and job.state == State.QUEUED
    assert (job.config, job.config_digest) == (before.snapshot, before.digest)
