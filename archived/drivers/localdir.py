"""Storage driver `localdir`: archives as files in a local (or mounted) directory.

Write to a temporary name; read that copy back and match its digest while fsync
puts it on disk (the read-back comes from the page cache, so the two overlap);
then rename and fsync the directory. Only verified, durable archives ever carry a
final name; the temporary names start with `.archived-tmp-` and are removed on
failure.

A root that is not there (an unmounted disk, a network file system gone away) is
`TargetUnavailable`: jobs wait for it, and nothing is written elsewhere. With
`require_marker`, a root without the marker file `archived init-target` writes counts
as not there either: an empty mount point is a writable directory on the wrong disk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import anyio

from .. import failpoints
from ..errors import ConfigError, StorageError, TargetUnavailable, classify
from ..fileio import (
    NotRegularFile,
    Parts,
    atomic_file,
    copy_parts,
    file_sha256,
    fsync_dir,
    require_space,
)
from .base import NO_LOCK, Digest, DriverOptions, Lock, StorageDriver, StoredCopy, copy_problem

TMP_PREFIX = ".archived-tmp-"
_TOKEN_BYTES = 6  # a temporary name's random part: twice as many hex digits
# fsync of a copy runs here while the copy is read back. Shared and long-lived: a pool
# made per copy started and joined a thread for each, ~0.3 ms of a tiny job's ~30 ms.
# Threads are made only when all are busy; the bound is high because an fsync on a
# dead hard-mounted NFS target never returns, and must not hold up the others.
_SYNCER = ThreadPoolExecutor(256, thread_name_prefix="archived-fsync")
MARKER = ".archived-target"  # in a target's root: "this is the target, not a mount point"
# errors of a root that is there no more, beyond the recoverable ones
_GONE = frozenset({errno.ENOENT, errno.ENOTCONN, errno.EHOSTDOWN, errno.ENODEV, errno.ENXIO})
# What a network file system answers when its server is gone, not the file.
NETWORK_GONE = frozenset({errno.ENOTCONN, errno.ESTALE, errno.EHOSTDOWN})


class LocalDirOptions(DriverOptions):
    path: Path
    create: bool = False  # make the directory (and its marker) if missing: a plain folder
    require_marker: bool = False  # store only where `archived init-target NAME` marked it


def _tmp_name(final: Path) -> Path:
    """Where `final` is written before it is renamed into place (see _discard_partial)."""
    return final.parent / f"{TMP_PREFIX}{secrets.token_hex(_TOKEN_BYTES)}-{final.name}"


class LocalDirDriver(StorageDriver):
    Options = LocalDirOptions
    opts: LocalDirOptions

    @property
    def root(self) -> Path:
        return self.opts.path

    @property
    def local_root(self) -> Path:
        return self.opts.path

    async def ready(self) -> None:
        await anyio.to_thread.run_sync(self._ready)

    def _ready(self) -> None:
        root = self._usable_root()
        if not os.access(root, os.W_OK | os.X_OK):
            if os.statvfs(root).f_flag & os.ST_RDONLY:
                raise TargetUnavailable(f"storage.{self.target}: {root} is read-only")
            raise ConfigError(f"storage.{self.target}: {root} is not writable")

    def _usable_root(self) -> Path:
        """The root, made first with `create`; TargetUnavailable if it is not there (or
        not marked, where a marker is required), ConfigError if it is not a directory."""
        root = self.root
        if self.opts.create:
            root.mkdir(parents=True, exist_ok=True)
            if not (root / MARKER).exists():
                self._mark()
        try:
            mode = os.stat(root).st_mode
        except OSError as exc:
            if exc.errno in _GONE or classify(exc) == "recoverable":
                raise TargetUnavailable(
                    f"storage.{self.target}: {root}: {exc.strerror} (not mounted?)"
                ) from exc
            raise ConfigError(f"storage.{self.target}: {root}: {exc.strerror}") from exc
        if not stat.S_ISDIR(mode):
            raise ConfigError(f"storage.{self.target}: {root} is not a directory")
        if self.opts.require_marker and not (root / MARKER).is_file():
            raise TargetUnavailable(
                f"storage.{self.target}: {root} has no {MARKER} (not mounted? on the real "
                f"target, `archived init-target {self.target}` writes it once)"
            )
        return root

    async def mark(self) -> str:
        return await anyio.to_thread.run_sync(self._mark)

    def _mark(self) -> str:
        root = self.root
        if not root.is_dir():
            raise ConfigError(
                f"storage.{self.target}: {root} is not a directory: mount the disk and make "
                "the directory first"
            )
        marker = root / MARKER
        if marker.is_file():
            return f"storage.{self.target}: {root} is already marked"
        text = (
            "# archived: this directory is a storage target. Archives are stored here only\n"
            "# while this file exists, so an empty mount point is never taken for the target.\n"
            f'target = "{self.target}"\n'
        )
        with atomic_file(marker, 0o444, tmp=_tmp_name(marker)) as f:
            f.write(text.encode())
        return f"storage.{self.target}: marked {root} ({MARKER})"

    async def put(
        self, archive: Parts, key: str, digest: Digest, size: int, lock: Lock = NO_LOCK
    ) -> StoredCopy:
        # `lock`: a local file system has no retention dates; copies are read-only files
        return await anyio.to_thread.run_sync(self._put, archive, key, digest, size)

    def _put(self, archive: Parts, key: str, digest: Digest, size: int) -> StoredCopy:
        final = self.root / key
        try:
            self._usable_root()
            final.parent.mkdir(exist_ok=True)
            with contextlib.suppress(FileNotFoundError, NotRegularFile):  # else replaced
                if file_sha256(final) == (digest.result(), size):
                    return StoredCopy(str(final), size, digest.result())  # an earlier try's
            self._discard_partial(final)
            require_space(final.parent, size, f"storage.{self.target}")
            self._write(archive, final, digest, size)
            failpoints.hit("store.after_rename")
        except OSError as exc:
            self._usable_root()  # the root went away under the write: wait for it
            raise StorageError(
                f"storage.{self.target}: {exc.strerror or exc}: {exc.filename or final}",
                recoverable=classify(exc) == "recoverable",
            ) from exc
        return StoredCopy(str(final), size, digest.result())

    async def check(self, key: str, sha256: str, size: int) -> str | None:
        return await anyio.to_thread.run_sync(self._check, key, sha256, size)

    def _check(self, key: str, sha256: str, size: int) -> str | None:
        """A copy is only missing, damaged or unreadable if its target is there: a root
        that is gone (an unmounted disk, a dead file server) makes it unreachable."""
        path = self.root / key
        got: tuple[str, int] | None = None
        try:
            got = file_sha256(path)
        except FileNotFoundError:
            pass
        except NotRegularFile:
            return f"damaged: {path} is not a regular file"
        except OSError as exc:
            if gone := self._unreachable():
                return gone
            if exc.errno in NETWORK_GONE:
                return f"unreachable: {path}: {exc.strerror}"
            return f"unreadable: {path}: {exc.strerror}"  # EIO on one file: a bad block
        if got is None and (gone := self._unreachable()):
            return gone
        return copy_problem(str(path), got, sha256, size)

    def _unreachable(self) -> str | None:
        """Why the target's root cannot be reached, or None if it can."""
        try:
            st = os.stat(self.root)
        except OSError as exc:
            return f"unreachable: {self.root}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"unreachable: {self.root} is not a directory"
        if self.opts.require_marker and not (self.root / MARKER).is_file():
            return f"unreachable: {self.root} has no {MARKER} (not mounted?)"
        return None

    async def fetch(self, key: str, dest: Path) -> None:
        def copy() -> None:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                copy_parts([self.root / key], fd)
            finally:
                os.close(fd)

        await anyio.to_thread.run_sync(copy)

    async def delete(self, key: str) -> bool:
        return await anyio.to_thread.run_sync(self._delete, self.root / key)

    def _delete(self, final: Path) -> bool:
        self._usable_root()  # an unmounted disk is not "already deleted"
        try:
            self._discard_partial(final)
            final.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(
                f"storage.{self.target}: cannot remove {final}: {exc.strerror}",
                recoverable=classify(exc) == "recoverable",
            ) from exc
        fsync_dir(final.parent)
        return True

    @staticmethod
    def _discard_partial(final: Path) -> None:
        """Temporary files an interrupted write of `final` left behind."""
        # names compared as strings: a glob compiles a pattern for every archive name
        # (~1 ms of a tiny job's CPU); a name is exactly _tmp_name()'s
        ending = "-" + final.name
        with os.scandir(final.parent) as entries:
            leftovers = [
                e.path
                for e in entries
                if e.name.startswith(TMP_PREFIX)
                and e.name.endswith(ending)
                and len(e.name) == len(TMP_PREFIX) + 2 * _TOKEN_BYTES + len(ending)
            ]
        for leftover in leftovers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)

    def _write(self, archive: Parts, final: Path, digest: Digest, size: int) -> None:
        tmp = _tmp_name(final)
        with atomic_file(final, 0o444, tmp=tmp) as f:
            fd = f.fileno()
            copy_parts(archive, fd)
            synced = _SYNCER.submit(os.fsync, fd)  # the disk writes while we read back
            try:
                got = file_sha256(tmp)
            finally:
                wait([synced])  # before the file is closed, whatever happened
            synced.result()
            expected = (digest.result(), size)  # the runner may have been hashing meanwhile
            if got != expected:
                raise StorageError(
                    f"storage.{self.target}: read-back of {tmp} gave sha256 "
                    f"{got[0]} ({got[1]} bytes), expected {expected[0]} ({size} bytes)",
                    recoverable=True,
                )
