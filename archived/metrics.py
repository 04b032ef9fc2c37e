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

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from .config import Config
from .fileio import atomic_file
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

    def registry(self, stored: Stored) -> CollectorRegistry:
        """A private registry (not the process-wide one) that yields these metrics."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self, stored))
        return registry

    def render(self, stored: Stored) -> str:
        """The text format of the metrics, as the textfile holds them."""
        return generate_latest(self.registry(stored)).decode("utf-8")

    def families(self, stored: Stored) -> Iterator[Metric]:
        def gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, help, value=value)

        def counter(name: str, help: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, help, value=value)

        def labelled(
            kind: type[GaugeMetricFamily] | type[CounterMetricFamily],
            name: str,
            help: str,
            label: str,
            values: Iterable[tuple[str, float]],
        ) -> Metric:
            family = kind(name, help, labels=[label])
            for value, sample in values:
                family.add_metric([value], sample)
            return family

        yield labelled(
            GaugeMetricFamily,
            "archived_jobs",
            "Jobs by state.",
            "state",
            ((s.value, stored.jobs_by_state.get(s.value, 0)) for s in State),
        )
        yield labelled(
            CounterMetricFamily,
            "archived_transitions_total",
            "Transitions into each state.",
            "state",
            ((s.value, self.transitions[s.value]) for s in State),
        )
        yield counter(
            "archived_retries_total",
            "Phase errors that were retried.",
            self.transitions[State.RECOVERABLE_ERROR.value],
        )
        yield counter(
            "archived_failures_total", "Jobs that failed.", self.transitions[State.FAILED.value]
        )
        yield counter(
            "archived_bytes_archived_total",
            "Payload bytes of jobs that completed.",
            self.bytes_archived,
        )
        yield labelled(
            CounterMetricFamily,
            "archived_reloads_total",
            "Config reloads by result.",
            "result",
            ((r, self.reloads[r]) for r in ("ok", "rejected")),
        )
        yield labelled(
            CounterMetricFamily,
            "archived_audits_total",
            "Audit results of stored copies, from the daemon and the command line.",
            "result",
            ((r, stored.audits.get(r, 0)) for r in AUDIT_RESULTS),
        )
        yield labelled(
            GaugeMetricFamily,
            "archived_copies",
            "Stored copies of completed jobs by what their last audit found.",
            "audit",
            ((a, stored.copies.get(a, 0)) for a in COPY_AUDITS),
        )
        yield gauge(
            "archived_damaged_jobs",
            "Completed jobs with a copy found damaged or lost and not repaired.",
            stored.damaged_jobs,
        )
        yield gauge(
            "archived_queue_depth",
            "Queued jobs that are due (not waiting for their not_before).",
            stored.queue_depth,
        )
        oldest = stored.queue_oldest
        yield gauge(
            "archived_queue_oldest_seconds",
            "How long the queued job waiting longest has been due; 0 when none waits.",
            max((stored.now - oldest).total_seconds(), 0) if oldest else 0,
        )
        schedules = stored.schedules
        yield labelled(
            GaugeMetricFamily,
            "archived_schedule_period_seconds",
            "The longest gap between two slots of the schedule's cron.",
            "schedule",
            ((s.name, s.period) for s in schedules),
        )
        yield labelled(
            GaugeMetricFamily,
            "archived_schedule_last_success_timestamp_seconds",
            "When the schedule last completed a job (or skipped a slot as unchanged since).",
            "schedule",
            ((s.name, s.last_success.timestamp()) for s in schedules if s.last_success),
        )
        yield labelled(
            GaugeMetricFamily,
            "archived_schedule_first_seen_timestamp_seconds",
            "When the schedule first appeared in a config the daemon ran on.",
            "schedule",
            ((s.name, s.first_seen.timestamp()) for s in schedules if s.first_seen),
        )
        yield gauge(
            "archived_metrics_written_timestamp_seconds",
            "When the daemon wrote this file: a stale file means it stopped or is stuck.",
            stored.now.timestamp(),
        )
        phases = SummaryMetricFamily(
            "archived_phase_duration_seconds", "Time spent in each state's step.", labels=["state"]
        )
        for p in sorted(self.phase_count):
            phases.add_metric([p], self.phase_count[p], self.phase_seconds[p])
        yield phases


class _Collector(Collector):
    def __init__(self, metrics: Metrics, stored: Stored) -> None:
        self.metrics, self.stored = metrics, stored

    def collect(self) -> Iterator[Metric]:
        return self.metrics.families(self.stored)


def write_textfile(path: Path, text: str) -> None:
    """Replace the file at `path` with `text`, readable by all: node_exporter runs as a
    user of its own, and the service's umask (0027) would keep it out. (Not
    prometheus_client's write_to_textfile: it creates the file with the umask's mode.)"""
    with atomic_file(path, 0o644, sync_dir=False) as f:
        f.write(text.encode("utf-8"))
