"""Progress, in process: the figures and the line of a job, and a large file moving them."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

from archived.artifacts import ArtifactWriter
from archived.progress import Figures, Report, clock, figures, line, size

MiB = 1024 * 1024
NOW = datetime(2026, 12, 1, 12, 0, 30, tzinfo=UTC)


def job(state: str, **extra: str) -> dict[str, str]:
    return {
        "state": state,
        "created_at": "2026-12-01T11:59:00Z",
        "started_at": "2026-12-01T12:00:00Z",
        **extra,
    }


def task(kind: str, state: str, result: dict[str, int] | None = None, report: Report | None = None):  # type: ignore[no-untyped-def]
    return {
        "kind": kind,
        "state": state,
        "result": json.dumps(result) if result else None,
        "progress": report.dumps() if report else None,
    }


def report(files: int, done: int, files_total: int | None, total: int | None) -> Report:
    return Report(files, done, files_total, total, "2026-12-01T12:00:10Z", "2026-12-01T12:00:20Z")


def test_the_line_of_a_job_in_each_phase() -> None:
    copying = [
        task("activity", "completed", {"files": 10, "bytes": 1 * MiB}),
        task("activity", "executing", report=report(1190, 3 * 1024 * MiB, 19990, 9 * 1024 * MiB)),
        task("storage", "created"),
    ]
    assert line(figures(job("activity_archiving"), copying, NOW)) == (
        "activity_archiving  1,200 of 20,000 files, 3.0 GiB of 9.0 GiB (33%), 307.2 MiB/s, 0:30"
    )
    # a program's output has no total: only what came so far
    unknown = [task("activity", "executing", report=report(0, 5 * MiB, None, None))]
    assert line(figures(job("activity_archiving"), unknown, NOW)) == (
        "activity_archiving  0 files, 5.0 MiB, 512.0 KiB/s, 0:30"
    )
    stored = [
        task("activity", "completed", {"files": 2, "bytes": 300_006}),
        task("storage", "completed"),
        task("storage", "executing"),
    ]
    assert line(figures(job("store"), stored, NOW)) == (
        "store  2 files, 293.0 KiB, stored on 1 of 2 targets, 0:30"
    )
    assert line(
        figures(job("queued", not_before="2999-01-01T00:00:00Z", started_at=""), [], NOW)
    ) == ("queued (not before 2999-01-01T00:00:00Z)  1:30")
    assert (
        line(Figures("completed", 3 * 3600 + 62, 3, None, 5, None))
        == "completed  3 files, 5 B, 3:01:02"
    )
    one = Figures("store", 5, 1, None, 13, None, stored=(0, 1))
    assert line(one) == "store  1 file, 13 B, stored on 0 of 1 target, 0:05"
    assert (size(1023), size(1024), size(5 * 1024**5)) == ("1023 B", "1.0 KiB", "5.0 PiB")
    assert clock(59.9) == "0:59"


def test_a_large_file_moves_the_figures_while_it_is_copied(tmp_path: Path) -> None:
    """Block by block, not once the file is in: a 10 GiB file would stall the line."""
    writer = ArtifactWriter(tmp_path / "a.tar", "bag", "a", tmp_path / "a.records")
    seen: list[int] = []

    class Source(io.RawIOBase):
        left = 5 * MiB

        def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
            seen.append(writer.moved)  # what progress would show as this block is read
            n = min(len(buffer), self.left)
            buffer[:n] = b"x" * n
            self.left -= n
            return n

    writer.start()
    try:
        writer.copy_from("big.bin", Source(), 5 * MiB, 0)
        writer.finish()
    finally:
        writer.close()
    assert seen == [0, 1 * MiB, 2 * MiB, 3 * MiB, 4 * MiB]
    assert (writer.moved, writer.total_bytes, writer.files) == (5 * MiB, 5 * MiB, 1)
