"""The in-process layer itself: the daemon works its queue until idle in the test's
event loop, its log is events, and a plugin activity driver is found by name."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import anyio
import bagit
import pytest
from conftest import Failpoints, Root, spawns_archived, tar_members
from structlog.testing import capture_logs


async def test_a_job_is_archived_to_every_target_in_process(root: Root) -> None:
    (job_id,) = root.drop(root.job_file("hello"))
    with capture_logs() as logs:
        await root.run_until_idle()
    job = await root.details(job_id)
    assert job["state"] == "completed", job["error"]
    assert sorted(c["target"] for c in job["copies"]) == ["offsite", "primary"]
    (archive,) = root.archives("primary")
    assert any(m.endswith("/data/a/hello.txt") for m in tar_members(archive))
    events = [e["event"] for e in logs]
    assert {"job queued", "ready", "stopped"} <= set(events)
    assert [e["on"] for e in logs if e["event"] == "transition"][-1] == "cleaned"
    assert root.staging_leftovers() == []


async def test_the_fake_driver_is_found_through_its_entry_point(
    root: Root, fake_activity: type
) -> None:
    job = root.job_file(
        "fake", activities=[{"name": "f", "driver": "fake", "files": {"x.txt": "x"}}]
    )
    (job_id,) = root.drop(job)
    await root.run_until_idle()
    assert (await root.details(job_id))["state"] == "completed"
    assert fake_activity.runs == {"f": 1}
    (archive,) = root.archives("primary")
    assert any(m.endswith("/data/f/x.txt") for m in tar_members(archive))


async def test_idle_with_nothing_to_do_returns_at_once(root: Root) -> None:
    with capture_logs() as logs:
        daemon = await root.run_until_idle(timeout=10)
    assert not len(daemon.jobs)
    assert [e["event"] for e in logs][-1] == "stopped"


def test_a_fast_test_that_spawns_archived_fails_at_once() -> None:
    """The guard that keeps the layers apart: only tests marked slow start archived."""
    for argv in (
        [sys.executable, "-m", "archived", "--help"],
        [sys.executable, "-m", "archived.cli"],
        ["/usr/local/bin/archived", "run"],
        "archived show x",
    ):
        with pytest.raises(pytest.fail.Exception, match="not marked slow"):
            subprocess.run(argv, capture_output=True, timeout=10)
    assert not spawns_archived(["minisign", "-G"])
    assert subprocess.run([sys.executable, "-c", "pass"], timeout=30).returncode == 0


@pytest.mark.parametrize(
    "queued_for", [["primary", "gone"], ["primary"], ["offsite", "primary"]], ids=str
)
async def test_a_job_stores_to_the_targets_of_the_config_it_starts_on(
    root: Root, queued_for: list[str]
) -> None:
    """Accepted when the targets were others (a reload since): its storage tasks follow
    the config it runs on, a target gone is dropped and a new one added."""
    from jobrows import queued

    from archived.store_open import open_store

    store = await open_store(root.load_config())
    assert store is not None
    await queued(store, root.load_config(), "0123456789ab", tuple(queued_for))
    await store.close()
    await root.run_until_idle()
    job = await root.details("0123456789ab")
    assert job["state"] == "completed", job["error"]
    assert sorted(t["name"] for t in job["tasks"] if t["kind"] == "storage") == [
        "offsite",
        "primary",
    ]
    assert sorted(c["target"] for c in job["copies"]) == ["offsite", "primary"]


async def test_a_task_is_shown_started_once_it_has_run_a_second(
    root: Root, failpoints: Failpoints
) -> None:
    """A task done within a second (here: the copies) has no commit of its start, and
    is counted once when it finishes; one that runs longer (the activity, delayed) is
    `executing` meanwhile, counted once too."""
    failpoints.set("activity_task=delay:3")
    (job_id,) = root.drop(root.job_file("slow"))
    seen: list[dict[str, Any]] = []

    async def watch() -> None:
        while True:
            try:
                job = await root.details(job_id)
            except AssertionError:  # not taken in yet
                job = {"tasks": []}
            tasks = {t["name"]: t for t in job["tasks"]}
            if tasks.get("a", {}).get("state") == "executing":
                seen.append(tasks["a"])
                return
            await anyio.sleep(0.05)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await root.run_until_idle()
    assert seen and seen[0]["attempts"] == 1, seen
    job = await root.details(job_id)
    assert job["state"] == "completed", job["error"]
    counted = sorted((t["name"], t["state"], t["attempts"]) for t in job["tasks"])
    assert counted == [
        ("a", "completed", 1),
        ("offsite", "completed", 1),
        ("primary", "completed", 1),
    ]


@pytest.mark.parametrize("staged", [False, True], ids=["in-memory", "staged"])
async def test_the_payload_manifest_made_in_memory_or_staged_makes_one_bag(
    root: Root,
    monkeypatch: pytest.MonkeyPatch,
    failpoints: Failpoints,
    tmp_path: Path,
    staged: bool,
) -> None:
    """A small job's payload manifest is made in memory, a large one's streamed to
    staging: either way the archive holds the same valid bag."""
    from archived import postprocess

    if staged:
        monkeypatch.setattr(postprocess, "MANIFEST_IN_MEMORY", -1)
    (job_id,) = root.drop(root.job_file("manifest"))
    found = []
    manifest = root.state_dir / "staging" / job_id / "manifest-sha256.txt"
    failpoints.at("store", lambda: found.append(manifest.exists()))
    await root.run_until_idle()
    assert found == [staged]
    job = await root.details(job_id)
    assert job["state"] == "completed", job["error"]
    (archive,) = root.archives("primary")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "extract", filter="data")
    (bag_dir,) = (tmp_path / "extract").iterdir()
    bagit.Bag(str(bag_dir)).validate()
    lines = (bag_dir / "manifest-sha256.txt").read_text().splitlines()
    assert sorted(line.split("  ", 1)[1] for line in lines) == sorted(
        str(p.relative_to(bag_dir)) for p in (bag_dir / "data").rglob("*") if p.is_file()
    )
    (oxum,) = [
        e["detail"]["payload_oxum"] for e in job["events"] if e["kind"] == "calculate_checksums"
    ]
    assert len(lines) == int(oxum.split(".")[1]) > 0


async def test_every_archive_ends_with_the_one_shared_end(root: Root) -> None:
    """The two zero blocks that end an archive are one file beside the jobs' staging,
    made by the first job sealed, written again by the next one when found damaged,
    and left alone by the sweep of stale staging (which removes a write of it cut
    short)."""
    end = root.state_dir / "staging" / "end.tar"
    (first,) = root.drop(root.job_file("first"))
    await root.run_until_idle()
    assert end.read_bytes() == bytes(1024)
    end.write_bytes(b"\xff" * 1024)  # as a lost write might leave it
    (end.parent / ".end.tar.0123456789ab.tmp").write_bytes(b"")  # a write cut short
    (second,) = root.drop(root.job_file("second"))
    with capture_logs() as logs:
        await root.run_until_idle()
    assert "removing stale staging" not in [e["event"] for e in logs]
    assert end.read_bytes() == bytes(1024)
    assert list((root.state_dir / "staging").iterdir()) == [end]
    for job_id in (first, second):
        assert (await root.details(job_id))["state"] == "completed"
    for archive in root.archives("primary"):
        assert archive.read_bytes().endswith(bytes(1024))
        assert any(m.endswith("/bagit.txt") for m in tar_members(archive))


async def _cancel_when(root: Root, job_id: str, ready: Any) -> None:
    """`archived cancel` of the job once `ready(job)` holds for its details."""
    from archived.store_open import open_store

    while True:
        try:
            job = await root.details(job_id)
        except AssertionError:  # not taken in yet
            job = {"state": "uninitialized", "tasks": []}
        if ready(job):
            break
        await anyio.sleep(0.02)
    store = await open_store(root.load_config(), create=False)
    assert store is not None
    await store.request_cancel(job_id)
    await store.close()


def _tasks(job: dict[str, Any]) -> dict[str, tuple[str, str | None, int]]:
    return {t["name"]: (t["state"], t["error"], t["attempts"]) for t in job["tasks"]}


async def test_a_task_canceled_before_its_start_was_recorded_is_failed_and_counted(
    root: Root, failpoints: Failpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task cut short (here by `archived cancel`) before its start was committed is
    recorded as one that ran: failed, `cut short`, one attempt."""
    from archived import phase

    monkeypatch.setattr(phase, "START_AFTER", 600.0)  # its start is never committed
    failpoints.set("activity_task=delay:30")
    (job_id,) = root.drop(root.job_file("canceled"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(_cancel_when, root, job_id, lambda job: job["state"] == "activity_archiving")
        await root.run_until_idle()
    job = await root.details(job_id)
    assert job["state"] == "failed" and "canceled" in job["error"], job["error"]
    (task,) = [t for t in job["tasks"] if t["name"] == "a"]
    assert (task["state"], task["error"], task["attempts"]) == ("failed", "cut short", 1)


async def test_a_task_whose_start_cannot_be_recorded_runs_on_and_is_counted_at_its_end(
    root: Root, failpoints: Failpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue refusing the record of a task's start (a second in) stops no task: the
    job completes, and each task's end counts its attempt."""
    from archived import phase
    from archived.store_steps import StepOps

    async def refused(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the queue refused it")

    monkeypatch.setattr(phase, "START_AFTER", 0.05)
    monkeypatch.setattr(StepOps, "start_task", refused)
    failpoints.set("activity_task=delay:1")
    (job_id,) = root.drop(root.job_file("unrecorded"))
    with capture_logs() as logs:
        await root.run_until_idle()
    job = await root.details(job_id)
    assert job["state"] == "completed", job["error"]
    assert {t["attempts"] for t in job["tasks"]} == {1}
    assert "cannot record that a task started" in [e["event"] for e in logs]


async def test_what_post_processing_logged_is_recorded_when_it_fails_too(
    root: Root, failpoints: Failpoints
) -> None:
    """Post-processing's events go with the transition that ends it, whichever: a
    `sign` that fails once leaves its attempt's check on record, and the retry's."""
    root.write_config(retry={"backoff": "100ms", "backoff_max": "200ms"})
    failpoints.set("sign=transient:1")
    (job_id,) = root.drop(root.job_file("twice"))
    await root.run_until_idle()
    job = await root.details(job_id)
    assert job["state"] == "completed", job["error"]
    kinds = [e["kind"] for e in job["events"]]
    assert kinds.count("check_integrity") == 2, kinds
    assert kinds.count("calculate_checksums") == 2, kinds


async def test_a_task_done_while_its_sibling_runs_on_is_recorded_within_a_second(
    root: Root, fake_activity: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of a task whose start was not committed waits for its siblings, but
    not past FINISH_AFTER: here `a` is recorded done while `h` still runs."""
    from archived import phase

    monkeypatch.setattr(phase, "START_AFTER", 600.0)  # no start is committed
    monkeypatch.setattr(phase, "FINISH_AFTER", 0.1)
    hang = {"name": "h", "driver": "fake", "fail": "hang"}
    files = {"name": "a", "driver": "files", "path": str(root.sources / "a")}
    (job_id,) = root.drop(root.job_file("siblings", activities=[files, hang]))
    seen: list[dict[str, Any]] = []

    def a_recorded(job: dict[str, Any]) -> bool:
        if _tasks(job).get("a", ("",))[0] == "completed":
            seen.append(_tasks(job))
            return True
        return False

    async with anyio.create_task_group() as tg:
        tg.start_soon(_cancel_when, root, job_id, a_recorded)
        await root.run_until_idle()
    assert seen[0]["a"] == ("completed", None, 1), seen
    assert seen[0]["h"][0] == "created", seen  # still running: its start not committed
    job = await root.details(job_id)
    assert job["state"] == "failed" and "canceled" in job["error"], job["error"]
    assert _tasks(job)["h"] == ("failed", "cut short", 1)


async def test_a_task_that_ended_before_a_cancel_is_recorded_with_it(
    root: Root, fake_activity: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task's end kept for its siblings' commit is recorded when the phase is cut
    short: `a` done, `h` cut short, each counted once."""
    from archived import phase

    monkeypatch.setattr(phase, "START_AFTER", 600.0)
    monkeypatch.setattr(phase, "FINISH_AFTER", 600.0)  # kept until the phase ends
    hang = {"name": "h", "driver": "fake", "fail": "hang"}
    files = {"name": "a", "driver": "files", "path": str(root.sources / "a")}
    (job_id,) = root.drop(root.job_file("siblings", activities=[files, hang]))
    with capture_logs() as logs:

        def a_done(job: dict[str, Any]) -> bool:
            assert _tasks(job).get("a", ("",))[0] != "completed", "recorded before the end"
            return any(e["event"] == "activity task completed" for e in logs)

        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_when, root, job_id, a_done)
            await root.run_until_idle()
    job = await root.details(job_id)
    assert job["state"] == "failed" and "canceled" in job["error"], job["error"]
    assert _tasks(job) == {
        "a": ("completed", None, 1),
        "h": ("failed", "cut short", 1),
        "offsite": ("created", None, 0),
        "primary": ("created", None, 0),
    }


async def test_the_tasks_of_a_job_run_through_are_read_once(
    root: Root, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the activity phase, post-processing and the copies take the activities'
    results from the runner (they went with the transition), and the store phase the
    storage tasks left to run: no read of the tasks but the activity phase's."""
    from archived.store_reads import JobReads

    kinds: list[str | None] = []
    read = JobReads.tasks

    async def tasks(self: JobReads, job_id: str, kind: str | None = None) -> Any:
        kinds.append(kind)
        return await read(self, job_id, kind)

    monkeypatch.setattr(JobReads, "tasks", tasks)
    (job_id,) = root.drop(root.job_file("one"))
    await root.run_until_idle()
    assert (await root.details(job_id))["state"] == "completed"
    assert kinds == [None, None], kinds  # the activity phase's, then `show`'s


async def test_a_task_whose_result_is_not_json_fails_and_the_job_with_it(
    root: Root, fake_activity: type
) -> None:
    """What a task reports is kept in the queue as JSON: a plugin's result that is not
    fails its task (and the job, through the error path), not the commit after it."""
    odd = {"name": "f", "driver": "fake", "unjson": True}
    (job_id,) = root.drop(root.job_file("odd", activities=[odd]))
    await root.run_until_idle()
    job = await root.details(job_id)
    assert job["state"] == "failed", job
    (task,) = [t for t in job["tasks"] if t["name"] == "f"]
    assert task["state"] == "failed" and "JSON serializable" in task["error"], task


@pytest.mark.parametrize("driver", ["files", "sqlite"])
async def test_no_look_at_a_source_is_made_from_the_event_loop(
    root: Root, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    """A source on a mount that does not answer (its NFS server gone) blocks whoever looks
    at it, in the kernel, as long as it does not answer. Never the event loop: it would
    stop the whole daemon (no lease renewed, no cancel heard, the watchdog starved, every
    other job waiting), not the one job. Where a job's paths really lie is looked up at
    intake, at its start and by its driver: each time in a worker thread."""
    source = str(root.sources / "a")
    activity = {"name": "a", "driver": "files", "path": source}
    if driver == "sqlite":
        source = str(root.sources / "db.sqlite")
        with contextlib.closing(sqlite3.connect(source)) as db, db:
            db.execute("CREATE TABLE t (x)")
        activity = {"name": "db", "driver": "sqlite", "path": source}
    roots = str(root.sources)  # the allowed root too: checked at start and at reload
    loop = threading.get_ident()
    looked: list[tuple[str, bool]] = []

    def watched(real: Any) -> Any:
        def look(path: Any, *args: Any, **kw: Any) -> Any:
            if isinstance(path, str | os.PathLike) and os.fspath(path).startswith(roots):
                looked.append((real.__name__, threading.get_ident() == loop))
            return real(path, *args, **kw)

        return look

    for name in ("realpath", "exists", "isdir", "isfile"):
        monkeypatch.setattr(os.path, name, watched(getattr(os.path, name)))
    for name in ("stat", "lstat", "scandir", "listdir", "open"):
        monkeypatch.setattr(os, name, watched(getattr(os, name)))
    (job_id,) = root.drop(root.job_file("looked", activities=[activity]))
    await root.run_until_idle()
    assert (await root.details(job_id))["state"] == "completed"
    assert {name for name, _ in looked} >= {"realpath"}
    assert [name for name, on_loop in looked if on_loop] == [], looked
