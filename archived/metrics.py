"""Prometheus text format for node_exporter's textfile collector.

Counters of what this daemon did live in memory (a restart resets them, which
Prometheus' rate() handles). What the database knows is read from it each time the
file is written: jobs by state, stored copies by their last audit, and audit results,
which the command line's `archived audit` records there as much as the daemon. The
file is replaced atomically, so the collector never reads half of it.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .states import State
from .store import Store

AUDIT_RESULTS = ("ok", "missing", "damaged", "repaired", "unrepaired", "unreachable")
COPY_AUDITS = ("ok", "damaged", "unreachable", "unaudited")


@dataclass
class Stored:
    """The metrics the database holds."""

    jobs_by_state: dict[str, int]
    audits: dict[str, int]  # audit results ever, daemon and command line alike
    copies: dict[str, int]  # live copies of completed jobs by COPY_AUDITS
    damaged_jobs: int  # completed jobs with a copy found bad and not repaired

    @classmethod
    async def read(cls, store: Store) -> Stored:
        damaged = await store.fetchone("damaged_jobs")
        return cls(
            jobs_by_state={r["state"]: r["n"] for r in await store.fetchall("count_by_state")},
            audits={r["result"]: r["count"] for r in await store.fetchall("audit_totals")},
            copies={r["audit"]: r["n"] for r in await store.fetchall("copies_by_audit")},
            damaged_jobs=damaged["n"] if damaged else 0,
        )


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
            out.extend(f"{name}{labels} {value:g}\n" for labels, value in samples)

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
        phases = sorted(self.phase_count)
        out.append(
            "# HELP archived_phase_duration_seconds Time spent in each state's step.\n"
            "# TYPE archived_phase_duration_seconds summary\n"
        )
        for p in phases:
            out.append(
                f'archived_phase_duration_seconds_sum{{state="{p}"}} {self.phase_seconds[p]:g}\n'
            )
            out.append(
                f'archived_phase_duration_seconds_count{{state="{p}"}} {self.phase_count[p]}\n'
            )
        return "".join(out)


def write_textfile(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
