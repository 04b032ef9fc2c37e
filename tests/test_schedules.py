"""Schedules through the real daemon: jobs by cron, one per slot, across restarts (slow:
a cron's slots take their time); and what the CLI says of schedules (in process)."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from typing import Any

import pytest
from conftest import Root, wait_until

EVERY_2S = "* * * * * */2"  # croniter's six fields: seconds last


def schedule(root: Root, **extra: Any) -> dict[str, Any]:
    return {
        "cron": EVERY_2S,
        "job": {
            "name": "nightly",
            "activities": [{"name": "a", "driver": "files", "path": str(root.sources / "a")}],
        },
        **extra,
    }


def runs(root: Root) -> list[dict[str, Any]]:
    result = root.cli("schedules", "--json", "--limit", "1000", check=True)
    return sorted(json.loads(result.stdout), key=lambda r: r["slot"])


def created(root: Root) -> list[dict[str, Any]]:
    return [r for r in runs(root) if r["result"] == "created"]


@pytest.mark.slow
def test_a_schedule_creates_one_job_per_slot(root: Root) -> None:
    root.write_config(schedules__nightly=schedule(root))
    root.start()
    wait_until(lambda: len(created(root)) >= 2, 30, "two scheduled jobs")
    made = created(root)
    assert len({r["slot"] for r in made}) == len(made)
    for run in made[:2]:
        job = root.wait_state(run["job_id"], "completed", "failed")
        assert job["state"] == "completed"
        assert f"for {run['slot']}" in job["history"][0]["reason"]
    made = created(root)  # before the listing: a slot every 2 s may add one after it
    listed = json.loads(root.cli("jobs", "--json", check=True).stdout)
    assert {r["job_id"] for r in made} <= {j["id"] for j in listed}  # (more may come)
    assert "nightly: cron" in root.cli("schedules").stdout


def seen(root: Root, name: str) -> bool:
    db = sqlite3.connect(root.state_dir / "archived.db", timeout=30)
    try:
        return (
            db.execute("SELECT 1 FROM schedules_seen WHERE schedule = ?", (name,)).fetchone()
            is not None
        )
    finally:
        db.close()


def once_at(moment: float) -> str:
    """A cron expression (croniter's six fields, seconds last) with one slot a year."""
    t = time.gmtime(moment)
    return f"{t.tm_min} {t.tm_hour} {t.tm_mday} {t.tm_mon} * {t.tm_sec}"


def miss_a_slot(root: Root, missed: str) -> float:
    """Add a schedule whose only slot is a few seconds away; be down when it passes. It is
    added by a reload once the daemon runs, so a slow start cannot pass the slot."""
    daemon = root.start()
    slot = time.time() + 7  # room for a reload on a loaded machine
    root.write_config(schedules__once=schedule(root, cron=once_at(slot), missed=missed))
    daemon.send(signal.SIGHUP)
    wait_until(lambda: seen(root, "once"), 5, "the daemon to record the schedule as seen")
    assert time.time() < slot - 0.5, "the reload took too long for this test"
    assert daemon.stop() == 0
    wait_until(lambda: time.time() > slot + 1, 10, "the slot to pass while down")
    root.start()
    return slot


@pytest.mark.slow
def test_missed_latest_runs_the_missed_slot_once_across_restarts(root: Root) -> None:
    slot = miss_a_slot(root, "latest")
    wait_until(lambda: len(created(root)) == 1, 30, "the missed slot's job")
    run = created(root)[0]
    assert run["slot"] == iso_time(int(slot))
    root.wait_state(run["job_id"], "completed")
    root.daemons[-1].stop()
    root.start()  # and again: the slot was acted on, no second job
    time.sleep(0.5)  # several ticks of the restarted daemon: nothing may appear
    assert len(created(root)) == 1
    assert len(json.loads(root.cli("jobs", "--json", check=True).stdout)) == 1


@pytest.mark.slow
def test_missed_skip_runs_nothing_for_a_slot_missed_while_down(root: Root) -> None:
    miss_a_slot(root, "skip")
    time.sleep(0.5)  # several ticks of the restarted daemon: nothing may appear
    assert created(root) == []
    assert json.loads(root.cli("jobs", "--json", check=True).stdout) == []


@pytest.mark.slow
def test_unchanged_sources_are_skipped(root: Root) -> None:
    root.write_config(schedules__nightly=schedule(root, skip_unchanged=True))
    root.start()
    wait_until(lambda: len(created(root)) >= 1, 30, "a first scheduled job")
    root.wait_state(created(root)[0]["job_id"], "completed")
    wait_until(lambda: any(r["result"] == "skipped" for r in runs(root)), 30, "a skipped slot")
    skipped = next(r for r in runs(root) if r["result"] == "skipped")
    assert skipped["job_id"] is None and "unchanged" in skipped["detail"]
    count = len(created(root))
    (root.sources / "a" / "new.txt").write_text("changed\n")
    wait_until(lambda: len(created(root)) > count, 30, "a job after the change")


@pytest.mark.slow
def test_a_schedule_added_by_reload(root: Root) -> None:
    daemon = root.start()
    root.write_config(schedules__later=schedule(root))
    daemon.send(signal.SIGHUP)
    wait_until(lambda: len(created(root)) >= 1, 30, "a job from the reloaded schedule")
    assert created(root)[0]["schedule"] == "later"


def test_schedules_lists_every_schedule_with_its_next_slot_before_any_ran(
    root: Root, capsys: pytest.CaptureFixture[str]
) -> None:
    slot = int(time.time()) + 3600
    root.write_config(
        schedules__yearly=schedule(root, cron=once_at(slot)),
        schedules__typo=schedule(root, cron="*/2 * * * * *"),  # meant: every two seconds
    )
    assert root.main("schedules") == 0  # no daemon has run, no database yet
    lines = capsys.readouterr().out.splitlines()
    (yearly,) = [line for line in lines if line.startswith("yearly:")]
    assert f"next {iso_time(slot)} (in 59m)" in yearly or f"next {iso_time(slot)} (in 1h)" in yearly
    (typo,) = [line for line in lines if line.startswith("typo:")]
    assert "next " in typo  # seconds last: the slots are every second of every other minute


def test_bad_schedules_are_config_errors(root: Root, capsys: pytest.CaptureFixture[str]) -> None:
    root.write_config(schedules__bad=schedule(root, cron="every tuesday"))
    assert root.main("check-config") == 78
    assert "not a valid cron expression" in capsys.readouterr().err
    bad_job = schedule(root)
    bad_job["job"]["storage"] = ["nowhere"]
    root.write_config(schedules__bad=bad_job)
    assert root.main("check-config") == 78
    assert "schedules.bad.job: storage: unknown storage target 'nowhere'" in capsys.readouterr().err


def test_a_cron_that_never_fires_is_a_config_error(
    root: Root, capsys: pytest.CaptureFixture[str]
) -> None:
    """February 30th is a valid cron expression with no slot at all: the daemon would
    log a traceback every tick and never make a job."""
    root.write_config(schedules__never=schedule(root, cron="0 0 30 2 *"))
    assert root.main("check-config") == 78
    err = capsys.readouterr().err
    assert "schedules.never" in err and "never" in err.split("cron")[-1]


def iso_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
