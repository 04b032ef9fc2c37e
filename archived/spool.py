"""The spool directory: tmp/ incoming/ active/ corrupt/.

Writers (`archived submit`, cron, scripts) put a finished file into incoming/ by
renaming it there. The daemon claims a file by renaming it into active/ under a
name that carries its job id, inserts the job, then removes the file. A crash at
any point leaves the file in incoming/ or active/, and a file whose job is already
in the database is recognised by id and digest, so it never makes a second job.

Any name a file system allows must be taken: a name too long to carry the job id
in active/, or a `.reason` beside it in corrupt/, is shortened in the middle (its
end, which says the format, is kept), and the original goes into the `.reason`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .fileio import atomic_file

# anyio (and with it asyncio) is imported in the daemon's methods below, not here:
# `archived submit` uses this module too, and an operator's shell waits for it to start.

T = TypeVar("T")
SUBDIRS = ("tmp", "incoming", "active", "corrupt")
_SUBMITTED = re.compile(r"^(?P<id>[0-9a-f]{12})\.(?:toml|json)$")
_ACTIVE = re.compile(r"^(?P<id>[0-9a-f]{12})__(?P<name>.+)$", re.DOTALL)
NAME_MAX = 255  # bytes in one file name, on every file system a spool is likely to be on
_TAGGED = len("0123456789ab__")  # a job id and two underscores before a name
_REASON = ".reason"


def new_job_id() -> str:
    return secrets.token_hex(6)


def submitted_id(name: str) -> str | None:
    """The job id an `archived submit`'s file name carries (`<id>.toml`), or None."""
    match = _SUBMITTED.match(name)
    return match["id"] if match else None


def fit(name: str, limit: int) -> str:
    """`name`, or if it is longer than `limit` bytes, its start and end joined by `~`."""
    if len(os.fsencode(name)) <= limit:
        return name
    tail = name[-32:]
    while len(os.fsencode(tail)) > limit // 2:
        tail = tail[1:]
    head = name[: limit - len(os.fsencode(tail)) - 1]
    while len(os.fsencode(f"{head}~{tail}")) > limit:
        head = head[:-1]
    return f"{head}~{tail}"


def printable(name: str) -> str:
    """A file name for a log or a .reason line: bad bytes and control characters escaped."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


@dataclass(frozen=True)
class Claimed:
    """A spool entry in active/ with the job id it was given (or one still in incoming/,
    when claiming it failed)."""

    path: Path
    job_id: str
    original_name: str


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp, self.incoming = root / "tmp", root / "incoming"
        self.active, self.corrupt = root / "active", root / "corrupt"

    def create(self) -> None:
        for name in SUBDIRS:
            (self.root / name).mkdir(parents=True, exist_ok=True)

    async def pending(self) -> list[str]:
        """Names in incoming/, oldest first; hidden names (being written) are left alone."""
        import anyio

        return await anyio.to_thread.run_sync(_oldest_first, self.incoming)  # one trip

    async def leftovers(self) -> list[Claimed]:
        """Files a crashed daemon had claimed but not finished with, oldest first (as
        they came in: a claim keeps a file's time; a batch of them may be left)."""
        import anyio

        found = []
        # of one time, by the name they came in under (their job ids are random)
        for name in await anyio.to_thread.run_sync(_oldest_first, self.active, _came_as):
            if match := _ACTIVE.match(name):
                found.append(Claimed(self.active / name, match["id"], match["name"]))
        return found

    def claim(self, name: str) -> Claimed | None:
        """Move incoming/NAME into active/ under its job id; None if it vanished. Blocking:
        intake claims a batch of entries in one trip to a thread."""
        job_id = submitted_id(name) or new_job_id()
        target = self.active / f"{job_id}__{fit(name, NAME_MAX - _TAGGED)}"
        try:
            self._again_without_folders(os.rename, self.incoming / name, target)
        except FileNotFoundError:
            return None
        return Claimed(target, job_id, name)

    async def done(self, *claimed: Claimed) -> None:
        """The entries' jobs are in the queue: their files are spent. One trip."""
        import anyio

        def unlink() -> None:
            for entry in claimed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

        await anyio.to_thread.run_sync(unlink)

    def _again_without_folders(self, move: Callable[..., T], source: Path, *args: Any) -> T:
        """`move(source, ...)`; when it fails with ENOENT although `source` is there, one
        of the spool's folders was removed under the daemon: make them again, try once more.
        Blocking: for a worker thread."""
        try:
            return move(source, *args)
        except FileNotFoundError:
            if not os.path.lexists(source):
                raise
        self.create()
        return move(source, *args)

    async def reject(self, entry: Claimed, reason: str) -> Path:
        """Move the entry, unchanged, to corrupt/ beside a .reason file; returns its path.

        `entry` is in active/, or still in incoming/ if even claiming it failed. One trip
        to a thread.
        """
        import anyio

        return await anyio.to_thread.run_sync(
            self._again_without_folders, self._reject, entry.path, entry, reason
        )

    def _reject(self, _path: Path, entry: Claimed, reason: str) -> Path:
        room = NAME_MAX - len(_REASON)
        name = fit(entry.original_name, room)
        target = self.corrupt / name
        if os.path.lexists(target) or os.path.lexists(_reason_path(target)):
            target = self.corrupt / f"{entry.job_id}__{fit(entry.original_name, room - _TAGGED)}"
        text = reason.rstrip("\n") + "\n"
        if target.name != entry.original_name:
            text += f"original name: {printable(entry.original_name)}\n"
        reason_path = _reason_path(target)
        part = self.tmp / f".reason-{secrets.token_hex(6)}"
        try:
            _write_reason(reason_path, text, part)
            os.rename(entry.path, target)
        except BaseException:
            for path in (part, reason_path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        return target

    def submit(self, data: bytes, suffix: str) -> str:
        """Drop a validated job file into incoming/ atomically; returns its job id."""
        job_id = new_job_id()
        name = f"{job_id}{suffix}"
        with atomic_file(self.incoming / name, 0o640, tmp=self.tmp / name) as f:
            f.write(data)
        return job_id


def _came_as(name: str) -> str:
    """An active/ entry's name as it came into incoming/ (without its job id)."""
    match = _ACTIVE.match(name)
    return match["name"] if match else name


def _oldest_first(folder: Path, key: Callable[[str], str] = lambda name: name) -> list[str]:
    """The names in `folder` but hidden ones (being written) and folders (an operator's),
    oldest first (by modification time, then `key(name)`, then name)."""
    stamped = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError:  # claiming it will meet the error, and deal with it
                stamped.append((0, key(entry.name), entry.name))
                continue
            if stat.S_ISDIR(st.st_mode):
                continue
            stamped.append((st.st_mtime_ns, key(entry.name), entry.name))
    return [name for _, _, name in sorted(stamped)]


def _write_reason(path: Path, text: str, tmp: Path) -> None:
    with atomic_file(path, 0o640, tmp=tmp) as f:
        f.write(text.encode("utf-8", "backslashreplace"))


def _reason_path(target: Path) -> Path:
    return target.with_name(target.name + _REASON)
