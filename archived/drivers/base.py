"""The driver contract: what an activity or storage driver implements.

An activity driver turns one data source into one tar fragment in the job's staging
area, writing through the `ArtifactWriter` its context carries (see `artifacts`). A
storage driver puts the finished archive (the fragments and the tag files' tar,
concatenated) somewhere and proves it reads back identical. A third party's driver
imports only the names in `__all__`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
from pydantic import BaseModel, ConfigDict

from ..fileio import Parts

if TYPE_CHECKING:
    from ..artifacts import ArtifactWriter
    from ..config import Config

__all__ = [
    "NO_LOCK",
    "ActivityContext",
    "ActivityDriver",
    "Digest",
    "DriverOptions",
    "Estimate",
    "Lock",
    "Parts",
    "StorageDriver",
    "StoredCopy",
    "copy_problem",
    "known_digest",
    "wait_digest",
]

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


def copy_problem(where: str, got: tuple[str, int] | None, sha256: str, size: int) -> str | None:
    """What a storage driver's `check()` says of a copy that read back as `got` (its
    sha256 and size; None: not there). The audit tells the verdicts by their first word."""
    if got is None:
        return f"missing: {where}"
    if got != (sha256, size):
        return f"damaged: {where} has sha256 {got[0]} ({got[1]} bytes)"
    return None


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

    def fingerprint(self) -> list[str] | None:
        """Lines that change when the sources change (names, sizes, mtimes), for a
        schedule's `skip_unchanged`; cheap, no content read. None: it cannot tell (a
        program's output), and a scheduled job always runs."""
        return None

    @abstractmethod
    async def run(self, ctx: ActivityContext) -> dict[str, Any]:
        """Write the artifacts through `ctx.writer`; return a small JSON summary."""

    async def checked_in_thread(
        self, ctx: ActivityContext, work: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """`work()` in a worker thread (of `ctx.limiter`), after this activity is checked
        against the config again (a reload, or its sources changed since submit): there
        too. Every look at a source belongs in a thread: one on a mount that does not
        answer (its NFS server gone) blocks whoever looks, and on the event loop that
        would stop the whole daemon, not the one job."""

        def checked() -> dict[str, Any]:
            self.check(self.opts, ctx.config)
            return work()

        return await anyio.to_thread.run_sync(checked, limiter=ctx.limiter)


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
