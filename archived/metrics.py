"""Prometheus text format for node_exporter's textfile collector.

Counters of what this daemon did live in memory (a restart resets them, which
Prometheus' rate() handles). What the database knows is read from it each time the
file is written: jobs by state, the queue, stored copies by their last audit, audit
results (which the command line's `archived audit` records there as much as the
daemon), and when each schedule last did its work, beside how long it may go without.
The file carries the time it was written, so a stale one (the daemon stopped or stuck)
is told from a quiet one. It is replaced atomically, so the collector never reads half
of it. contrib/prometheus/ has the alert rules built on these, contrib/grafana/ a
dashboard.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .config import Config
from .schedules import period
from .states import State
from .store import QueueStats, Store

AUDIT_RESULTS = ("ok", "missing", "damaged", "repaired", "unrepaired", "unreachable")
COPY_AUDITS = ("ok", "damaged", "unreachable", "unaudited")


@dataclass(frozen=True)
class Stored(QueueStats):
    """The metrics the database holds (copies by COPY_AUDITS)."""

    now: datetime = field(default_factory=lambda: datetime.now(UTC))  # when read
    queue_depth: int = 0  # queued jobs that are due
    queue_oldest: datetime | None = None  # since when the longest-waiting one is due
    schedules: list[Schedule] = field(default_factory=list)  # of the config in force

    @classmethod
    async def read(cls, store: Store, config: Config) -> Stored:
        now = datetime.now(UTC)
        stats = await store.stats()
        depth, oldest = await store.queue_depth(now)
        done = await store.last_success_by_schedule()
        seen = await store.schedules_first_seen()
        return cls(
            **stats.__dict__,
            now=now,
            queue_depth=depth,
            queue_oldest=oldest,
            schedules=[
                Schedule(name, period(schedule, now), done.get(name), seen.get(name))
                for name, schedule in sorted(config.schedules.items())
            ],
        )


@dataclass(frozen=True)
class Schedule:
    name: str
    period: float  # the longest gap between its slots, seconds
    last_success: datetime | None  # its last completed job (or slot skipped as unchanged)
    first_seen: datetime | None  # when a daemon first ran it (None: not yet)


@dataclass
class Metrics:
    transitions: Counter[str] = field(default_factory=Counter)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    phase_count: Counter[str] = field(default_factory=Counter)
    bytes_archived: int = 0
    reloads: Counter[str] = field(default_factory=Counter)

    def transition(self, to_state: State) -> None:
        self.transitions[to_state.value] += 1

    def step(self, state: State, seconds: float) -> None:
        self.phase_seconds[state.value] = self.phase_seconds.get(state.value, 0.0) + seconds
        self.phase_count[state.value] += 1

    def render(self, stored: Stored) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help}\n# TYPE {name} {kind}\n")
            out.extend(f"{name}{labels} {_number(value)}\n" for labels, value in samples)

        family(
            "archived_jobs",
            "gauge",
            "Jobs by state.",
            [(f'{{state="{s.value}"}}', stored.jobs_by_state.get(s.value, 0)) for s in State],
        )
        family(
            "archived_transitions_total",
            "counter",
            "Transitions into each state.",
            [(f'{{state="{s.value}"}}', self.transitions[s.value]) for s in State],
        )
        family(
            "archived_retries_total",
            "counter",
            "Phase errors that were retried.",
            [("", self.transitions[State.RECOVERABLE_ERROR.value])],
        )
        family(
            "archived_failures_total",
            "counter",
            "Jobs that failed.",
            [("", self.transitions[State.FAILED.value])],
        )
        family(
            "archived_bytes_archived_total",
            "counter",
            "Payload bytes of jobs that completed.",
            [("", self.bytes_archived)],
        )
        family(
            "archived_reloads_total",
            "counter",
            "Config reloads by result.",
            [(f'{{result="{r}"}}', self.reloads[r]) for r in ("ok", "rejected")],
        )
        family(
            "archived_audits_total",
            "counter",
            "Audit results of stored copies, from the daemon and the command line.",
            [(f'{{result="{r}"}}', stored.audits.get(r, 0)) for r in AUDIT_RESULTS],
        )
        family(
            "archived_copies",
            "gauge",
            "Stored copies of completed jobs by what their last audit found.",
            [(f'{{audit="{a}"}}', stored.copies.get(a, 0)) for a in COPY_AUDITS],
        )
        family(
            "archived_damaged_jobs",
            "gauge",
            "Completed jobs with a copy found damaged or lost and not repaired.",
            [("", stored.damaged_jobs)],
        )
        family(
            "archived_queue_depth",
            "gauge",
            "Queued jobs that are due (not waiting for their not_before).",
            [("", stored.queue_depth)],
        )
        oldest = stored.queue_oldest
        family(
            "archived_queue_oldest_seconds",
            "gauge",
            "How long the queued job waiting longest has been due; 0 when none waits.",
            [("", max((stored.now - oldest).total_seconds(), 0) if oldest else 0)],
        )

        def by_schedule(times: dict[str, datetime | None]) -> list[tuple[str, float]]:
            return [(_label("schedule", s), t.timestamp()) for s, t in times.items() if t]

        schedules = stored.schedules
        family(
            "archived_schedule_period_seconds",
            "gauge",
            "The longest gap between two slots of the schedule's cron.",
            [(_label("schedule", s.name), s.period) for s in schedules],
        )
        family(
            "archived_schedule_last_success_timestamp_seconds",
            "gauge",
            "When the schedule last completed a job (or skipped a slot as unchanged since).",
            by_schedule({s.name: s.last_success for s in schedules}),
        )
        family(
            "archived_schedule_first_seen_timestamp_seconds",
            "gauge",
            "When the schedule first appeared in a config the daemon ran on.",
            by_schedule({s.name: s.first_seen for s in schedules}),
        )
        family(
            "archived_metrics_written_timestamp_seconds",
            "gauge",
            "When the daemon wrote this file: a stale file means it stopped or is stuck.",
            [("", stored.now.timestamp())],
        )
        phases = sorted(self.phase_count)
        out.append(
            "# HELP archived_phase_duration_seconds Time spent in each state's step.\n"
            "# TYPE archived_phase_duration_seconds summary\n"
        )
        for p in phases:
            state = _label("state", p)
            seconds = _number(self.phase_seconds[p])
            out.append(f"archived_phase_duration_seconds_sum{state} {seconds}\n")
            out.append(f"archived_phase_duration_seconds_count{state} {self.phase_count[p]}\n")
        return "".join(out)


def _number(value: float) -> str:
    """A sample value in full: `:g` would keep six digits, and a byte count or a Unix
    time has more."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _label(name: str, value: str) -> str:
    """`{name="value"}`, escaped as the text format wants it."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'{{{name}="{escaped}"}}'


def write_textfile(path: Path, text: str) -> None:
    """Replace the file at `path` with `text`, readable by all: node_exporter runs as a
    user of its own, and the service's umask (0027) would keep it out."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
