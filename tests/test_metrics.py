"""The metrics the database gives (in process, on a real SQLite store), and the
monitoring kit in contrib/ built on them: alert rules checked and unit-tested with
`promtool`, a Grafana dashboard that asks only for metrics the daemon writes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from archived.config import Config
from archived.metrics import Metrics, Schedule, Stored, write_textfile
from archived.states import Event, State
from archived.store import NewJob, ScheduleRun, Store
from archived.store_sqlite import SqliteStore

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
RULES = CONTRIB / "prometheus" / "archived.rules.yml"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def complete(store: Store, job_id: str) -> None:
    """The job through its phases to `completed`, as the runner would record it."""
    await store.transition(job_id, State.QUEUED, Event.TRIGGERED, "claimed")
    for state in (State.ACTIVITY_ARCHIVING, State.POST_PROCESSING, State.STORE):
        await store.transition(job_id, state, Event.DONE, "done")
    await store.transition(job_id, State.CLEANUP, Event.CLEANED, "cleaned")


async def test_the_queue_and_the_schedules_as_the_database_tells_them(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "archived.db", "host")
    now = datetime.now(UTC)

    def job(job_id: str, name: str, not_before: datetime | None = None) -> NewJob:
        return NewJob(job_id, name, "{}", "", "{}", "", not_before, ())

    try:
        assert await store.queue_depth(now) == (0, None)
        await store.insert_job(job("due", "a"), reason="new")
        early = now - timedelta(hours=2)
        await store.insert_job(job("late", "b", early), reason="new")
        await store.insert_job(job("waits", "c", now + timedelta(days=1)), reason="new")
        depth, oldest = await store.queue_depth(datetime.now(UTC))
        assert depth == 2  # not the one whose time has not come
        assert oldest == early  # due the longest, though made last

        first = datetime(2026, 1, 1, tzinfo=UTC)
        run = ScheduleRun("nightly", first, "created", job_id="sched", at=early)
        await store.insert_job(job("sched", "n"), reason="new", schedule_run=run)
        await complete(store, "sched")
        second = ScheduleRun("nightly", first + timedelta(days=1), "created", job_id="other")
        await store.insert_job(job("other", "n"), reason="new", schedule_run=second)  # not done
        skipped_at = datetime(2026, 2, 1, tzinfo=UTC)
        await store.record_schedule_run(ScheduleRun("weekly", first, "skipped", at=skipped_at))
        seen_at = datetime(2025, 12, 1, tzinfo=UTC)
        async with store.db.transaction() as tx:  # as if first seen then
            await tx.run("schedule_first_seen", schedule="nightly", now=seen_at)
        completed = [h for h in await store.history("sched") if h.state == "completed"]
        assert await store.last_success_by_schedule() == {
            "nightly": completed[0].at,
            "weekly": skipped_at,
        }
        assert await store.schedules_first_seen() == {"nightly": seen_at}

        hourly = {"cron": "0 * * * *", "job": {"name": "n", "activities": []}}
        weekdays = {"cron": "0 2 * * 1-5", "timezone": "Europe/Berlin", "job": hourly["job"]}
        config = Config.model_validate({"schedules": {"nightly": hourly, "weekdays": weekdays}})
        stored = await Stored.read(store, config)
    finally:
        await store.close()
    got = samples(Metrics().render(stored))
    assert got[("archived_queue_depth", ())] == 3  # with `other`, made by its schedule
    assert 7100 < got[("archived_queue_oldest_seconds", ())] < 7300
    schedule = (("schedule", "nightly"),)
    assert got[("archived_schedule_period_seconds", schedule)] == 3600
    assert got[("archived_schedule_period_seconds", (("schedule", "weekdays"),))] == 3 * 86400
    assert got[("archived_schedule_last_success_timestamp_seconds", schedule)] == (
        completed[0].at.timestamp()
    )
    # only schedules of the config in force: `weekly` was removed from it
    assert (
        "archived_schedule_last_success_timestamp_seconds",
        (("schedule", "weekly"),),
    ) not in got
    assert abs(got[("archived_metrics_written_timestamp_seconds", ())] - now.timestamp()) < 60


def test_the_kit_asks_only_for_metrics_the_daemon_writes() -> None:
    families = re.findall(r"^# TYPE (\S+) (\S+)$", Metrics().render(Stored({}, {}, {}, 0)), re.M)
    written = {name for name, _ in families}
    written |= {
        f"{name}_{part}"
        for name, kind in families
        if kind == "summary"
        for part in ("sum", "count")
    }
    dashboard = json.loads((CONTRIB / "grafana" / "archived.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for where, text in (("rules", RULES.read_text()), ("dashboard", "\n".join(exprs))):
        asked = set(re.findall(r"\barchived_[a-z_]+\b", text))
        assert asked, where
        assert asked <= written, f"{where} asks for {sorted(asked - written)}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian: prometheus)")
def test_the_alert_rules_are_valid_and_fire_when_they_should() -> None:
    for command in (["check", "rules", RULES.name], ["test", "rules", "archived.rules.test.yml"]):
        done = subprocess.run(
            ["promtool", *command], cwd=RULES.parent, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian: prometheus)")
def test_the_textfile_passes_promtools_check(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.transition(State.COMPLETED)
    metrics.step(State.STORE, 1.5)
    metrics.bytes_archived = 12_345_678_901
    schedule = Schedule('odd "name"\\', 3600.0, datetime.now(UTC), None)
    path = tmp_path / "archived.prom"
    write_textfile(path, metrics.render(Stored({}, {}, {}, 0, schedules=[schedule])))
    done = subprocess.run(
        ["promtool", "check", "metrics"],
        input=path.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    got = samples(path.read_text())
    assert got[("archived_bytes_archived_total", ())] == 12_345_678_901
    assert got[("archived_schedule_period_seconds", (("schedule", 'odd "name"\\'),))] == 3600
    assert got[("archived_phase_duration_seconds_sum", (("state", "store"),))] == 1.5
    assert path.stat().st_mode & 0o777 == 0o644
