"""Failure on purpose, for tests: ARCHIVED_FAILPOINTS="name=action,...".

Actions: `kill` (SIGKILL this process), `error` (a fatal error), `transient:N` (a
recoverable error the first N times the point is reached), and `delay:SECONDS` (wait
there, where the point is reached from the event loop: a slow step for tests of
cancellation, deadlines and shutdown). Unset, `hit()` is one dictionary lookup on an
empty dict.
"""

from __future__ import annotations

import os
import signal

import anyio

from .errors import ArchivedError, TransientError

NAMES = frozenset(
    {
        "activity_archiving",
        "activity_task",  # inside each activity task, once it runs
        "check_integrity",
        "calculate_checksums",
        "sign",
        "store",
        "store.after_rename",
        "cleanup",
    }
)


class FailpointError(ArchivedError):
    """A failpoint's `error` action: non-recoverable."""


def parse(spec: str) -> dict[str, tuple[str, int]]:
    points: dict[str, tuple[str, int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, action = item.partition("=")
        if not sep or name not in NAMES:
            raise ValueError(f"ARCHIVED_FAILPOINTS: unknown failpoint {item!r}")
        kind, _, count = action.partition(":")
        if kind in ("kill", "error") and not count:
            points[name] = (kind, 0)
        elif kind in ("transient", "delay") and count.isdigit():
            points[name] = (kind, int(count))
        else:
            raise ValueError(f"ARCHIVED_FAILPOINTS: bad action {action!r} for {name}")
    return points


_points = parse(os.environ.get("ARCHIVED_FAILPOINTS", ""))


async def reach(name: str) -> None:
    """`hit()` for the event loop, where `delay` sleeps without blocking it."""
    point = _points.get(name)
    if point is not None and point[0] == "delay":
        await anyio.sleep(point[1])
        return
    hit(name)


def hit(name: str) -> None:
    point = _points.get(name)
    if point is None or point[0] == "delay":
        return
    kind, remaining = point
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "error":
        raise FailpointError(f"failpoint {name}: injected error")
    if remaining > 0:
        _points[name] = (kind, remaining - 1)
        raise TransientError(f"failpoint {name}: injected transient error")
