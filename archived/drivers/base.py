"""The two driver interfaces, and the artifact writer every activity driver shares.

An activity driver turns one data source into files under the job's staging area,
through an `ArtifactWriter` that hashes every byte as it is written and records
`sha256 size path` for each file, so the payload is never read a second time to
be checksummed. A storage driver puts the finished archive somewhere and proves it
reads back identical.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

import anyio
from pydantic import BaseModel, ConfigDict

from ..config import Config

BUFFER_SIZE = 1024 * 1024


class DriverOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def bagit_path(path: str) -> str:
    """A path as BagIt manifests spell it (RFC 8493 section 2.1.3)."""
    return path.replace("%", "%25").replace("\n", "%0A").replace("\r", "%0D")


@dataclass(frozen=True)
class Record:
    sha256: str
    size: int
    path: str  # bag-relative, BagIt-encoded: data/<activity>/...

    def line(self) -> str:
        return f"{self.sha256} {self.size} {self.path}\n"

    @classmethod
    def parse(cls, line: str) -> Record:
        sha, size, path = line.rstrip("\n").split(" ", 2)
        return cls(sha, int(size), path)


@dataclass
class ArtifactWriter:
    """Writes one activity's files under `bag_dir/data/<activity>/`, hashing as it goes.

    Used from one worker thread. Records stream to `records_path` (never held in
    memory) and become visible under that name only once `finish()` ran.
    """

    bag_dir: Path
    activity: str
    records_path: Path
    buffer_size: int = BUFFER_SIZE
    files: int = 0
    total_bytes: int = 0
    _records: IO[str] | None = field(default=None, repr=False)
    _buffer: bytearray = field(default_factory=bytearray, repr=False)

    @property
    def root(self) -> Path:
        return self.bag_dir / "data" / self.activity

    @property
    def _part(self) -> Path:
        return self.records_path.with_name(self.records_path.name + ".part")

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.records_path.parent.mkdir(parents=True, exist_ok=True)
        self._records = open(self._part, "w", encoding="utf-8")  # noqa: SIM115
        self._buffer = bytearray(self.buffer_size)

    def copy_from(self, relpath: str, source: IO[bytes], mtime: float | None = None) -> int:
        """Copy an open binary stream into the artifact file `relpath`; returns its size."""
        view = memoryview(self._buffer)
        with self.open(relpath, mtime) as sink:
            while n := source.readinto(view):  # type: ignore[attr-defined]
                sink.write(view[:n])
        return sink.size

    @contextmanager
    def open(self, relpath: str, mtime: float | None = None) -> Iterator[HashingSink]:
        """An artifact file to write into; recorded when the block ends without error."""
        target = self.root / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb", buffering=0) as raw:
            sink = HashingSink(raw)
            yield sink
        if mtime is not None:
            os.utime(target, (mtime, mtime))
        assert self._records is not None, "start() first"
        path = bagit_path(f"data/{self.activity}/{relpath}")
        self._records.write(Record(sink.hexdigest(), sink.size, path).line())
        self.files += 1
        self.total_bytes += sink.size

    def adopt(self, relpath: str) -> None:
        """Record a file a driver wrote under `root` by other means, hashing it once."""
        buffer = memoryview(self._buffer)
        digest = hashlib.sha256()
        size = 0
        with open(self.root / relpath, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                digest.update(buffer[:n])
                size += n
        assert self._records is not None, "start() first"
        path = bagit_path(f"data/{self.activity}/{relpath}")
        self._records.write(Record(digest.hexdigest(), size, path).line())
        self.files += 1
        self.total_bytes += size

    def finish(self) -> dict[str, Any]:
        assert self._records is not None
        self._records.flush()
        os.fsync(self._records.fileno())
        self._records.close()
        os.replace(self._part, self.records_path)
        return {"files": self.files, "bytes": self.total_bytes}


class HashingSink:
    """A write-only file that keeps the sha256 and size of what went through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
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
        return len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


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

    @abstractmethod
    async def run(self, ctx: ActivityContext) -> dict[str, Any]:
        """Write the artifacts through `ctx.writer`; return a small JSON summary."""


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

    @abstractmethod
    async def ready(self) -> None:
        """Raise ConfigError unless the target can take archives now."""

    @abstractmethod
    async def put(self, archive: Path, key: str, sha256: str, size: int) -> StoredCopy:
        """Store `archive` under `key` atomically and return the verified copy.

        A copy already at `key` with the same digest is adopted, not written again.
        """

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
