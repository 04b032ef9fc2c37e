"""The state directory's file system full: the queue's database cannot be written. Nothing
is lost and the daemon keeps running; work goes on once there is room again."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Root, wait_until

pytestmark = pytest.mark.slow  # the acceptance layer: the daemon and the CLI as processes


def fill(directory: Path) -> Path:
    """A file that takes every free block of `directory`'s file system."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def alive(root: Root) -> bool:
    return all(d.proc is not None and d.proc.poll() is None for d in root.daemons)


def test_a_job_file_is_kept_until_the_queue_has_room(
    root: Root, small_fs: Callable[..., Path]
) -> None:
    """A good job file met while the database cannot grow stays in the spool (not in
    corrupt/, as if it were bad) and becomes a job once there is room."""
    state = small_fs(root.state_dir, "4m")
    daemon = root.start()
    filler = fill(state)
    (job_id,) = root.submit(root.job_file("waiting"))
    wait_until(
        lambda: "cannot take a spool entry now" in daemon.log_text(), 30, "the entry left waiting"
    )
    assert list((root.spool / "corrupt").iterdir()) == []
    assert alive(root)
    filler.unlink()
    job = root.wait_state(job_id, "completed", "failed")
    assert job["state"] == "completed", job


def test_a_running_job_resumes_once_the_queue_has_room(
    root: Root, small_fs: Callable[..., Path]
) -> None:
    """The disk fills while a job runs, and while another waits for its not_before: the
    daemon keeps running, neither job is lost or failed, both complete after room is made."""
    state = small_fs(root.state_dir, "4m")
    go = root.path / "go"  # the running job's program ends once this exists
    root.write_config(
        retry={"max_attempts": 100, "backoff": "100ms", "backoff_max": "500ms"},
        commands__slow={"argv": ["sh", "-c", f"until [ -e {go} ]; do sleep 0.05; done; echo hi"]},
    )
    daemon = root.start()
    slow = [{"name": "a", "driver": "command", "command": "slow"}]
    (running,) = root.submit(root.job_file("slow", activities=slow))
    root.wait_state(running, "activity_archiving")
    # due a few seconds from now: the poll loop takes it while the disk is full
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 6))
    (queued,) = root.submit(root.job_file("later", not_before=later))
    assert root.wait_state(queued, "queued")["state"] == "queued"
    filler = fill(state)
    go.touch()
    wait_until(
        lambda: (
            "job stopped: the queue cannot be written" in daemon.log_text()
            and "the queue cannot be written now" in daemon.log_text()
        ),
        60,
        "both jobs held up by the full disk",
    )
    assert alive(root)
    filler.unlink()
    for job_id in (running, queued):
        job = root.wait_state(job_id, "completed", "failed")
        assert job["state"] == "completed", json.dumps(job, indent=1)
    assert alive(root)
