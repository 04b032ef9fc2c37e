"""Several daemons, each with its own state and spool directories, on one PostgreSQL
queue started by the test: claims, leases, takeovers, notifications, schedules.

Leases are 2 s here, so that a daemon killed or stopped is taken over within seconds.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Daemon, Root, wait_until
from psycopg.rows import dict_row

pytestmark = pytest.mark.slow  # the acceptance layer: the daemon and the CLI as processes

on_postgres = pytest.mark.parametrize("root", ["postgres"], indirect=True)


def query(root: Root, sql: str, *params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(root.queue["url"], row_factory=dict_row) as conn:
        return conn.execute(sql, params).fetchall()


def jobs(root: Root) -> list[dict[str, Any]]:
    return json.loads(root.cli("jobs", "--json", check=True).stdout)  # type: ignore[no-any-return]


def completed_by(daemon: Daemon) -> set[str]:
    """The jobs this daemon took to `completed`, by its own log."""
    return {
        e["job_id"]
        for e in daemon.events()
        if e.get("event") == "transition" and e.get("state") == "completed"
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_every_job_completed_once_with_one_verified_copy_per_target(
    root: Root, canceled: frozenset[str] = frozenset()
) -> None:
    """From the database: each job (but the `canceled`) completed once, each of its
    copies on disk as recorded; on the targets: nothing but those copies."""
    states = {r["id"]: r["state"] for r in query(root, "SELECT id, state FROM jobs")}
    assert {i for i, s in states.items() if s != "completed"} == canceled, states
    done = query(
        root,
        "SELECT job_id, count(*) AS n FROM history WHERE state = 'completed' GROUP BY job_id",
    )
    assert {r["job_id"]: r["n"] for r in done} == {i: 1 for i in states if i not in canceled}
    copies = query(root, "SELECT job_id, target, path, sha256 FROM copies")
    assert {(c["job_id"], c["target"]) for c in copies} == {
        (i, t) for i in states if i not in canceled for t in root.targets
    }
    for copy in copies:
        assert sha256(Path(copy["path"])) == copy["sha256"], copy
    assert root.all_target_files() == sorted(Path(c["path"]) for c in copies)


@on_postgres
def test_three_daemons_share_one_queue(root: Root) -> None:
    """60 jobs through three spools, a schedule, one daemon `kill -9`ed while it owns a
    running job and restarted later, and a cancel given on one host for a job running on
    another: every job completes once, with one verified archive per target."""
    (root.sources / "small").mkdir()
    (root.sources / "small" / "f.txt").write_text("small\n")
    small = [{"name": "a", "driver": "files", "path": str(root.sources / "small")}]
    root.queue["host_id"] = "host1"
    hosts = [root, root.host("host2"), root.host("host3")]
    # a long poll: new jobs and cancels reach the other daemons by NOTIFY
    daemon = {"max_concurrent_jobs": 3, "poll_interval": "10s"}
    for host in hosts:
        host.write_config(
            daemon=daemon,
            schedules__tick={
                "cron": "* * * * * */3",
                "job": {"name": "sched", "activities": small},
            },
        )
    slow = {"ARCHIVED_FAILPOINTS": "activity_task=delay:3"}  # host2 is killed amid a job
    # the others take a second a job, so the queue outlasts host2's first jobs (fast
    # daemons emptied it before host2 finished one, and it never ran a second)
    paced = {"ARCHIVED_FAILPOINTS": "activity_task=delay:1"}
    daemons = [hosts[0].start(env=paced), hosts[1].start(env=slow), hosts[2].start(env=paced)]
    for n, host in enumerate(hosts):
        host.submit(*(host.job_file(f"j{n}-{i}", activities=small) for i in range(20)))

    def owned_by_host2() -> str | None:
        if not completed_by(daemons[1]):
            return None  # a share of the work first
        busy = [j for j in jobs(root) if j["owner"] == "host2" and j["state"] != "queued"]
        return busy[0]["id"] if busy else None

    victim = wait_until(owned_by_host2, 60, "host2 running a job")
    daemons[1].kill()
    wait_until(
        lambda: any("taken over from host2" in h["reason"] for h in root.show(victim)["history"]),
        30,
        "the victim taken over",
    )
    # enough slots seen: no more of them (a reload), so that the queue runs dry
    wait_until(lambda: len(query(root, "SELECT 1 FROM schedule_runs")) >= 2, 30, "two slots")
    for host in hosts:
        host.write_config(daemon=daemon)
    for d in (daemons[0], daemons[2]):
        d.send(signal.SIGHUP)
        wait_until(lambda d=d: any(e.get("event") == "config reloaded" for e in d.events()))
    wait_until(
        lambda: all(j["state"] == "completed" for j in jobs(root)), 120, "every job completed"
    )
    daemons[1] = hosts[1].start()  # restarted later: its job is another daemon's now
    assert root.show(victim)["owner"] is None  # final: no daemon runs it
    shares = [completed_by(d) for d in root.daemons[:3]]
    assert all(shares), "each daemon did a share of the work"
    assert sum(map(len, shares)) == len(set().union(*shares)), "a job completed twice"
    assert len(set().union(*shares)) == len(jobs(root)) >= 62

    # each schedule slot made one job, though three daemons ticked
    runs = query(root, "SELECT slot, job_id FROM schedule_runs WHERE result = 'created'")
    scheduled = query(root, "SELECT id FROM jobs WHERE name = 'sched'")
    assert runs and {r["job_id"] for r in runs} == {j["id"] for j in scheduled}

    # a cancel given on one host stops a job running on another within seconds
    for d in (daemons[0], daemons[2], daemons[1]):
        assert d.stop() == 0
    hosts[1].start(env={"ARCHIVED_FAILPOINTS": "activity_task=delay:60"})
    (long_job,) = hosts[1].submit(hosts[1].job_file("long", activities=small))
    hosts[1].wait_state(long_job, "activity_archiving")
    began = time.monotonic()
    root.cli("cancel", long_job, check=True)  # on host1
    job = root.wait_state(long_job, "failed", timeout=30)
    assert time.monotonic() - began < 6, "stopped by NOTIFY, not at the next 10 s poll"
    assert job["error"].startswith("canceled")

    for host in hosts:
        assert host.staging_leftovers() == [], host.path
    assert_every_job_completed_once_with_one_verified_copy_per_target(
        root, canceled=frozenset({long_job})
    )


@on_postgres
def test_a_dead_daemons_copies_are_removed_by_the_one_that_takes_its_job_over(
    root: Root,
) -> None:
    root.queue["host_id"] = "dies"
    root.write_config()
    dying = root.start(env={"ARCHIVED_FAILPOINTS": "store.after_rename=kill"})
    (job_id,) = root.submit(root.job_file("orphaned"))
    assert dying.wait_exit(60) == -signal.SIGKILL
    left = [p for t in root.targets for p in root.archives(t)]  # and temporary files
    finished = {p.name for p in left if not p.name.startswith(".archived-tmp-")}
    assert finished, "the first copy was renamed into place before the kill"
    heir = root.host("heir")
    heir.start()
    job = root.wait_state(job_id, "completed", "failed", timeout=60)
    assert job["state"] == "completed", job
    reasons = [h["reason"] for h in job["history"]]
    assert any(r.startswith("taken over from dies") for r in reasons), reasons
    assert [h["state"] for h in job["history"]].count("activity_archiving") == 2
    for path in left:
        assert not path.exists(), "the dead attempt's copy (or temporary file) was removed"
    assert {o["key"].split("/")[1] for o in job["orphans"]} == finished
    assert all(o["removed_at"] for o in job["orphans"])
    assert_every_job_completed_once_with_one_verified_copy_per_target(root)


@on_postgres
def test_a_daemon_that_lost_its_lease_stops_the_job_and_touches_nothing(root: Root) -> None:
    """Stopped (SIGSTOP) past its lease while it runs a job, a daemon finds the job taken
    over when it goes on: it stops working on it without writing to the job's rows or
    to the targets."""
    root.queue["host_id"] = "paused"
    root.write_config()
    paused = root.start(env={"ARCHIVED_FAILPOINTS": "activity_task=delay:5"})
    (job_id,) = root.submit(root.job_file("contested"))
    root.wait_state(job_id, "activity_archiving")
    paused.send(signal.SIGSTOP)
    try:
        other = root.host("other")
        other.start()
        job = root.wait_state(job_id, "completed", "failed", timeout=60)
        assert job["state"] == "completed", job
        assert any(h["reason"].startswith("taken over from paused") for h in job["history"])
        files = {p: p.stat().st_mtime_ns for p in root.all_target_files()}
        before = root.show(job_id)
    finally:
        paused.send(signal.SIGCONT)
    # its delay is long over: the activity ends, and then it finds the lease gone
    wait_until(
        lambda: any(e.get("event", "").startswith("lease lost") for e in paused.events()),
        30,
        "the paused daemon noticing",
    )
    assert root.show(job_id) == before
    assert {p: p.stat().st_mtime_ns for p in root.all_target_files()} == files
    assert paused.proc is not None and paused.proc.poll() is None  # it goes on with others
    assert root.staging_leftovers() == []
    (next_job,) = root.submit(root.job_file("next"))
    assert root.wait_state(next_job, "completed", "failed")["state"] == "completed"


@on_postgres
@pytest.mark.parametrize("point", ["store.after_rename", "cleanup"])
def test_a_daemon_killed_and_started_again_resumes_its_own_jobs(root: Root, point: str) -> None:
    """The same host_id: its staging is still there, so its jobs go on where they were,
    whether or not their leases lapsed meanwhile; none is taken over."""
    root.queue["host_id"] = "same"
    root.write_config()
    daemon = root.start(env={"ARCHIVED_FAILPOINTS": f"{point}=kill"})
    (job_id,) = root.submit(root.job_file("killed"))
    assert daemon.wait_exit(60) == -signal.SIGKILL
    root.start()
    job = root.wait_state(job_id, "completed", "failed")
    assert job["state"] == "completed", job
    assert not any("taken over" in h["reason"] for h in job["history"])
    assert [h["state"] for h in job["history"]].count("activity_archiving") == 1
    assert root.staging_leftovers() == []
    assert_every_job_completed_once_with_one_verified_copy_per_target(root)


def test_an_sqlite_queue_moves_to_postgresql(root: Root, pg_url: str) -> None:
    daemon = root.start()
    (done,) = root.submit(root.job_file("done", retention_days=30))
    (later,) = root.submit(root.job_file("later", not_before="2999-01-01T00:00:00Z"))
    before = root.wait_state(done, "completed")
    assert daemon.stop() == 0
    root.queue = {"url": pg_url, "host_id": "mover", "lease": "2s"}
    root.write_config()
    moved = root.cli("migrate-queue")
    assert moved.returncode == 0, moved.stderr
    assert "2 jobs" in moved.stdout
    assert root.show(done) == before  # history, tasks, copies, times: all of it
    assert root.show(later)["state"] == "queued"
    again = root.cli("migrate-queue")
    assert again.returncode == 1 and "has jobs already" in again.stderr
    root.start()
    root.cli("cancel", later, check=True)
    assert root.wait_state(later, "failed")["error"] == "canceled while queued"


def test_check_config_says_a_localdir_target_must_be_shared(root: Root) -> None:
    root.write_config(queue={"url": "postgresql://archived@/archived?host=/nonexistent"})
    result = root.cli("check-config")
    assert result.returncode == 0, result.stderr
    assert "storage.primary: a localdir target with a PostgreSQL queue" in result.stderr
