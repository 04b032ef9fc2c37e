"""Storage driver `localdir`: archives as files in a local (or mounted) directory.

Write to a temporary name; read that copy back and match its digest while fsync
puts it on disk (the read-back comes from the page cache, so the two overlap);
then rename and fsync the directory. Only verified, durable archives ever carry a
final name; the temporary names start with `.archived-tmp-` and are removed on
failure.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio

from .. import failpoints
from ..errors import ConfigError, StorageError, classify
from .base import (
    Digest,
    DriverOptions,
    NotRegularFile,
    Parts,
    StorageDriver,
    StoredCopy,
    copy_parts,
    copy_problem,
    file_sha256,
)

TMP_PREFIX = ".archived-tmp-"
# What a network file system answers when its server is gone, not the file.
NETWORK_GONE = frozenset({errno.ENOTCONN, errno.ESTALE, errno.EHOSTDOWN})


class LocalDirOptions(DriverOptions):
    path: Path
    create: bool = False  # make the directory if missing (off: a missing mount must fail)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalDirDriver(StorageDriver):
    Options = LocalDirOptions
    opts: LocalDirOptions

    @property
    def root(self) -> Path:
        return self.opts.path

    async def ready(self) -> None:
        root = self.root
        if self.opts.create:
            await anyio.to_thread.run_sync(lambda: root.mkdir(parents=True, exist_ok=True))
        if not root.is_dir():
            raise ConfigError(f"storage.{self.target}: {root} is not a directory")
        if not os.access(root, os.W_OK | os.X_OK):
            raise ConfigError(f"storage.{self.target}: {root} is not writable")

    async def put(self, archive: Parts, key: str, digest: Digest, size: int) -> StoredCopy:
        return await anyio.to_thread.run_sync(self._put, archive, key, digest, size)

    def _put(self, archive: Parts, key: str, digest: Digest, size: int) -> StoredCopy:
        final = self.root / key
        try:
            if self.opts.create:
                self.root.mkdir(parents=True, exist_ok=True)
            final.parent.mkdir(exist_ok=True)
            with contextlib.suppress(FileNotFoundError, NotRegularFile):  # else replaced
                if file_sha256(final) == (digest.result(), size):
                    return StoredCopy(str(final), size, digest.result())  # an earlier try's
            self._discard_partial(final)
            self._write(archive, final, digest, size)
            failpoints.hit("store.after_rename")
        except OSError as exc:
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
        if not self.root.is_dir():  # an unmounted disk is not "already deleted"
            raise StorageError(f"storage.{self.target}: {self.root} is not there", recoverable=True)
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
        _fsync_dir(final.parent)
        return True

    @staticmethod
    def _discard_partial(final: Path) -> None:
        """Temporary files an interrupted write of `final` left behind."""
        for leftover in final.parent.glob(f"{TMP_PREFIX}*-{final.name}"):
            leftover.unlink(missing_ok=True)

    def _write(self, archive: Parts, final: Path, digest: Digest, size: int) -> None:
        tmp = final.parent / f"{TMP_PREFIX}{secrets.token_hex(6)}-{final.name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
        try:
            try:
                copy_parts(archive, fd)
                with ThreadPoolExecutor(1) as pool:  # the disk writes while we read back
                    synced = pool.submit(os.fsync, fd)
                    got = file_sha256(tmp)
                    synced.result()
            finally:
                os.close(fd)
            expected = (digest.result(), size)  # the runner may have been hashing meanwhile
            if got != expected:
                raise StorageError(
                    f"storage.{self.target}: read-back of {tmp} gave sha256 "
                    f"{got[0]} ({got[1]} bytes), expected {expected[0]} ({size} bytes)",
                    recoverable=True,
                )
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(final.parent)
