"""Retention through the real daemon: expiry deletes every copy, holds stop it."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from conftest import Root, wait_until

pytestmark = pytest.mark.slow  # the acceptance layer: the daemon and the CLI as processes


def expire_now(root: Root, job_id: str) -> None:
    """Let retention time pass: move the job's expiry into the past in its database."""
    db = sqlite3.connect(root.state_dir / "archived.db", timeout=30)
    with db:
        db.execute("UPDATE jobs SET expires_at = '2000-01-01T00:00:00Z' WHERE id = ?", (job_id,))
    db.close()


def job_copy(job: dict[str, Any], target: str) -> dict[str, Any]:
    (copy,) = [c for c in job["copies"] if c["target"] == target]
    return copy


def kept_job(root: Root, name: str, days: int = 1) -> str:
    (job_id,) = root.submit(root.job_file(name, retention_days=days))
    job = root.wait_state(job_id, "completed", "failed")
    assert job["state"] == "completed"
    assert job["expires_at"] > job["updated_at"]
    return job_id


def test_expiry_deletes_every_copy_and_keeps_history(root: Root) -> None:
    root.write_config(retention={"check_interval": "100ms"})
    root.start()
    job_id = kept_job(root, "short-lived")
    assert len(root.all_target_files()) == 2
    expire_now(root, job_id)
    job = root.wait_state(job_id, "deleted")
    assert root.all_target_files() == []
    assert job["history"][-1]["state"] == "deleted"
    assert "every copy deleted" in job["history"][-1]["reason"]
    assert all(c["deleted_at"] for c in job["copies"])
    assert all(c["sha256"] for c in job["copies"])  # the digests stay
    text = root.cli("show", job_id).stdout
    for target, path in root.targets.items():
        assert f"  {target:12}  deleted {job_copy(job, target)['deleted_at'][:19]}" in text
        assert str(path) in text  # where it was
    assert root.cli("hold", job_id).returncode == 1


def test_a_legal_hold_stops_deletion_until_released(root: Root) -> None:
    root.write_config(retention={"check_interval": "100ms"})
    root.start()
    held = kept_job(root, "held")
    control = kept_job(root, "control")
    assert root.cli("hold", held).returncode == 0
    assert "legal hold" in root.cli("show", held).stdout
    expire_now(root, held)
    expire_now(root, control)
    root.wait_state(control, "deleted")  # a retention round has run since
    assert root.show(held)["state"] == "completed"
    assert len(root.all_target_files()) == 2
    assert root.cli("release", held).returncode == 0
    root.wait_state(held, "deleted")
    assert root.all_target_files() == []


def test_an_unreachable_target_is_retried_and_nothing_is_claimed_deleted(root: Root) -> None:
    root.write_config(retention={"check_interval": "100ms"})
    daemon = root.start()
    job_id = kept_job(root, "stubborn")
    offsite = root.targets["offsite"]
    parked = offsite.with_name("parked")
    offsite.rename(parked)  # the offsite disk is unmounted
    expire_now(root, job_id)

    def primary_gone() -> bool:
        return not root.archives("primary")

    wait_until(primary_gone, 30, "the reachable copy deleted")
    wait_until(
        lambda: any(
            e.get("event", "").startswith("retention: cannot delete") for e in daemon.events()
        ),
        10,
        "the failure logged",
    )

    def deletions() -> dict[str, str | None]:
        return {c["target"]: c["deleted_at"] for c in root.show(job_id)["copies"]}

    # the file goes before the queue records it: wait for the record
    wait_until(lambda: deletions()["primary"], 10, "the deletion recorded")
    assert deletions()["offsite"] is None
    assert root.show(job_id)["state"] == "completed"
    # a restart in between: deletion picks up where it was
    assert daemon.stop() == 0
    parked.rename(offsite)
    assert len(root.archives("offsite")) == 1
    root.start()
    root.wait_state(job_id, "deleted")
    assert root.all_target_files() == []


def test_retention_days_outside_the_configured_bounds_are_refused(root: Root) -> None:
    root.write_config(retention={"min_days": 30, "max_days": 3650})
    result = root.cli("submit", str(root.job_file("toolong", retention_days=5000)))
    assert result.returncode == 2
    assert "retention_days: 5000 is outside" in result.stderr
    result = root.cli("submit", str(root.job_file("tooshort", retention_days=7)))
    assert result.returncode == 2
