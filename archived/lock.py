"""One daemon per state directory: an exclusive flock on `state_dir/archived.lock`.

`archived submit --wait` looks at the lock to tell an operator at once that no
daemon is there to take the job. Looking means taking a shared lock for an instant,
so a daemon that starts in that instant tries again for a moment before it gives up.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import IO

from .errors import ArchivedError

LOCK_NAME = "archived.lock"
_TRIES = 20  # 50 ms apart: a second, far longer than anyone looks at the lock


class AlreadyRunning(ArchivedError):
    pass


def lock_state_dir(state_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the state directory for the life of the process."""
    state_dir.mkdir(parents=True, exist_ok=True)
    handle = open(state_dir / LOCK_NAME, "a+")  # noqa: SIM115
    for attempt in range(_TRIES):
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == _TRIES - 1:
                handle.close()
                raise AlreadyRunning(f"another archived daemon is running on {state_dir}") from None
            time.sleep(0.05)  # maybe only a `submit --wait` looking at it
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def daemon_running(state_dir: Path) -> bool:
    """Whether a daemon holds the state directory's lock now."""
    try:
        fd = os.open(state_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # no daemon ever ran here
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and with it the shared lock, if it was taken
    return False
