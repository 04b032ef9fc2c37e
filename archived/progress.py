"""How far a job has come: the figures, and the one line `archived show` and
`archived submit --wait` print of them.

While an activity task runs, the runner writes its `Report` to the task's row every
second: the files and payload bytes taken in so far, a file under way counted block by
block (so a single 10 GiB file moves the line too), against the totals its driver knew
before it began (a `files` tree is counted by the walk the staging space check makes
anyway; a program's output has no total), and when the attempt began. Everything here
is pure: rows in, figures and text out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


@dataclass(frozen=True)
class Report:
    """What one running activity task says of itself."""

    files: int
    bytes: int
    files_total: int | None
    bytes_total: int | None
    since: str  # when this attempt of the task began, ISO 8601
    at: str  # when this was said

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, text: str | None) -> Report | None:
        """The report in a task's row; None for none (or one this version cannot read)."""
        try:
            return cls(**json.loads(text)) if text else None
        except (ValueError, TypeError):
            return None


@dataclass(frozen=True)
class Figures:
    state: str
    elapsed: float  # seconds since the job started (since it was made, before that)
    files: int | None = None  # payload files taken in, when any activity said
    files_total: int | None = None  # where every activity knows its total
    bytes: int | None = None
    bytes_total: int | None = None
    rate: float | None = None  # payload bytes a second of the activities running now
    stored: tuple[int, int] | None = None  # in `store`: targets done, of how many
    not_before: str | None = None  # a queued job waiting for its time


def _seconds(later: str, earlier: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


def figures(job: Mapping[str, Any], tasks: Sequence[Mapping[str, Any]], now: datetime) -> Figures:
    """The figures of `job` (its row) and its `tasks` (rows with kind, state, result and
    progress, `result` as a JSON string or parsed) at `now`."""
    started = job.get("started_at") or job["created_at"]
    elapsed = max((now - datetime.fromisoformat(started)).total_seconds(), 0.0)
    state = str(job["state"])
    done: list[tuple[int, int, int | None, int | None]] = []
    rate = 0.0
    running = False
    for task in tasks:
        if task["kind"] != "activity":
            continue
        result = task.get("result")
        if isinstance(result, str):
            result = json.loads(result)
        report = Report.loads(task.get("progress")) if task["state"] == "executing" else None
        if task["state"] == "completed" and result and "files" in result:
            done.append((result["files"], result["bytes"], result["files"], result["bytes"]))
        elif report is not None:
            done.append((report.files, report.bytes, report.files_total, report.bytes_total))
            if (took := _seconds(report.at, report.since)) > 0:
                rate += report.bytes / took
                running = True
        else:
            done.append((0, 0, None, None))
    storage = [t for t in tasks if t["kind"] == "storage"]
    stored = sum(t["state"] == "completed" for t in storage)
    said = any(d[0] or d[1] or d[2] is not None for d in done)
    return Figures(
        state=state,
        elapsed=elapsed,
        files=sum(d[0] for d in done) if said else None,
        files_total=_total(d[2] for d in done) if said else None,
        bytes=sum(d[1] for d in done) if said else None,
        bytes_total=_total(d[3] for d in done) if said else None,
        rate=rate if running and state == "activity_archiving" else None,
        stored=(stored, len(storage)) if state == "store" and storage else None,
        not_before=job.get("not_before") if state == "queued" else None,
    )


def _total(values: Any) -> int | None:
    known = list(values)
    return None if any(v is None for v in known) else sum(known)


def size(n: float) -> str:
    """Bytes the way people read them: 512 B, 3.2 MiB, 10.0 GiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in UNITS:
        n /= 1024
        if n < 1024 or unit == UNITS[-1]:
            break
    return f"{n:.1f} {unit}"


def count(n: int, thing: str) -> str:
    """`1 file`, `20,000 files`."""
    return f"{n:,} {thing}" if n == 1 else f"{n:,} {thing}s"


def clock(seconds: float) -> str:
    """Elapsed time as 0:07, 12:34 or 2:03:04."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


def line(f: Figures) -> str:
    """One line of figures, e.g. `activity_archiving  1,204 of 20,000 files, 3.2 GiB
    of 10.0 GiB (32%), 105.3 MiB/s, 0:31`."""
    parts = []
    if f.files is not None and f.bytes is not None:
        if f.state == "activity_archiving":
            parts.append(amounts(f.files, f.files_total, f.bytes, f.bytes_total))
        else:
            parts.append(f"{count(f.files, 'file')}, {size(f.bytes)}")
    if f.rate is not None:
        parts.append(f"{size(f.rate)}/s")
    if f.stored is not None:
        parts.append(f"stored on {f.stored[0]} of {count(f.stored[1], 'target')}")
    parts.append(clock(f.elapsed))
    state = f"{f.state} (not before {f.not_before})" if f.not_before else f.state
    return f"{state}  " + ", ".join(parts)


def amounts(files: int, files_total: int | None, done: int, total: int | None) -> str:
    """`1,204 of 20,000 files, 3.2 GiB of 10.0 GiB (32%)`; without the totals not known."""
    if files_total is None:
        text = count(files, "file")
    else:
        text = f"{files:,} of {count(files_total, 'file')}"
    text += f", {size(done)}" + (f" of {size(total)}" if total is not None else "")
    if total:
        text += f" ({min(100, 100 * done // total)}%)"
    elif files_total:
        text += f" ({min(100, 100 * files // files_total)}%)"
    return text
