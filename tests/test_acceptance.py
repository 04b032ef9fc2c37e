"""The whole cycle through the real daemon: job file in, signed verified archives out."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path

import bagit
import pytest
from conftest import Root, both_backends, tar_members

pytestmark = pytest.mark.slow  # the acceptance layer: the daemon and the CLI as processes

HAPPY_PATH = [
    "uninitialized",
    "queued",
    "activity_archiving",
    "post_processing",
    "store",
    "cleanup",
    "completed",
]


def two_activity_job(root: Root) -> Path:
    (root.sources / "b").mkdir()
    (root.sources / "b" / "notes.md").write_text("# notes\n")
    (root.sources / "b" / "skip.tmp").write_text("excluded\n")
    return root.job_file(
        "exams-2026-ws",
        metadata={"Source-Organization": "Example University", "Course": "CS101"},
        activities=[
            {"name": "submissions", "driver": "files", "path": str(root.sources / "a")},
            {
                "name": "notes",
                "driver": "files",
                "path": str(root.sources / "b"),
                "exclude": ["*.tmp"],
            },
        ],
    )


def test_job_with_two_activities_lands_signed_on_both_targets(root: Root, tmp_path: Path) -> None:
    daemon = root.start()
    (job_id,) = root.submit(two_activity_job(root))
    job = root.wait_state(job_id, "completed", "failed")
    assert job["state"] == "completed", job
    assert [h["state"] for h in job["history"]] == HAPPY_PATH
    assert all(h["at"].endswith("Z") and h["reason"] for h in job["history"])
    assert {(t["kind"], t["name"], t["state"]) for t in job["tasks"]} == {
        ("activity", "submissions", "completed"),
        ("activity", "notes", "completed"),
        ("storage", "primary", "completed"),
        ("storage", "offsite", "completed"),
    }
    assert job["error"] is None
    assert {c["target"] for c in job["copies"]} == {"primary", "offsite"}

    archives = {name: root.archives(name) for name in root.targets}
    for name, found in archives.items():
        assert len(found) == 1, (name, found)
        archive = found[0]
        assert archive.parent == root.targets[name] / "exams-2026-ws"
        assert archive.name.startswith(f"exams-2026-ws-{job_id}-")
        copy = next(c for c in job["copies"] if c["target"] == name)
        assert copy["path"] == str(archive) and copy["size"] == archive.stat().st_size
    # identical bytes on both targets
    assert archives["primary"][0].read_bytes() == archives["offsite"][0].read_bytes()
    assert root.all_target_files() == sorted(p for a in archives.values() for p in a)
    assert root.staging_leftovers() == []

    # the tar holds one bag that bagit-python validates
    archive = archives["primary"][0]
    members = tar_members(archive)
    bag_name = archive.name.removesuffix(".tar")
    assert {m.split("/", 1)[0] for m in members} == {bag_name}
    extract = tmp_path / "extract"
    with tarfile.open(archive) as tar:
        tar.extractall(extract, filter="data")
    bag_dir = extract / bag_name
    bag = bagit.Bag(str(bag_dir))
    bag.validate()
    assert bag.info["External-Identifier"] == job_id
    assert bag.info["Course"] == "CS101"
    assert sorted(bag.payload_files()) == [
        "data/notes/notes.md",
        "data/submissions/hello.txt",
        "data/submissions/sub/data.bin",
    ]
    assert (bag_dir / "data/submissions/sub/data.bin").read_bytes() == (
        root.sources / "a/sub/data.bin"
    ).read_bytes()
    events = [
        json.loads(line) for line in (bag_dir / "archived-events.jsonl").read_text().splitlines()
    ]
    assert [e["state"] for e in events if e["type"] == "transition"] == HAPPY_PATH[:4]
    assert any(e["type"] == "check_integrity" and e["result"] == "ok" for e in events)
    # post-processing's events, logged in the bag before they were committed, at the
    # times the queue has them
    steps = ("check_integrity", "calculate_checksums")
    logged = [(e["type"], e["at"]) for e in events if e["type"] in steps]
    assert logged == [(e["kind"], e["at"]) for e in job["events"] if e["kind"] in steps]
    assert len(logged) == 2

    # the signature verifies with the minisign binary and the key pair it made
    subprocess.run(
        ["minisign", "-Vm", str(bag_dir / "tagmanifest-sha256.txt"), "-p", str(root.public_key)],
        check=True,
        capture_output=True,
        timeout=30,
    )

    # archived verify accepts it, and rejects a copy with one flipped payload byte
    ok = root.cli("verify", "--key", str(root.public_key), str(archive))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("ok:")
    bad = tmp_path / "bad.tar"
    flip_member_byte(archive, bad, f"{bag_name}/data/submissions/sub/data.bin")
    result = root.cli("verify", "--key", str(root.public_key), str(bad))
    assert result.returncode == 1
    assert "data/submissions/sub/data.bin" in result.stdout
    assert "hello.txt" not in result.stdout

    assert daemon.stop(signal.SIGTERM) == 0


def flip_member_byte(archive: Path, out: Path, member: str) -> None:
    """Copy `archive` to `out` with one byte of `member`'s content flipped."""
    with tarfile.open(archive) as tar:
        info = tar.getmember(member)
        offset = info.offset_data + info.size // 2
    shutil.copyfile(archive, out)
    with open(out, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


@both_backends
def test_not_before_is_honoured(root: Root) -> None:
    root.start()
    (later,) = root.submit(root.job_file("later", not_before="2999-01-01T00:00:00Z"))
    (now,) = root.submit(root.job_file("now"))
    assert root.wait_state(now, "completed")["state"] == "completed"
    assert root.show(later)["state"] == "queued"


def test_sigterm_exits_zero_and_restart_keeps_history(root: Root) -> None:
    daemon = root.start()
    (job_id,) = root.submit(root.job_file("first"))
    root.wait_state(job_id, "completed")
    assert daemon.stop(signal.SIGINT) == 0
    events = daemon.events()
    assert any(e.get("event") == "stopped" for e in events)
    assert all(
        "job_id" in e and "state" in e
        for e in events
        if e.get("event") in ("transition", "job queued")
    )
    root.start()
    assert root.show(job_id)["state"] == "completed"
    listed = json.loads(root.cli("jobs", "--json", check=True).stdout)
    assert [j["id"] for j in listed] == [job_id]


@both_backends
def test_submit_wait_exits_zero_when_completed(root: Root) -> None:
    # a second in activity_archiving: the waiter sees the job before it is done, however
    # fast the queue (with PostgreSQL, a daemon may take it from the spool to `completed`
    # before the waiter first looks)
    root.start(env={"ARCHIVED_FAILPOINTS": "activity_task=delay:1"})
    result = root.cli("submit", "--wait", str(root.job_file("waited")), timeout=120)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert root.show(job_id)["state"] == "completed"
    # not a terminal: one plain line per state change, the last with the job's figures
    said = result.stderr.splitlines()
    assert len(said) == len(set(said)) >= 2, said
    assert all(line.startswith(f"{job_id}: ") for line in said)
    assert said[-1].startswith(f"{job_id}: completed  2 files, 293.0 KiB, 0:")
    assert "\x1b" not in result.stderr


@pytest.mark.parametrize("limit", [1])
@both_backends
def test_max_concurrent_jobs_bounds_processing(root: Root, limit: int) -> None:
    root.write_config(limits={"activity_tasks": 1}, daemon={"max_concurrent_jobs": limit})
    root.start()
    ids = root.submit(*(root.job_file(f"j{i}") for i in range(3)))
    for job_id in ids:
        root.wait_state(job_id, "completed")
    # with one job at a time, no job started before the previous one was final
    spans = []
    for job_id in ids:
        history = root.show(job_id)["history"]
        start = next(h["at"] for h in history if h["state"] == "activity_archiving")
        spans.append((start, history[-1]["at"]))
    spans.sort()
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end


@both_backends
def test_a_job_waiting_to_retry_holds_no_slot(root: Root) -> None:
    """With one job at a time, a job backing off on an unreachable target (forever: its
    attempts are many, its backoff long) does not delay a job to a healthy target."""
    root.write_config(
        daemon={"max_concurrent_jobs": 1},
        retry={"max_attempts": 100, "backoff": "10s", "backoff_max": "10s"},
    )
    away = root.path / "offsite-unmounted"
    root.targets["offsite"].rename(away)  # an unmounted disk
    root.start()
    (stuck,) = root.submit(root.job_file("stuck", storage=["offsite"]))
    root.wait_state(stuck, "recoverable_error")
    (healthy,) = root.submit(root.job_file("healthy", storage=["primary"]))
    assert root.wait_state(healthy, "completed", "failed", timeout=30)["state"] == "completed"
    waiting = root.show(stuck)
    assert waiting["state"] in ("recoverable_error", "store", "error"), waiting
    assert waiting["retry_at"] is None or waiting["retry_at"] > waiting["updated_at"]


def test_names_that_one_file_system_cannot_tell_apart_are_warned_about(root: Root) -> None:
    """bsdtar, and case-insensitive or normalizing file systems, keep one of each pair."""
    source = root.sources / "names"
    source.mkdir()
    for name in ("Report.txt", "report.TXT", "caf\u00e9.txt", "cafe\u0301.txt", "other.txt"):
        (source / name).write_text(name)
    root.start()
    job = root.job_file("names", activities=[{"name": "n", "driver": "files", "path": str(source)}])
    (job_id,) = root.submit(job)
    done = root.wait_state(job_id, "completed", "failed")
    assert done["state"] == "completed", done.get("error")
    warnings = [e["detail"] for e in done["events"] if e["kind"] == "warning"]
    assert len(warnings) == 1, done["events"]
    assert sorted(map(sorted, warnings[0]["names"])) == [
        ["data/n/Report.txt", "data/n/report.TXT"],
        ["data/n/cafe\u0301.txt", "data/n/caf\u00e9.txt"],
    ]
    shown = root.cli("show", job_id, check=True).stdout
    assert "warning" in shown and "Report.txt" in shown
    archive = root.archives("primary")[0]
    verified = root.cli("verify", str(archive))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "would collide" in verified.stderr and "Report.txt" in verified.stderr
    with tarfile.open(archive) as tar:  # the archive's own event log has it too
        events = tar.extractfile(f"{archive.stem}/archived-events.jsonl")
        assert events is not None
        logged = [json.loads(line) for line in events.read().splitlines()]
    assert [e["names"] for e in logged if e["type"] == "warning"] == [warnings[0]["names"]]
