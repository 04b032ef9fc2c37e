"""Programs archived starts (`command` activities, the failure hook), and how they stop.

Each runs in a session of its own, so stopping it stops everything it started: its
process group gets SIGTERM, then SIGKILL after `STOP_GRACE` seconds. Whenever a
program ends, even on its own, its group is killed, so nothing it left behind
outlives it. The leader is reaped only after that: until then its pid, which is the
group's id, cannot be given to another process, so the kill never hits a stranger.

The calls block; run them in a worker thread, and pass a `check` that raises to stop
(`anyio.from_thread.check_cancelled`): cancelling the task then stops the program.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO

from . import cpus

STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
STDERR_LIMIT = 64 * 1024  # the tail of a program's stderr that is kept
_POLL = 0.1  # how often a wait looks at the program and at `check`
_live: set[int] = set()  # process groups not yet killed, for `kill_all()`


def _never() -> None:
    pass


class Child:
    """One program in its own session; stdin closed, stderr's tail kept."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: dict[str, str],
        cwd: Path | None = None,
        capture_stdout: bool = False,
    ) -> None:
        with cpus.everywhere():  # the program inherits it: all the CPUs, not ours
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        _live.add(self.proc.pid)
        self._tail: deque[bytes] = deque()
        self._drain = threading.Thread(target=self._keep_tail, daemon=True)
        self._drain.start()

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    def exited(self) -> bool:
        """Whether the program has ended; it is not reaped here (see the module doc)."""
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        try:
            return os.waitid(os.P_PID, self.proc.pid, flags) is not None
        except ChildProcessError:
            return True  # reaped already

    def wait(self, deadline: float, check: Callable[[], None] = _never) -> bool:
        """True once the program has ended; False if `deadline` (monotonic) came first."""
        while not self.exited():
            check()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, _POLL))
        return True

    def stop(self) -> int:
        """End the program, at once, and all it started; returns its exit status
        (negative: the signal that ended it)."""
        if not self.exited():
            _signal_group(self.proc.pid, signal.SIGTERM)
            self.wait(time.monotonic() + STOP_GRACE)
        _signal_group(self.proc.pid, signal.SIGKILL)  # what is left: stubborn, or orphaned
        _live.discard(self.proc.pid)
        code = self.proc.wait()
        self._drain.join(1.0)  # the group is gone, and with it every writer of stderr
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def stderr(self) -> str:
        """The last `STDERR_LIMIT` bytes of its stderr, once it has stopped."""
        return b"".join(self._tail).decode("utf-8", errors="replace")

    def _keep_tail(self) -> None:
        stream, size = self.proc.stderr, 0
        assert stream is not None
        for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
            self._tail.append(chunk)
            size += len(chunk)
            while size - len(self._tail[0]) >= STDERR_LIMIT:
                size -= len(self._tail.popleft())
        stream.close()


def run(
    argv: list[str], *, env: dict[str, str], timeout: float, check: Callable[[], None] = _never
) -> tuple[int | None, str]:
    """Run a program to its end, at most `timeout` seconds: its exit status (None if it
    timed out) and its stderr's tail. OSError if it cannot be started."""
    child = Child(argv, env=env)
    try:
        ended = child.wait(time.monotonic() + timeout, check)
    finally:
        code = child.stop()
    return (code if ended else None), child.stderr()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def kill_all() -> None:
    """SIGKILL every program still running, for a daemon that must exit at once."""
    for pgid in list(_live):
        _signal_group(pgid, signal.SIGKILL)
