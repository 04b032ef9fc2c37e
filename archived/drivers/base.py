"""The two driver interfaces, and the artifact writer every activity driver shares.

An activity driver turns one data source into one tar fragment in the job's staging
area, through an `ArtifactWriter` that hashes every byte as it is written and records
`sha256 size path` for each file, so the payload is never read a second time to be
checksummed, and no file is created per source file. A storage driver puts the
finished archive (the fragments and the tag files' tar, concatenated) somewhere and
proves it reads back identical.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tarfile
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

import anyio
from pydantic import BaseModel, ConfigDict

from ..errors import NoSpace, StorageError, TransientError

if TYPE_CHECKING:
    from ..config import Config

BUFFER_SIZE = 1024 * 1024
BLOCK = 512  # a tar block
SMALL_FILE = 256 * 1024  # files up to this size are read whole, in one call
HASH_ASIDE = 64 * 1024  # whole files from this size are hashed in a helper thread
# The sealed archive as it sits in staging: files whose concatenation is the tar.
Parts = Sequence[Path]
# The archive's sha256, which the runner may still be computing while the copies are
# written: a storage driver needs it only to check what it wrote (S3: before it starts).
Digest = Future[str]


def known_digest(sha256: str) -> Digest:
    digest: Digest = Future()
    digest.set_result(sha256)
    return digest


async def wait_digest(digest: Digest) -> str:
    """The archive's sha256 from async code, once it is known."""
    return await anyio.to_thread.run_sync(digest.result, abandon_on_cancel=True)


class DriverOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def bagit_path(path: str) -> str:
    """A path as BagIt manifests spell it (RFC 8493 section 2.1.3)."""
    return path.replace("%", "%25").replace("\n", "%0A").replace("\r", "%0D")


_ZERO_BLOCK = bytes(BLOCK)


def padding(size: int) -> bytes:
    """The zeros that fill a tar member's data up to a whole block."""
    return _ZERO_BLOCK[: -size % BLOCK]


_USTAR_TAIL = (
    b"0"  # regular file
    + bytes(100)  # link name
    + b"ustar\x0000"
    + bytes(64)  # user and group name: none
    + bytes(16)  # device numbers: none, as tarfile writes them for a regular file
    + bytes(155 + 12)  # name prefix, padding
)
_USTAR_FIXED = b"0000644\x00" + b"0000000\x00" * 2  # mode, uid, gid
_USTAR_SUM = sum(_USTAR_TAIL) + 8 * 32  # the checksum field counts as eight spaces
_USTAR_MAX = 8**11  # size and mtime fields hold 11 octal digits


def tar_header(name: str, size: int, mtime: int) -> bytes:
    """The header block(s) of a regular file member: mode 0644, no owner.

    A short ASCII name gets a plain ustar header, built here because `tarfile` takes
    15 us a header (a third of the time per small file); anything else, such as a
    long or non-ASCII name or an 8 GiB file, the PAX header `tarfile` writes.
    """
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= 100 and raw.isascii() and 0 <= size < _USTAR_MAX and 0 <= mtime < _USTAR_MAX:
        head = raw.ljust(100, b"\x00") + _USTAR_FIXED + b"%011o\x00%011o\x00" % (size, mtime)
        checksum = sum(head) + _USTAR_SUM
        return head + b"%06o\x00 " % checksum + _USTAR_TAIL
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def member_bytes(name: str, size: int) -> int:
    """About what a regular file's member takes in a tar fragment, with its record:
    the header (a PAX one for a long or non-ASCII name), the data padded to a block."""
    length = len(name)
    if length > 100 or not name.isascii():
        length = len(name.encode("utf-8", "surrogateescape"))
        header = 3 * BLOCK + (length + 30) // BLOCK * BLOCK
    else:
        header = BLOCK
    return header + (size + BLOCK - 1) // BLOCK * BLOCK + length + 80  # record: sha256 size path


def require_space(directory: Path, needed: int, what: str) -> None:
    """NoSpace unless the file system of `directory` has `needed` bytes free (for us)."""
    st = os.statvfs(directory)
    has = st.f_bavail * st.f_frsize
    if needed > has:
        raise NoSpace(f"{what}: needs {needed} bytes, has {has} on {directory}")


def hash_file(
    path: Path | str | int,
    digest: Any,
    buffer: memoryview,
    check: Callable[[], None] = lambda: None,
) -> int:
    """Feed the file at `path` (or an open descriptor, closed after) to `digest` through
    `buffer`; returns its size."""
    size = 0
    with open(path, "rb", buffering=0) as f:
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
    size = hash_file(open_regular(path), digest, memoryview(bytearray(BUFFER_SIZE)))
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


def copy_problem(where: str, got: tuple[str, int] | None, sha256: str, size: int) -> str | None:
    """What a storage driver's `check()` says of a copy that read back as `got` (its
    sha256 and size; None: not there). The audit tells the verdicts by their first word."""
    if got is None:
        return f"missing: {where}"
    if got != (sha256, size):
        return f"damaged: {where} has sha256 {got[0]} ({got[1]} bytes)"
    return None


class SourceChanged(TransientError):
    """A file changed size while it was being copied."""


@dataclass
class ArtifactWriter:
    """Writes one activity's files as tar members into `fragment`, hashing as it goes.

    Members are named `<bag_name>/data/<activity>/<relpath>`; the fragment has no
    end-of-archive blocks, so fragments concatenate into one tar. Small members are
    gathered in a buffer and written 1 MiB at a time. Used from one worker thread.
    Records stream to `records_path` (never held in memory) and become visible
    under that name only once `finish()` ran.
    """

    fragment: Path
    bag_name: str
    activity: str
    records_path: Path
    files: int = 0
    total_bytes: int = 0
    tar_bytes: int = 0
    # payload bytes taken in so far, the file under way included: what progress shows
    # (read from another thread; an int, so a read sees one value or the next)
    moved: int = 0
    _fd: int = field(default=-1, repr=False)
    _pending: bytearray = field(default_factory=bytearray, repr=False)
    _buffers: tuple[memoryview, ...] = field(default=(), repr=False)
    _hasher: ThreadPoolExecutor | None = field(default=None, repr=False)
    _queued: deque[tuple[str, str | Future[str], int]] = field(default_factory=deque, repr=False)
    _records: IO[str] | None = field(default=None, repr=False)

    @property
    def _records_part(self) -> Path:
        return self.records_path.with_name(self.records_path.name + ".part")

    @property
    def spool(self) -> Path:
        """Where output of unknown length waits before it joins the fragment."""
        return self.fragment.with_name(self.fragment.name + ".spool")

    def start(self) -> None:
        self.fragment.parent.mkdir(parents=True, exist_ok=True)
        self.records_path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self._fd = os.open(self.fragment, flags, 0o600)
        self._records = open(self._records_part, "w", encoding="utf-8")  # noqa: SIM115
        self._buffers = (memoryview(bytearray(BUFFER_SIZE)), memoryview(bytearray(BUFFER_SIZE)))

    def add(self, relpath: str, data: bytes, mtime: float) -> None:
        """A whole small file at once. (Runs once a file: kept lean.)"""
        size, pending = len(data), self._pending
        self.moved += size
        pending += tar_header(self._member(relpath), size, int(mtime))
        pending += data
        pending += padding(size)
        if len(pending) >= BUFFER_SIZE:
            self._flush()
        if size < HASH_ASIDE:
            self._record(relpath, hashlib.sha256(data).hexdigest(), size)
        else:  # hashed in the helper thread while the next files are read
            self._record(relpath, self._hash_thread().submit(_sha256_hex, data), size)

    def copy_from(self, relpath: str, source: IO[bytes], size: int, mtime: float) -> None:
        """Exactly `size` bytes of an open binary stream; SourceChanged if it has fewer."""
        self._begin_member(relpath, size, mtime)
        # sha256 and write() both release the GIL: one block is hashed in a helper
        # thread while it is written and the next is read (two buffers, taking turns)
        hasher = self._hash_thread()
        digest, left, turn = hashlib.sha256(), size, 0
        hashing: Future[None] | None = None
        try:
            while left:
                buffer = self._buffers[turn][: min(left, BUFFER_SIZE)]
                n = source.readinto(buffer)  # type: ignore[attr-defined]
                if not n:
                    raise SourceChanged(f"{relpath} changed while being archived (shrank)")
                block = buffer[:n]
                hashed = hasher.submit(digest.update, block)
                write_all(self._fd, block)
                self.moved += n
                if hashing is not None:
                    hashing.result()  # the other buffer is free again
                hashing, turn, left = hashed, turn ^ 1, left - n
        finally:
            if hashing is not None:
                hashing.result()
        self._end_member(relpath, digest.hexdigest(), size)

    @contextmanager
    def stream(self, relpath: str) -> Iterator[HashingSink]:
        """A file of unknown length: written to a spool file, then appended as a member."""
        fd = os.open(self.spool, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb", buffering=0, closefd=False) as raw:
                sink = HashingSink(raw, self)
                yield sink
            self._begin_member(relpath, sink.size, os.fstat(fd).st_mtime)
            copy_parts([self.spool], self._fd)
            self._end_member(relpath, sink.hexdigest(), sink.size)
        finally:
            os.close(fd)
            self.spool.unlink(missing_ok=True)

    def adopt(self, relpath: str, path: Path) -> None:
        """A file a driver made in staging by other means; it is removed once added."""
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            self.copy_from(relpath, f, st.st_size, st.st_mtime)
        path.unlink()

    def finish(self) -> dict[str, Any]:
        assert self._records is not None, "start() first"
        self._write_records()
        self._flush()
        os.close(self._fd)
        self._fd = -1
        self._records.flush()
        os.fsync(self._records.fileno())
        self._records.close()
        os.replace(self._records_part, self.records_path)
        return {"files": self.files, "bytes": self.total_bytes, "tar_bytes": self.tar_bytes}

    def close(self) -> None:
        """Release what the writer holds; after finish(), or after an error."""
        if self._hasher is not None:
            self._hasher.shutdown()
            self._hasher = None
        self._queued.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._records is not None and not self._records.closed:
            self._records.close()

    def _member(self, relpath: str) -> str:
        return f"{self.bag_name}/data/{self.activity}/{relpath}"

    def _begin_member(self, relpath: str, size: int, mtime: float) -> None:
        """The header of a member whose data the caller then writes to `_fd` itself."""
        self._pending += tar_header(self._member(relpath), size, int(mtime))
        self._flush()

    def _end_member(self, relpath: str, sha256: str, size: int) -> None:
        """After its `size` bytes went to `_fd`: count them, pad, record the file."""
        self.tar_bytes += size
        self._pending += padding(size)
        self._record(relpath, sha256, size)

    def _flush(self) -> None:
        if self._pending:
            write_all(self._fd, self._pending)
            self.tar_bytes += len(self._pending)
            self._pending.clear()

    def _hash_thread(self) -> ThreadPoolExecutor:
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="archived-hash")
        return self._hasher

    def _record(self, relpath: str, sha256: str | Future[str], size: int) -> None:
        """A record, in file order; one whose digest is still being computed waits in
        a short queue (and so does every record after it)."""
        self.files += 1
        self.total_bytes += size
        if self._queued or not isinstance(sha256, str):
            self._queued.append((relpath, sha256, size))
            self._write_records(keep=8)
        else:
            self._write_record(relpath, sha256, size)

    def _write_records(self, keep: int = 0) -> None:
        """Queued records in order, waiting for digests, until at most `keep` are left
        (and only those whose digest is not known yet)."""
        queued = self._queued
        while queued and (len(queued) > keep or _known(queued[0][1])):
            relpath, sha256, size = queued.popleft()
            self._write_record(
                relpath, sha256 if isinstance(sha256, str) else sha256.result(), size
            )

    def _write_record(self, relpath: str, sha256: str, size: int) -> None:
        assert self._records is not None, "start() first"
        path = bagit_path(f"data/{self.activity}/{relpath}")
        self._records.write(f"{sha256} {size} {path}\n")


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _known(sha256: str | Future[str]) -> bool:
    return isinstance(sha256, str) or sha256.done()


class HashingSink:
    """A write-only file that keeps the sha256 and size of what went through it."""

    def __init__(self, raw: IO[bytes], writer: ArtifactWriter) -> None:
        self._raw = raw
        self._writer = writer  # whose progress counts these bytes
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self._hash.update(data)
        view = memoryview(data)
        while view:
            written = self._raw.write(view)
            assert written is not None
            view = view[written:]
        self.size += len(data)
        self._writer.moved += len(data)
        return len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@dataclass(frozen=True)
class Estimate:
    """What an activity will stage, known before it runs: `staged` bytes in staging (its
    tar members with their records, see member_bytes), checked against the free space;
    and the payload, `files` and `bytes`, which its progress is shown against (None
    where not known: a snapshot's file count is, its size only about)."""

    staged: int
    files: int | None = None
    bytes: int | None = None


@dataclass
class ActivityContext:
    job_id: str
    config: Config
    writer: ArtifactWriter
    limiter: anyio.CapacityLimiter  # the hash/copy thread pool, limits.hash_threads
    notes: list[str] = field(default_factory=list)  # lines for the job's event log


class ActivityDriver(ABC):
    Options: ClassVar[type[DriverOptions]]

    def __init__(self, name: str, options: DriverOptions) -> None:
        self.name, self.opts = name, options

    @classmethod
    def options(cls, raw: dict[str, Any]) -> DriverOptions:
        return cls.Options.model_validate(raw)

    @classmethod
    def check(cls, options: DriverOptions, config: Config) -> None:
        """Raise JobFileError if the options are not allowed under `config`."""

    def estimate(self, member_prefix: str) -> Estimate | None:
        """What the artifacts will be, as far as it can be known before (a program's
        output cannot): members named `member_prefix + relpath`. Runs in a worker
        thread, before `run`."""
        return None

    @abstractmethod
    async def run(self, ctx: ActivityContext) -> dict[str, Any]:
        """Write the artifacts through `ctx.writer`; return a small JSON summary."""


@dataclass(frozen=True)
class Lock:
    """What keeps a copy from being deleted, where the target can enforce it (S3 Object
    Lock): a retention date (none: the job has no retention) and a legal hold."""

    until: datetime | None = None
    legal_hold: bool = False


NO_LOCK = Lock()


@dataclass(frozen=True)
class StoredCopy:
    path: str  # where an operator finds it: a file path or a URL
    size: int
    sha256: str


class StorageDriver(ABC):
    Options: ClassVar[type[DriverOptions]]

    def __init__(self, target: str, options: DriverOptions) -> None:
        self.target, self.opts = target, options

    @classmethod
    def options(cls, raw: dict[str, Any]) -> DriverOptions:
        return cls.Options.model_validate(raw)

    @property
    def local_root(self) -> Path | None:
        """The local directory the target keeps its archives in, if it has one."""
        return None

    @abstractmethod
    async def ready(self) -> None:
        """Raise ConfigError if the target cannot work as configured, TargetUnavailable
        if it cannot be reached now (jobs wait for it)."""

    async def mark(self) -> str | None:
        """Mark the target as one (`archived init-target`); None: it needs no marker."""
        return None

    @abstractmethod
    async def put(
        self, archive: Parts, key: str, digest: Digest, size: int, lock: Lock = NO_LOCK
    ) -> StoredCopy:
        """Store the concatenation of `archive` under `key` atomically; the verified copy.

        It must match `digest` (the archive's sha256) and `size` as it reads back, and
        carry `lock` where the target enforces locks (others ignore it).

        A copy already at `key` with the same digest is adopted, not written again.
        """

    async def set_legal_hold(self, key: str, on: bool) -> str | None:
        """Put (or lift) the target's own legal hold on the copy at `key`, where it has
        one (S3 Object Lock); what was done, or None: the target has none."""
        return None

    @abstractmethod
    async def check(self, key: str, sha256: str, size: int) -> str | None:
        """Re-read the copy at `key`: None if it matches, else what is wrong, one line."""

    @abstractmethod
    async def fetch(self, key: str, dest: Path) -> None:
        """Copy the archive at `key` to the local file `dest` (to repair another target)."""

    @abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove the archive at `key` and any partial upload of it; True if one was there.

        Idempotent: deleting what is not there is not an error.
        """
