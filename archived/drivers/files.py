"""Activity driver `files`: a directory tree (or one file) below `sources.allowed_roots`.

The walk goes through directory file descriptors with O_NOFOLLOW, so neither a
symlink in the tree nor one swapped in during the walk can lead outside the root.
Symlinks are skipped and named in the event log (a BagIt manifest cannot express a
link); FIFOs, sockets and devices are skipped the same way and never opened for long.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread

from ..artifacts import SMALL_FILE, ArtifactWriter, SourceChanged, member_bytes
from ..config import Config
from ..errors import JobFileError, SourceError, TransientError
from .base import ActivityContext, ActivityDriver, DriverOptions, Estimate

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class FilesOptions(DriverOptions):
    path: Path
    exclude: list[str] = []
    allow_empty: bool = False  # a source with no file to archive is an error unless set


def allowed_root(path: Path, config: Config) -> Path | None:
    """The allowed root that `path` really lies under, symlinks resolved, or None."""
    real = Path(os.path.realpath(path))
    for root in config.sources.allowed_roots:
        real_root = Path(os.path.realpath(root))
        if real == real_root or real.is_relative_to(real_root):
            return real_root
    return None


def check_under_roots(path: Path, config: Config) -> None:
    """JobFileError unless `path` is absolute and really lies under an allowed root."""
    if not path.is_absolute():
        raise JobFileError(f"path {str(path)!r} must be absolute")
    if allowed_root(path, config) is None:
        roots = ", ".join(str(r) for r in config.sources.allowed_roots) or "none configured"
        raise JobFileError(f"path {path} is outside sources.allowed_roots ({roots})")


class FilesDriver(ActivityDriver):
    Options = FilesOptions
    opts: FilesOptions
    excluded = 0  # entries left out by `exclude`, counted by the walk

    @classmethod
    def check(cls, options: Any, config: Config) -> None:
        check_under_roots(options.path, config)

    async def run(self, ctx: ActivityContext) -> dict[str, Any]:
        return await self.checked_in_thread(ctx, lambda: self._copy(ctx.writer, ctx.notes))

    def fingerprint(self) -> list[str]:
        return tree_lines(self.name, self.opts.path)

    def estimate(self, member_prefix: str) -> Estimate:
        """The tree's regular files at their full size (a sparse file becomes all of it),
        as tar members with their records; and how many files of how many bytes, for
        progress. One stat a file, before the copy: kept lean."""
        source = Path(os.path.realpath(self.opts.path))
        try:
            st = os.lstat(source)
        except OSError:
            return Estimate(0)  # `run` says what is wrong with it
        if stat.S_ISREG(st.st_mode):
            return Estimate(member_bytes(member_prefix + source.name, st.st_size), 1, st.st_size)
        excluded = self._excluded if self.opts.exclude else None
        check_cancelled = anyio.from_thread.check_cancelled
        total, files, payload, pending = 0, 0, 0, [(str(source), "")]
        while pending:
            directory, prefix = pending.pop()
            check_cancelled()
            try:
                it = os.scandir(directory)
            except OSError:
                continue
            with it:
                for entry in it:
                    relpath = prefix + entry.name
                    if excluded is not None and excluded(relpath):
                        continue
                    try:
                        if entry.is_file(follow_symlinks=False):
                            size = entry.stat(follow_symlinks=False).st_size
                            total += member_bytes(member_prefix + relpath, size)
                            files += 1
                            payload += size
                        elif entry.is_dir(follow_symlinks=False):
                            pending.append((entry.path, relpath + "/"))
                    except OSError:
                        continue  # gone meanwhile: `run` sees what is there
        return Estimate(total, files, payload)

    def _copy(self, writer: ArtifactWriter, notes: list[str]) -> dict[str, Any]:
        source = Path(os.path.realpath(self.opts.path))
        writer.start()
        skipped = 0
        try:
            fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise SourceError(f"source {self.opts.path} does not exist") from None
        except PermissionError:
            raise SourceError(f"source {self.opts.path}: permission denied") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                skipped = self._walk(fd, "", writer, notes)
            elif stat.S_ISREG(st.st_mode):
                self._copy_file(fd, st, source.name, writer)
            else:
                raise SourceError(f"source {self.opts.path} is neither a directory nor a file")
        finally:
            os.close(fd)
        if writer.files == 0 and not self.opts.allow_empty:
            why = [f"{self.excluded} excluded"] if self.excluded else []
            why += [f"{skipped} skipped (not regular files)"] if skipped else []
            raise SourceError(
                f"nothing to archive in {self.opts.path}: "
                f"{', '.join(why) if why else 'it holds no files'}; "
                "set allow_empty = true in the activity if that is fine"
            )
        return {**writer.finish(), "skipped": skipped}

    def _excluded(self, relpath: str) -> bool:
        name = relpath.rsplit("/", 1)[-1]
        return any(
            fnmatch.fnmatchcase(relpath, pattern) or fnmatch.fnmatchcase(name, pattern)
            for pattern in self.opts.exclude
        )

    def _walk(self, dir_fd: int, prefix: str, writer: ArtifactWriter, notes: list[str]) -> int:
        skipped = 0
        with os.scandir(dir_fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        check_cancelled = anyio.from_thread.check_cancelled
        excluded = self._excluded if self.opts.exclude else None
        for entry in entries:  # most common kind first: this loop runs once a file
            check_cancelled()
            relpath = prefix + entry.name
            if not relpath.isascii():
                self._check_name(relpath)
            if excluded is not None and excluded(relpath):
                self.excluded += 1
                continue
            if entry.is_file(follow_symlinks=False):
                fd = self._open(entry.name, dir_fd, _FILE_FLAGS, relpath)
                try:
                    st = os.fstat(fd)
                    if stat.S_ISREG(st.st_mode):
                        self._copy_file(fd, st, relpath, writer)
                finally:
                    os.close(fd)
            elif entry.is_dir(follow_symlinks=False):
                child = self._open(entry.name, dir_fd, _DIR_FLAGS, relpath)
                try:
                    skipped += self._walk(child, relpath + "/", writer, notes)
                finally:
                    os.close(child)
            elif entry.is_symlink():
                notes.append(f"skipped symlink {relpath}")
                skipped += 1
            else:
                notes.append(f"skipped special file {relpath}")
                skipped += 1
        return skipped

    def _check_name(self, relpath: str) -> None:
        try:
            relpath.encode("utf-8")
        except UnicodeEncodeError:
            raise SourceError(
                f"{self.opts.path}/{relpath!r}: file name is not UTF-8; rename it or exclude it"
            ) from None

    def _open(self, name: str, dir_fd: int, flags: int, relpath: str) -> int:
        try:
            return os.open(name, flags, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                raise TransientError(f"{relpath} changed while being archived") from None
            if exc.errno == errno.EACCES:
                raise SourceError(f"{self.opts.path}/{relpath}: permission denied") from None
            raise

    def _copy_file(
        self, fd: int, before: os.stat_result, relpath: str, writer: ArtifactWriter
    ) -> None:
        if before.st_size <= SMALL_FILE:  # read whole: nothing reaches the fragment unchecked
            data = _read_whole(fd, before.st_size)
            # a file that grew or shrank meanwhile has a new size or mtime
            if len(data) == before.st_size and _unchanged(before, os.fstat(fd)):
                writer.add(relpath, data, before.st_mtime)
                return
        else:
            with os.fdopen(os.dup(fd), "rb", buffering=0) as source:
                writer.copy_from(relpath, source, before.st_size, before.st_mtime)
            if _unchanged(before, os.fstat(fd)):
                return
        raise SourceChanged(f"{relpath} changed while being archived")


def _unchanged(before: os.stat_result, after: os.stat_result) -> bool:
    return before.st_size == after.st_size and before.st_mtime_ns == after.st_mtime_ns


def _read_whole(fd: int, size: int) -> bytes:
    """Up to `size` bytes from `fd`: one read for a regular file, unless it shrank."""
    data = os.read(fd, size)
    while len(data) < size and (more := os.read(fd, size - len(data))):
        data += more
    return data


def tree_lines(activity: str, root: Path) -> list[str]:
    """Each file under `root`: its path, size and mtime, in a stable order."""
    lines = []
    for top, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            rel = os.path.relpath(path, root)
            lines.append(f"{activity}\0{rel}\0{st.st_size}\0{st.st_mtime_ns}")
    return lines
