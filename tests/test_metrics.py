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
from archived.metrics import Metrics, Stored
from archived.states import Event, State
from archived.store import Store

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
    store = await Store.open(tmp_path / "archived.db")
    now = datetime.now(UTC)
    job = {"spec": "{}", "spec_sha256": "", "config": "{}", "config_digest": "", "tasks": []}
    try:
        assert await store.queue_depth(now) == (0, None)
        await store.insert_job(job_id="due", name="a", not_before=None, **job)
        early = (now - timedelta(hours=2)).isoformat().replace("+00:00", "Z")
        await store.insert_job(job_id="late", name="b", not_before=early, **job)
        later = (now + timedelta(days=1)).isoformat().replace("+00:00", "Z")
        await store.insert_job(job_id="waits", name="c", not_before=later, **job)
        depth, oldest = await store.queue_depth(datetime.now(UTC))
        assert depth == 2  # not the one whose time has not come
        assert oldest == datetime.fromisoformat(early)  # due the longest, though made last

        slot = {"fingerprint": None, "detail": "", "now": early}
        run = {"schedule": "nightly", "slot": "2026-01-01T00:00:00Z", "result": "created"}
        await store.insert_job(
            job_id="sched",
            name="n",
            not_before=None,
            schedule_run={**run, **slot, "job_id": "sched"},
            **job,
        )
        await complete(store, "sched")
        await store.insert_job(
            job_id="other",
            name="n",
            not_before=None,
            schedule_run={**run, "slot": "2026-01-02T00:00:00Z", **slot, "job_id": "other"},
            **job,
        )  # made, not completed
        async with store.transaction() as tx:
            skipped = {**run, "schedule": "weekly", "result": "skipped", "job_id": None}
            await tx.run(
                "insert_schedule_run",
                **skipped,
                fingerprint=None,
                detail="",
                now="2026-02-01T00:00:00Z",
            )
            await tx.run("schedule_first_seen", schedule="nightly", now="2025-12-01T00:00:00Z")
        completed = [
            h for h in await store.fetchall("history", job_id="sched") if h["state"] == "completed"
        ]
        assert await store.last_success_by_schedule() == {
            "nightly": datetime.fromisoformat(completed[0]["at"]),
            "weekly": datetime.fromisoformat("2026-02-01T00:00:00Z"),
        }
        assert await store.schedules_first_seen() == {
            "nightly": datetime.fromisoformat("2025-12-01T00:00:00Z")
        }

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
        datetime.fromisoformat(completed[0]["at"]).timestamp()
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
