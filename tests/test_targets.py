"""Storage targets that go away and come back, through the real daemon.

An unmounted disk is played by renaming the target directory away (ENOENT on the target
root, for real); an empty mount point by an empty directory where a marker is required.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Root, remount, wait_until

FAST_RETRY = {"max_attempts": 3, "backoff": "50ms", "backoff_max": "100ms"}


def states(job: dict[str, Any]) -> list[str]:
    return [h["state"] for h in job["history"]]


def unplug(root: Root, target: str) -> Path:
    """The target directory, renamed away: what an unmounted disk looks like."""
    away = root.path / f"{target}-unmounted"
    root.targets[target].rename(away)
    return away


def plug_in(root: Root, target: str, away: Path) -> None:
    away.rename(root.targets[target])


def verified(root: Root, archive: Path) -> bool:
    result = root.cli("verify", "--key", str(root.public_key), str(archive))
    return result.returncode == 0


@pytest.mark.slow
def test_a_vanished_target_makes_jobs_wait_and_the_daemon_start(root: Root) -> None:
    away = unplug(root, "offsite")
    check = root.cli("check-config")
    assert check.returncode == 0 and "storage.offsite" in check.stderr, check.stderr
    root.write_config(retry={"max_attempts": 100, "backoff": "100ms", "backoff_max": "300ms"})
    daemon = root.start()  # the offsite disk is not plugged in at boot: start anyway
    assert any(e.get("event") == "storage target unavailable" for e in daemon.events())
    (job_id,) = root.submit(root.job_file("patient"))
    wait_until(lambda: states(root.show(job_id)).count("recoverable_error") >= 2, 30, "retries")
    job = root.show(job_id)
    assert job["state"] != "failed"
    assert "storage.offsite" in json.dumps(job["history"]) and "not mounted?" in json.dumps(
        job["history"]
    )
    (primary,) = root.archives("primary")  # stored once, not again on every retry
    first = primary.stat()
    assert not root.targets["offsite"].exists()  # nothing made in its place
    plug_in(root, "offsite", away)
    job = root.wait_state(job_id, "completed", "failed")
    assert job["state"] == "completed", job
    (offsite,) = root.archives("offsite")
    assert offsite.read_bytes() == primary.read_bytes()
    assert (primary.stat().st_ino, primary.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert sorted(c["target"] for c in job["copies"]) == ["offsite", "primary"]


@pytest.mark.slow
def test_a_job_failing_on_an_unreachable_target_keeps_its_verified_copy(root: Root) -> None:
    root.write_config(retry=FAST_RETRY)
    root.start()
    away = unplug(root, "offsite")
    (job_id,) = root.submit(root.job_file("kept"))
    job = root.wait_state(job_id, "failed", "completed", timeout=30)
    assert job["state"] == "failed"
    assert "storage.offsite" in job["error"] and "after 3 attempts" in job["error"]
    # the healthy copy is not thrown away because the other target was unreachable
    (primary,) = root.archives("primary")
    assert verified(root, primary)
    assert [c["target"] for c in job["copies"]] == ["primary"]
    assert "kept" in job["history"][-1]["reason"]
    assert root.staging_leftovers() == []

    plug_in(root, "offsite", away)
    before = primary.stat()
    result = root.cli("retry", job_id)
    assert result.returncode == 0, result.stderr
    assert "kept" in result.stdout
    job = root.wait_state(job_id, "completed", "failed")
    assert job["state"] == "completed", job
    (offsite,) = root.archives("offsite")
    assert offsite.read_bytes() == primary.read_bytes()  # the same archive, not a new one
    assert (primary.stat().st_ino, primary.stat().st_mtime_ns) == (
        before.st_ino,
        before.st_mtime_ns,
    )
    activity = next(t for t in job["tasks"] if t["kind"] == "activity")
    assert activity["attempts"] == 1  # the sources were not archived again
    assert states(job).count("activity_archiving") == 2
    assert sorted(c["target"] for c in job["copies"]) == ["offsite", "primary"]
    assert job["archive"]["sha256"] == job["copies"][0]["sha256"] == job["copies"][1]["sha256"]
    assert root.staging_leftovers() == []


@pytest.mark.slow
def test_a_canceled_job_removes_its_copies(root: Root) -> None:
    """The operator's cancel is the one way a verified copy of a failed job goes."""
    root.write_config(retry={"max_attempts": 100, "backoff": "100ms", "backoff_max": "300ms"})
    root.start()
    away = unplug(root, "offsite")
    (job_id,) = root.submit(root.job_file("unwanted"))
    wait_until(lambda: root.archives("primary"), 30, "the primary copy")
    wait_until(lambda: "recoverable_error" in states(root.show(job_id)), 30, "a retry")
    assert root.cli("cancel", job_id).returncode == 0
    wait_until(lambda: "failure" in states(root.show(job_id)), 30, "canceled")
    plug_in(root, "offsite", away)  # (before the cancel took, a store might have succeeded)
    job = root.wait_state(job_id, "failed", "completed")
    assert job["state"] == "failed"
    assert root.all_target_files() == []
    assert job["copies"] == []


@pytest.mark.slow
def test_cleanup_never_gets_stuck_on_a_missing_target(root: Root) -> None:
    """A failed job's cleanup cannot remove what is on an unmounted disk: it retries, then
    records the leftover as an orphan, and the job reaches `failed`; the daemon removes
    the orphan once the disk is back."""
    root.write_config(retry=FAST_RETRY, retention={"check_interval": "100ms"})
    root.start(env={"ARCHIVED_FAILPOINTS": "store=error"})
    away = unplug(root, "offsite")
    (job_id,) = root.submit(root.job_file("stuck"))
    job = root.wait_state(job_id, "failed", "completed", timeout=30)
    assert job["state"] == "failed"
    assert states(job)[-4:] == ["cleanup", "cleanup", "cleanup", "failed"]  # two retries
    (orphan,) = job["orphans"]
    assert orphan["target"] == "offsite" and orphan["removed_at"] is None
    assert "not mounted?" in orphan["reason"]
    assert orphan["key"] == f"stuck/{job['archive']['name']}"
    assert root.staging_leftovers() == []
    assert "orphans" in root.cli("show", job_id).stdout

    # what a write cut short by a crash left on the disk while it was away
    leftover = away / "stuck" / f".archived-tmp-0123456789ab-{job['archive']['name']}"
    leftover.parent.mkdir()
    leftover.write_bytes(b"partial")
    plug_in(root, "offsite", away)
    wait_until(lambda: root.show(job_id)["orphans"][0]["removed_at"], 30, "orphan removed")
    assert not (root.targets["offsite"] / "stuck" / leftover.name).exists()
    job = root.show(job_id)
    assert job["state"] == "failed"
    assert any(e["kind"] == "orphan_removed" for e in job["events"])


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["transient:2", "error"])
def test_errors_in_cleanup_never_fail_a_stored_job(root: Root, fault: str) -> None:
    root.write_config(retry=FAST_RETRY)
    root.start(env={"ARCHIVED_FAILPOINTS": f"cleanup={fault}"})
    (job_id,) = root.submit(root.job_file("tidy"))
    job = root.wait_state(job_id, "completed", "failed", timeout=30)
    assert job["state"] == "completed", job
    assert job["error"] is None
    assert sorted(c["target"] for c in job["copies"]) == ["offsite", "primary"]
    assert all(verified(root, a) for t in root.targets for a in root.archives(t))
    if fault == "error":  # not worth a retry: given up at once, and said so
        assert states(job)[-2:] == ["cleanup", "completed"]
        assert any(e["kind"] == "cleanup_gave_up" for e in job["events"])
    else:
        assert states(job)[-4:] == ["cleanup", "cleanup", "cleanup", "completed"]
        assert root.staging_leftovers() == []


@pytest.mark.slow
def test_an_empty_mount_point_is_not_a_target(root: Root) -> None:
    """With require_marker, a directory without the marker (an empty mount point, the
    disk not mounted on it) is waited for, and nothing is written into it."""
    root.write_config(
        retry={"max_attempts": 100, "backoff": "100ms", "backoff_max": "300ms"},
        storage__offsite={"require_marker": True},
    )
    check = root.cli("check-config")
    assert check.returncode == 0
    assert "has no .archived-target" in check.stderr and "init-target offsite" in check.stderr
    root.start()
    (job_id,) = root.submit(root.job_file("guarded"))
    wait_until(lambda: "recoverable_error" in states(root.show(job_id)), 30, "a retry")
    assert "has no .archived-target" in json.dumps(root.show(job_id)["history"])
    assert list(root.targets["offsite"].iterdir()) == []  # the "root file system" stays clean
    marked = root.cli("init-target", "offsite")
    assert marked.returncode == 0, marked.stderr
    assert (root.targets["offsite"] / ".archived-target").is_file()
    assert root.cli("init-target", "offsite").stdout.strip().endswith("already marked")
    job = root.wait_state(job_id, "completed", "failed")
    assert job["state"] == "completed", job
    assert len(root.archives("offsite")) == 1
    assert root.cli("check-config").stderr == ""


@pytest.mark.slow
def test_init_target_refuses_what_it_cannot_mark(root: Root) -> None:
    assert root.cli("init-target", "nosuch").returncode == 2
    unplug(root, "offsite")
    result = root.cli("init-target", "offsite")
    assert result.returncode == 78 and "mount the disk" in result.stderr
    assert not root.targets["offsite"].exists()  # never made on the wrong disk


@pytest.mark.slow
def test_staging_space_is_checked_before_staging(root: Root, small_fs: Callable[..., Path]) -> None:
    """The sources need more than the staging file system has: the attempt fails as
    recoverable, saying how much, before a byte is staged; more room, and it goes on."""
    staging = small_fs(root.state_dir / "staging")
    root.write_config(retry={"max_attempts": 100, "backoff": "100ms", "backoff_max": "300ms"})
    root.start()
    (job_id,) = root.submit(root.job_file("roomy"))
    wait_until(lambda: "recoverable_error" in states(root.show(job_id)), 30, "a retry")
    history = json.dumps(root.show(job_id)["history"])
    assert "activity_archiving: staging: needs " in history and " bytes, has " in history
    assert not [p for p in staging.rglob("*") if p.is_file()]  # nothing staged
    activity = next(t for t in root.show(job_id)["tasks"] if t["kind"] == "activity")
    assert activity["attempts"] == 0  # no task started
    remount(staging, "16m")
    job = root.wait_state(job_id, "completed", "failed")
    assert job["state"] == "completed", job


async def test_the_staging_estimate_covers_what_is_staged(tmp_path: Path) -> None:
    """In-process: `estimate` against what the files driver then really writes, for short
    and long, ASCII and non-ASCII names, empty and large files, and a sparse file (which
    becomes full-size payload); and its count of files and bytes."""
    import anyio

    from archived.artifacts import ArtifactWriter
    from archived.config import Config
    from archived.drivers.base import ActivityContext
    from archived.drivers.files import FilesDriver

    tree = tmp_path / "src"
    (tree / ("deep-" * 30)).mkdir(parents=True)
    (tree / "empty").write_bytes(b"")
    (tree / "small.txt").write_text("x" * 700)
    (tree / "grüße.txt").write_text("hallo\n")
    (tree / ("deep-" * 30) / ("long-name-" * 12)).write_bytes(os.urandom(5000))
    with open(tree / "sparse.img", "wb") as f:
        f.truncate(3 * 1024 * 1024)  # no block on disk, 3 MiB in the bag
    (tree / "skipped.tmp").write_bytes(os.urandom(100_000))
    config = Config.model_validate({"sources": {"allowed_roots": [str(tmp_path)]}})
    driver = FilesDriver("a", FilesDriver.options({"path": str(tree), "exclude": ["*.tmp"]}))
    bag = "job-0123456789ab-20261201T000000Z"
    estimate = await anyio.to_thread.run_sync(driver.estimate, f"{bag}/data/a/")

    staging = tmp_path / "staging"
    writer = ArtifactWriter(staging / "a.tar", bag, "a", staging / "a.records")
    try:
        await driver.run(ActivityContext("0123456789ab", config, writer, anyio.CapacityLimiter(1)))
    finally:
        writer.close()
    staged = (staging / "a.tar").stat().st_size + (staging / "a.records").stat().st_size
    assert staged <= estimate.staged <= staged + 5 * 600  # a little room a file, no more
    # and the totals progress is shown against are exact
    assert (
        (estimate.files, estimate.bytes)
        == (writer.files, writer.total_bytes)
        == (5, 3 * 1024 * 1024 + 5706)
    )


def test_a_write_cut_short_leaves_nothing_its_retry_keeps(tmp_path: Path) -> None:
    """What an interrupted write of an archive left under a temporary name goes before
    the next try; another archive's temporary file, and everything else, stays."""
    from archived.drivers.localdir import LocalDirDriver, _tmp_name

    final = tmp_path / "b.tar"
    mine = [_tmp_name(final), _tmp_name(final)]
    others = [
        _tmp_name(tmp_path / "a-b.tar"),  # its name ends like ours
        tmp_path / ".archived-tmp-b.tar",
        tmp_path / "x-b.tar",
        tmp_path / "a-b.tar",
    ]
    for path in mine + others:
        path.write_bytes(b"partial")
    LocalDirDriver._discard_partial(final)
    assert sorted(tmp_path.iterdir()) == sorted(others)
