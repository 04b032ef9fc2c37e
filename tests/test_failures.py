"""The state machine's error paths: failpoints, retries, cancel, timeouts (in process);
kill -9, SIGTERM, a busy database and a full file system (the daemon as a process, `slow`)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from conftest import Failpoints, Root, both_backends, remount, wait_until
from structlog.testing import capture_logs

from archived.failpoints import NAMES

FAIL_PATH = ["error", "failure", "error_handling", "cleanup", "failed"]


def states(job: dict) -> list[str]:
    return [h["state"] for h in job["history"]]


def assert_one_verified_copy_per_target(root: Root, job_id: str) -> None:
    job = root.show(job_id)
    assert job["state"] == "completed", job
    for name in root.targets:
        archives = root.archives(name)
        assert len(archives) == 1, (name, archives)
        result = root.cli("verify", "--key", str(root.public_key), str(archives[0]))
        assert result.returncode == 0, result.stdout + result.stderr
    assert_copies_in_place(root, job)


async def assert_one_verified_copy_per_target_in_process(root: Root, job_id: str) -> None:
    job = await root.details(job_id)
    assert job["state"] == "completed", job
    for name in root.targets:
        (archive,) = root.archives(name)
        assert await root.command("verify", "--key", str(root.public_key), str(archive)) == 0
    assert_copies_in_place(root, job)


def assert_copies_in_place(root: Root, job: dict) -> None:
    assert root.all_target_files() == sorted(p for n in root.targets for p in root.archives(n))
    assert root.staging_leftovers() == []
    assert sorted(c["target"] for c in job["copies"]) == sorted(root.targets)


@pytest.mark.slow
@pytest.mark.parametrize("point", sorted(NAMES))
def test_kill_at_every_failpoint_then_resume(root: Root, point: str) -> None:
    daemon = root.start(env={"ARCHIVED_FAILPOINTS": f"{point}=kill"})
    (job_id,) = root.submit(root.job_file("killed"))
    assert daemon.wait_exit(60) == -signal.SIGKILL
    before = root.show(job_id)
    assert before["state"] not in ("completed", "failed"), before
    root.start()
    root.wait_state(job_id, "completed", "failed")
    assert_one_verified_copy_per_target(root, job_id)
    job = root.show(job_id)
    # the crash cost an attempt, but nothing ran twice that had finished
    assert all(t["state"] == "completed" for t in job["tasks"])


@both_backends
async def test_transient_store_errors_are_retried_without_redoing_activities(
    root: Root, failpoints: Failpoints
) -> None:
    failpoints.set("store=transient:2")
    (job_id,) = root.drop(root.job_file("flaky"))
    await root.run_until_idle()
    job = await root.details(job_id)
    assert job["state"] == "completed", job
    assert states(job).count("recoverable_error") == 2
    assert states(job).count("activity_archiving") == 1
    assert states(job).count("store") == 3
    activity = next(t for t in job["tasks"] if t["kind"] == "activity")
    assert activity["attempts"] == 1
    assert job["error"] is None
    await assert_one_verified_copy_per_target_in_process(root, job_id)


async def test_a_fatal_error_fails_the_job_runs_the_hook_and_leaves_nothing(
    root: Root, failpoints: Failpoints
) -> None:
    hook_out = root.path / "hook.env"
    root.write_config(hooks={"on_failure": ["/bin/sh", "-c", f"env > {hook_out}"]})
    failpoints.set("sign=error")
    (job_id,) = root.drop(root.job_file("doomed"))
    await root.run_until_idle()
    job = await root.details(job_id)
    assert states(job)[-5:] == FAIL_PATH
    assert states(job).count("recoverable_error") == 0
    assert "post_processing" in job["error"] and "injected error" in job["error"]
    hook_env = dict(
        line.split("=", 1)
        for line in hook_out.read_text().splitlines()
        if line.startswith("ARCHIVED_")
    )
    assert hook_env["ARCHIVED_JOB_ID"] == job_id
    assert hook_env["ARCHIVED_JOB_NAME"] == "doomed"
    assert hook_env["ARCHIVED_FAILED_STATE"] == "post_processing"
    assert "injected error" in hook_env["ARCHIVED_REASON"]
    assert root.all_target_files() == []
    assert root.staging_leftovers() == []
    assert job["copies"] == []


async def test_a_failing_hook_is_logged_and_does_not_loop(
    root: Root, failpoints: Failpoints
) -> None:
    root.write_config(hooks={"on_failure": ["/bin/sh", "-c", "echo broken >&2; exit 3"]})
    failpoints.set("check_integrity=error")
    (job_id,) = root.drop(root.job_file("hookfail"))
    with capture_logs() as logs:
        await root.run_until_idle()
    job = await root.details(job_id)
    assert job["state"] == "failed"
    assert states(job).count("error_handling") == 1
    reason = next(h["reason"] for h in job["history"] if h["state"] == "cleanup")
    assert "exit 3" in reason and "broken" in reason
    assert any(e["event"] == "failure hook ran" and e["log_level"] == "error" for e in logs)


async def test_retries_are_bounded_by_max_attempts(root: Root, failpoints: Failpoints) -> None:
    root.write_config(retry={"max_attempts": 3, "backoff": "50ms", "backoff_max": "100ms"})
    failpoints.set("store=transient:100")
    (job_id,) = root.drop(root.job_file("hopeless"))
    await root.run_until_idle()
    job = await root.details(job_id)
    assert job["state"] == "failed"
    assert states(job).count("store") == 3
    assert states(job).count("recoverable_error") == 2
    assert "after 3 attempts" in job["error"]
    assert root.all_target_files() == []


@both_backends
async def test_a_missing_source_is_fatal_and_retry_runs_it_again(root: Root) -> None:
    (job_id,) = root.drop(
        root.job_file(
            "later",
            activities=[{"name": "x", "driver": "files", "path": str(root.sources / "not-yet")}],
        )
    )
    await root.run_until_idle()
    job = await root.details(job_id)
    assert job["state"] == "failed"
    assert "does not exist" in job["error"]
    assert states(job).count("recoverable_error") == 0
    (root.sources / "not-yet").mkdir()
    (root.sources / "not-yet" / "f.txt").write_text("now here\n")
    assert await root.command("retry", job_id) == 0
    await root.run_until_idle()
    job = await root.details(job_id)
    assert job["state"] == "completed", job
    assert states(job).count("queued") == 2
    await assert_one_verified_copy_per_target_in_process(root, job_id)
    assert await root.command("retry", job_id) == 1  # completed jobs are not retried


async def test_job_timeout_fails_the_job_and_cleans_up(root: Root, failpoints: Failpoints) -> None:
    root.write_config(daemon={"job_timeout": "1s"})
    failpoints.set("activity_archiving=delay:60")
    (job_id,) = root.drop(root.job_file("slow"))
    await root.run_until_idle()
    job = await root.details(job_id)
    assert job["state"] == "failed"
    assert job["error"].startswith("timeout")
    failure = next(h for h in job["history"] if h["state"] == "failure")
    assert failure["reason"] == "timeout"
    assert root.staging_leftovers() == []


async def canceled_in(root: Root, name: str, state: str) -> tuple[str, dict]:
    """A job dropped and run until idle, `archived cancel`ed once it is in `state`:
    its id and what became of it."""
    (job_id,) = root.drop(root.job_file(name))
    async with anyio.create_task_group() as tg:
        tg.start_soon(root.run_until_idle)
        await root.wait_for(job_id, state)
        assert await root.command("cancel", job_id) == 0
    return job_id, await root.details(job_id)


@both_backends
async def test_cancel_a_running_job(root: Root, failpoints: Failpoints) -> None:
    failpoints.set("activity_archiving=delay:60")
    job_id, job = await canceled_in(root, "stopme", "activity_archiving")
    assert job["state"] == "failed"
    failure = next(h for h in job["history"] if h["state"] == "failure")
    assert failure["reason"] == "canceled"
    assert "canceled" in job["error"]
    assert await root.command("cancel", job_id) == 1  # already final


@both_backends
async def test_cancel_a_queued_job(root: Root) -> None:
    (job_id,) = root.drop(root.job_file("notyet", not_before="2999-01-01T00:00:00Z"))
    await root.run_until_idle()  # queued, not due: nothing to do
    assert (await root.details(job_id))["state"] == "queued"
    assert await root.command("cancel", job_id) == 0
    await root.run_until_idle()
    job = await root.details(job_id)
    assert states(job) == [
        "uninitialized",
        "queued",
        "failure",
        "error_handling",
        "cleanup",
        "failed",
    ]
    assert job["history"][2]["reason"] == "canceled"


@both_backends
async def test_cancel_a_job_waiting_to_retry_cleans_up_at_once(
    root: Root, failpoints: Failpoints
) -> None:
    """Its wait for the next attempt is over with the cancel: cleanup does not wait
    for it (nor count its attempt twice)."""
    root.write_config(retry={"backoff": "1h", "backoff_max": "1h"})
    failpoints.set("activity_archiving=transient:1")
    _, job = await canceled_in(root, "waiting", "recoverable_error")
    assert states(job)[-5:] == [
        "recoverable_error",
        "failure",
        "error_handling",
        "cleanup",
        "failed",
    ]


@pytest.mark.slow
def test_sigterm_during_a_long_step_exits_and_resumes_without_spending_an_attempt(
    root: Root,
) -> None:
    root.write_config(daemon={"shutdown_grace": "1s"})
    daemon = root.start(env={"ARCHIVED_FAILPOINTS": "activity_archiving=delay:60"})
    (job_id,) = root.submit(root.job_file("interrupted"))
    root.wait_state(job_id, "activity_archiving")
    wait_until(lambda: root.show(job_id)["attempts"] == 1, 10, "attempt counted")
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM, timeout=20) == 0
    assert time.monotonic() - started < 1 + 5
    job = root.show(job_id)
    assert job["state"] == "activity_archiving"
    assert job["attempts"] == 0
    root.start()
    assert root.wait_state(job_id, "completed")["state"] == "completed"
    assert_one_verified_copy_per_target(root, job_id)


@pytest.fixture
def small_target(root: Root, small_fs: Callable[..., Path]) -> Path:
    """A 64 KiB tmpfs as a third target: a full file system that the test can grow."""
    return small_fs(root.path / "small")


@pytest.mark.slow
def test_a_full_target_is_recoverable_and_other_jobs_go_on(root: Root, small_target: Path) -> None:
    root.targets["small"] = small_target
    root.write_config(retry={"max_attempts": 100, "backoff": "100ms", "backoff_max": "200ms"})
    root.start()
    (full_id,) = root.submit(root.job_file("big", storage=["small"]))
    wait_until(lambda: "recoverable_error" in states(root.show(full_id)), 30, "no space: retry")
    # told before writing, not by ENOSPC halfway through
    size = root.show(full_id)["archive"]["size"]
    assert f"storage.small: needs {size} bytes, has " in json.dumps(root.show(full_id)["history"])
    (other_id,) = root.submit(root.job_file("other", storage=["primary"]))
    assert root.wait_state(other_id, "completed")["state"] == "completed"
    assert root.show(full_id)["state"] != "failed"
    assert not [p for p in small_target.rglob("*") if p.is_file()]  # no partial file left
    remount(small_target, "16m")
    job = root.wait_state(full_id, "completed", "failed")
    assert job["state"] == "completed"
    assert len(list(small_target.rglob("*.tar"))) == 1


@pytest.mark.slow
def test_a_damaged_copy_in_place_is_replaced_and_stale_staging_removed(root: Root) -> None:
    stale = root.state_dir / "staging" / "0123456789ab"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("left by a crash\n")
    daemon = root.start(env={"ARCHIVED_FAILPOINTS": "store.after_rename=kill"})
    (job_id,) = root.submit(root.job_file("damaged"))
    assert daemon.wait_exit(60) == -signal.SIGKILL
    placed = [p for t in root.targets for p in root.archives(t)]
    # the first copy renamed into place, then the kill (the other may have made it too)
    assert len(placed) in (1, 2)
    placed[0].chmod(0o644)
    placed[0].write_bytes(b"garbage")
    root.start()
    root.wait_state(job_id, "completed", "failed")
    assert_one_verified_copy_per_target(root, job_id)
    assert not stale.exists()


@pytest.mark.slow
def test_a_busy_database_does_not_crash_the_daemon(root: Root) -> None:
    import sqlite3

    daemon = root.start()
    db = sqlite3.connect(root.state_dir / "archived.db", isolation_level=None)
    db.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        (job_id,) = root.submit(root.job_file("patient"))
        time.sleep(1.5)  # hold the write lock a while: this is the condition under test
        assert daemon.proc is not None and daemon.proc.poll() is None
    finally:
        db.execute("COMMIT")
        db.close()
    assert root.wait_state(job_id, "completed")["state"] == "completed"


@pytest.mark.parametrize("tamper", ["extra", "appended", "truncated", "records"])
async def test_staged_artifacts_that_differ_from_their_records_fail_the_job(
    root: Root, tamper: str, failpoints: Failpoints
) -> None:
    (job_id,) = root.drop(root.job_file("tampered"))
    staging = root.state_dir / "staging" / job_id
    fragment = staging / "a.part.tar"

    def damage() -> None:
        if tamper == "extra":
            (staging / "planted.tar").write_bytes(fragment.read_bytes())
        elif tamper == "appended":
            with open(fragment, "ab") as f:
                f.write(bytes(512))
        elif tamper == "truncated":
            with open(fragment, "r+b") as f:
                f.truncate(10)
        else:
            records = staging / "a.records"
            records.write_text(records.read_text().splitlines(keepends=True)[0])

    failpoints.at("check_integrity", damage)
    await root.run_until_idle()
    job = await root.details(job_id)
    assert job["state"] == "failed"
    expected = {
        "extra": "staging holds planted.tar, which no activity wrote",
        "appended": "bytes staged",
        "truncated": "tar fragment has 10 bytes staged",
        "records": "activity a: 1 files",
    }[tamper]
    assert expected in job["error"]
    assert [h["state"] for h in job["history"]].count("recoverable_error") == 0
    assert root.all_target_files() == []


def _flip_a_byte_of(fragment: Path, member_suffix: str) -> None:
    """Damage a member's data in place, keeping every size: what a hole left by a crash
    of the machine (not of the daemon) looks like to a size check."""
    import tarfile

    with tarfile.open(fragment) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(member_suffix))
    with open(fragment, "r+b") as f:
        f.seek(member.offset_data + 1000)
        byte = f.read(1)
        f.seek(member.offset_data + 1000)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.slow
@pytest.mark.parametrize("damaged", [False, True], ids=["intact", "damaged"])
@pytest.mark.parametrize("point", ["check_integrity", "store"])
def test_staging_from_before_the_machine_restarted_is_read_again(
    root: Root, point: str, damaged: bool
) -> None:
    daemon = root.start(env={"ARCHIVED_FAILPOINTS": f"{point}=kill"})
    (job_id,) = root.submit(root.job_file("rebooted"))
    assert daemon.wait_exit(60) == -signal.SIGKILL
    fragment = root.state_dir / "staging" / job_id / "a.part.tar"
    if damaged:
        _flip_a_byte_of(fragment, "/data/a/sub/data.bin")
    restarted = root.start(env={"ARCHIVED_BOOT_ID": "a later start of the machine"})
    job = root.wait_state(job_id, "completed", "failed")
    assert "re-reading" in restarted.log_text()
    if damaged:
        assert job["state"] == "failed"
        assert "data/a/sub/data.bin: staged data does not match" in job["error"]
        assert f"archived retry {job_id}" in job["error"]
        assert root.all_target_files() == []
        return
    assert_one_verified_copy_per_target(root, job_id)
    if point == "check_integrity":
        (check,) = [e for e in job["events"] if e["kind"] == "check_integrity"]
        assert check["detail"]["reread_after_restart"] == ["a"]


@pytest.mark.slow
def test_post_processing_is_one_commit_and_starts_over_after_a_kill_in_it(root: Root) -> None:
    """Post-processing's steps are committed with the transition out of it: a daemon
    killed at `sign` left nothing of the phase in the queue, and the restarted one (on
    a later start of the machine) does it all again, from re-reading the fragments on,
    and logs each step's events once."""
    daemon = root.start(env={"ARCHIVED_FAILPOINTS": "sign=kill"})
    (job_id,) = root.submit(root.job_file("rebooted"))
    assert daemon.wait_exit(60) == -signal.SIGKILL
    killed = root.show(job_id)
    assert killed["state"] == "post_processing", killed
    assert "payload_oxum" not in json.dumps(killed), killed
    assert [e["kind"] for e in killed["events"]] == []
    # a small job's payload manifest was made in memory: nothing of it was staged
    assert not (root.state_dir / "staging" / job_id / "manifest-sha256.txt").exists()
    root.start(env={"ARCHIVED_BOOT_ID": "a later start of the machine"})
    job = root.wait_state(job_id, "completed", "failed")
    assert_one_verified_copy_per_target(root, job_id)
    checks = [e["detail"] for e in job["events"] if e["kind"] == "check_integrity"]
    assert len(checks) == 1 and checks[0]["reread_after_restart"] == ["a"], checks
    assert [e["kind"] for e in job["events"]].count("calculate_checksums") == 1


@pytest.mark.slow
def test_end_of_the_archive_is_written_again_after_the_machine_restarted(root: Root) -> None:
    """`END` (one file for every job's archive) found damaged after a restart of the
    machine is written again before the copies are made."""
    daemon = root.start(env={"ARCHIVED_FAILPOINTS": "store=kill"})
    (job_id,) = root.submit(root.job_file("rebooted"))
    assert daemon.wait_exit(60) == -signal.SIGKILL
    assert not (root.state_dir / "staging" / job_id / "end.tar").exists()
    end = root.state_dir / "staging" / "end.tar"
    end.write_bytes(b"\xff" * len(end.read_bytes()))  # the size kept, the bytes not
    root.start(env={"ARCHIVED_BOOT_ID": "a later start of the machine"})
    root.wait_state(job_id, "completed", "failed")
    assert_one_verified_copy_per_target(root, job_id)


def _as_an_earlier_version_staged_it(staging: Path) -> None:
    """The layout before one folder a job: parts/, records/ and bag/ (tag files)."""
    (staging / "parts").mkdir()
    (staging / "records").mkdir()
    (staging / "bag").mkdir()
    (staging / "a.part.tar").rename(staging / "parts" / "a.tar")
    (staging / "a.records").rename(staging / "records" / "a.records")
    manifest = staging / "manifest-sha256.txt"
    if manifest.exists():
        manifest.rename(staging / "bag" / "manifest-sha256.txt")
    (staging / "bag" / "bagit.txt").write_text("BagIt-Version: 1.0\n")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["check_integrity", "sign", "store"])
def test_a_job_in_flight_across_the_upgrade_of_the_staging_layout_completes(
    root: Root, point: str
) -> None:
    daemon = root.start(env={"ARCHIVED_FAILPOINTS": f"{point}=kill"})
    (job_id,) = root.submit(root.job_file("upgraded"))
    assert daemon.wait_exit(60) == -signal.SIGKILL
    staging = root.state_dir / "staging" / job_id
    _as_an_earlier_version_staged_it(staging)
    root.start()
    root.wait_state(job_id, "completed", "failed")
    assert_one_verified_copy_per_target(root, job_id)


@pytest.mark.slow
def test_a_staged_archive_that_changed_size_after_sign_fails_the_job(root: Root) -> None:
    daemon = root.start(env={"ARCHIVED_FAILPOINTS": "store=kill"})
    (job_id,) = root.submit(root.job_file("grown"))
    assert daemon.wait_exit(60) == -signal.SIGKILL
    with open(root.state_dir / "staging" / job_id / "head.tar", "ab") as head:
        head.write(bytes(512))  # same machine start: no re-reading, only the size tells
    root.start()
    job = root.wait_state(job_id, "failed", "completed")
    assert job["state"] == "failed"
    assert "the staged archive has" in job["error"] and "when it was sealed" in job["error"]
    assert states(job).count("recoverable_error") == 0
    assert root.all_target_files() == []


@pytest.mark.slow
def test_a_staged_archive_part_gone_before_store_fails_each_storage_task(root: Root) -> None:
    daemon = root.start(env={"ARCHIVED_FAILPOINTS": "store=kill"})
    (job_id,) = root.submit(root.job_file("vanished"))
    assert daemon.wait_exit(60) == -signal.SIGKILL
    (root.state_dir / "staging" / job_id / "a.part.tar").unlink()
    root.start()
    job = root.wait_state(job_id, "failed", "completed")
    assert job["state"] == "failed"
    assert "a.part.tar" in job["error"]
    storage = [t for t in job["tasks"] if t["kind"] == "storage"]
    assert {t["state"] for t in storage} == {"failed"}
    assert all("a.part.tar" in t["error"] for t in storage)
    assert root.all_target_files() == []


@pytest.mark.slow
def test_the_shared_end_removed_before_store_is_made_again(root: Root) -> None:
    """An operator who clears staging of `end.tar` while a job waits to store (here:
    the daemon killed meanwhile) loses no job: the end is made again before the copies."""
    daemon = root.start(env={"ARCHIVED_FAILPOINTS": "store=kill"})
    (job_id,) = root.submit(root.job_file("cleared"))
    assert daemon.wait_exit(60) == -signal.SIGKILL
    (root.state_dir / "staging" / "end.tar").unlink()
    root.start()
    root.wait_state(job_id, "completed", "failed")
    assert_one_verified_copy_per_target(root, job_id)
