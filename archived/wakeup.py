"""Wake the poll loop as soon as a job file lands in the spool (Linux inotify).

Polling stays the rule (`daemon.poll_interval`): for spools on file systems that
send no inotify events (NFS, some FUSE mounts) and for everything else the loop
looks at. This only ends the wait early, so a submitted job starts at once.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

import anyio

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080


class SpoolWatch:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, directory: Path) -> SpoolWatch | None:
        """A watch on `directory`, or None where inotify is not to be had."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError):
            return None
        if fd < 0:
            return None
        if libc.inotify_add_watch(fd, os.fsencode(directory), IN_MOVED_TO | IN_CLOSE_WRITE) < 0:
            os.close(fd)
            return None
        return cls(fd)

    async def run(self, wake: Callable[[], None]) -> None:
        """Call `wake()` after each batch of events, until cancelled; then close."""
        try:
            while True:
                await anyio.wait_readable(self.fd)
                try:
                    os.read(self.fd, 64 * 1024)  # the events themselves do not matter
                except BlockingIOError:
                    continue
                wake()
        finally:
            os.close(self.fd)
