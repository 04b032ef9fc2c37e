"""Bytes on disk: hashing a file, copying the staged parts of an archive, writing a
file whole and atomically, making a rename durable.

The bottom of the package: it imports nothing of it but `errors`. Everything reads
and writes in large blocks (`BUFFER_SIZE`) and copies in the kernel where it can
(`copy_file_range`): the archive pipeline's speed rests on these few functions.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from . import cpus
from .errors import NoSpace, StorageError

BUFFER_SIZE = 1024 * 1024
# The sealed archive as it sits in staging: files whose concatenation is the tar.
Parts = Sequence[Path]

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def fsync_dir(directory: Path) -> None:
    """Make the entries just made or renamed in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(
    path: Path,
    mode: int = 0o600,
    *,
    exclusive: bool = False,
    tmp: Path | None = None,
    sync_dir: bool = True,
) -> Iterator[BinaryIO]:
    """A new file with `mode` (whatever the umask), written to `tmp` (by default a fresh
    hidden name beside `path`), fsynced, then put at `path` whole, and the directory
    fsynced (not with `sync_dir` off: for a staging area, which a crash makes again).
    Nothing is left at `tmp` when the block fails.

    `exclusive`: never replace a file at `path` (FileExistsError): the file is hard-linked
    into place, or where the file system has no hard links renamed after a check.
    """
    tmp = tmp or path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, _NEW, mode)
    try:
        with os.fdopen(fd, "wb", buffering=BUFFER_SIZE) as f:
            os.fchmod(fd, mode)
            yield f
            f.flush()
            os.fsync(fd)
        if exclusive:
            _link_new(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    if sync_dir:
        fsync_dir(path.parent)


@contextlib.contextmanager
def scratch_file(path: Path, *, durable: bool = False) -> Iterator[BinaryIO]:
    """`path` written afresh (mode 0600, a symbolic link there not followed), in place:
    for staging, where whoever wrote it writes it again after a crash, so a partly
    written file needs no temporary name. `durable`: fsynced, and its directory too,
    before the block returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb", buffering=BUFFER_SIZE) as f:
        yield f
        if durable:
            f.flush()
            os.fsync(fd)
    if durable:
        fsync_dir(path.parent)


def _link_new(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if path.exists() or path.is_symlink():
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.rename(tmp, path)


def write_atomic(path: Path, data: bytes, mode: int = 0o600, *, exclusive: bool = False) -> None:
    """`data` at `path`, whole or not at all (see `atomic_file`)."""
    with atomic_file(path, mode, exclusive=exclusive) as f:
        f.write(data)


def require_space(directory: Path, needed: int, what: str) -> None:
    """NoSpace unless the file system of `directory` has `needed` bytes free (for us)."""
    st = os.statvfs(directory)
    has = st.f_bavail * st.f_frsize
    if needed > has:
        raise NoSpace(f"{what}: needs {needed} bytes, has {has} on {directory}")


def read_buffer(size: int) -> memoryview:
    """A buffer to read `size` bytes through: BUFFER_SIZE, or for less, that and one byte
    more (one read takes it all, the next sees the end), but not below 64 KiB (a size a
    file system reports wrong, 0 on some FUSE mounts, costs no read a byte). A zeroed
    MiB allocated while another is in use is fresh pages from the kernel, 0.1 to 1 ms:
    more than reading and hashing a small file, and a small job reads several."""
    return memoryview(bytearray(min(BUFFER_SIZE, max(size + 1, 64 * 1024))))


def hash_file(
    path: Path | str | int,
    digest: Any,
    buffer: memoryview | None = None,
    check: Callable[[], None] = lambda: None,
) -> int:
    """Feed the file at `path` (or an open descriptor, closed after) to `digest` through
    `buffer` (one its size needs, if not given); returns its size."""
    size = 0
    with open(path, "rb", buffering=0) as f:
        length = os.fstat(f.fileno()).st_size
        buffer = read_buffer(length) if buffer is None else buffer
        with cpus.bulk(length):
            while n := f.readinto(buffer):
                check()
                digest.update(buffer[:n])
                size += n
    return size


class NotRegularFile(OSError):
    """Something other than a regular file (a FIFO, a device, a symbolic link) at a path
    where one was expected."""


def open_regular(path: Path | str) -> int:
    """A read-only descriptor of the regular file at `path`, or NotRegularFile.

    A symbolic link is not followed, and a FIFO or a device is not waited on: opening a
    FIFO to read blocks until someone writes to it, which may be never.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the last component is a symbolic link
            raise NotRegularFile(errno.ELOOP, "not a regular file", str(path)) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def file_sha256(path: Path | str) -> tuple[str, int]:
    """The sha256 and size of a regular file, read once in large blocks."""
    digest = hashlib.sha256()
    size = hash_file(open_regular(path), digest)
    return digest.hexdigest(), size


def parts_size(parts: Parts) -> int:
    return sum(os.stat(p).st_size for p in parts)


def read_parts(parts: Parts, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` of the concatenation of `parts`."""
    out = bytearray()
    for part in parts:
        if len(out) == length:
            break
        with open(part, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if offset >= size:
                offset -= size
                continue
            f.seek(offset)
            offset = 0
            while len(out) < length and (chunk := f.read(length - len(out))):
                out += chunk
    if len(out) != length:
        raise StorageError(
            f"the staged archive is shorter than recorded ({parts[-1]})", recoverable=True
        )
    return bytes(out)


def copy_parts(parts: Parts, dst_fd: int) -> None:
    """Append the concatenation of `parts` to `dst_fd`, in the kernel where it can."""
    buffer: memoryview | None = None
    for part in parts:
        with open(part, "rb", buffering=0) as f:
            size = remaining = os.fstat(f.fileno()).st_size
            with cpus.bulk(size):
                try:
                    while remaining and (n := os.copy_file_range(f.fileno(), dst_fd, remaining)):
                        remaining -= n
                except OSError:  # not on this file system: copy through user space
                    buffer = buffer or memoryview(bytearray(BUFFER_SIZE))
                    f.seek(size - remaining)
                    while n := f.readinto(buffer):
                        write_all(dst_fd, buffer[:n])
                        remaining -= n
            if remaining:
                raise StorageError(f"{part} shrank while it was being copied", recoverable=True)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
