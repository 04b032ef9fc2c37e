"""The artifact writer every activity driver writes through.

An activity driver turns one data source into one tar fragment in the job's staging
area, through an `ArtifactWriter` that hashes every byte as it is written and records
`sha256 size path` for each file, so the payload is never read a second time to be
checksummed, and no file is created per source file.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import cpus
from .errors import TransientError
from .fileio import BUFFER_SIZE, copy_parts, write_all
from .tarformat import BLOCK, padding, tar_header

SMALL_FILE = 256 * 1024  # files up to this size are read whole, in one call
HASH_ASIDE = 64 * 1024  # whole files from this size are hashed in a helper thread


def bagit_path(path: str) -> str:
    """A path as BagIt manifests spell it (RFC 8493 section 2.1.3)."""
    return path.replace("%", "%25").replace("\n", "%0A").replace("\r", "%0D")


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
        if not self._buffers:  # the first large file: small ones go through `_pending`
            # made when needed: two zeroed MiB at once are fresh pages from the kernel,
            # ~1 ms, which a job of small files (most) would spend for nothing
            self._buffers = (memoryview(bytearray(BUFFER_SIZE)), memoryview(bytearray(BUFFER_SIZE)))
        digest, left, turn = hashlib.sha256(), size, 0
        hashing: Future[None] | None = None
        with cpus.bulk(size):
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
            # it only hashes files of HASH_ASIDE and more: on every CPU (cpus.py)
            self._hasher = ThreadPoolExecutor(
                1, thread_name_prefix="archived-hash", initializer=cpus.widen
            )
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
