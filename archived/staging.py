"""One job's staging area: where its archive is put together before it is stored.

Layout of `<state_dir>/staging/<job id>/`, one folder: `<activity>.part.tar` (each
activity's tar fragment), `<activity>.records` (sha256, size and path of each file it
wrote), `manifest-sha256.txt` (a large job's; a small one's is made in memory) and
`head.tar` (the tag files' tar members); beside the jobs' folders, `end.tar`, the two
zero blocks that end every archive, one file for all the jobs. The archive is the
concatenation of head, fragments and end, in that order.

Staging is not fsynced, but for the sealed head and the end: a fragment written before
the machine last started may have holes, so it is re-read against its records before it
is used (`reverify_after_restart`); the tag files are made again (post-processing starts
over).
"""

from __future__ import annotations

import functools
import os
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from . import bag
from .artifacts import ArtifactWriter
from .errors import IntegrityError, describe
from .fileio import atomic_file, require_space
from .tarformat import END

log = structlog.get_logger(component="staging")

# An activity's tar fragment: `<activity>.part.tar`, never `head.tar`, `end.tar` (a job's
# own, before the end was shared) or `archive.tar`, whatever the activity's name. One
# folder a job, no more: on a busy disk each new folder and file costs (ext4 looks for a
# free inode past the ones just freed), and a burst of small jobs makes and removes many.
FRAGMENT = ".part.tar"
END_NAME = "end.tar"


def boot_id() -> str:
    """Which start of the machine this is (Linux); staging from another may have holes."""
    if override := os.environ.get("ARCHIVED_BOOT_ID"):  # tests: as if the machine restarted
        return override
    return _machine_boot_id()


@functools.cache
def _machine_boot_id() -> str:
    """Read once: it cannot change while this process runs."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Staging:
    root: Path
    activities: Sequence[str]  # the job's activities, in the archive's order

    @property
    def bag_dir(self) -> Path:
        return self.root  # the payload manifest (the other tag files are in memory)

    @property
    def head(self) -> Path:
        return self.root / "head.tar"  # the tag files' tar members

    @property
    def end(self) -> Path:
        """Shared by the jobs of this state directory: one file less to make and remove
        a job (each new file costs ext4 a search for a free inode past those freed in
        the last seconds, and a burst of small jobs frees thousands)."""
        return self.root.parent / END_NAME

    @property
    def names_db(self) -> Path:
        return self.root / "names.db"

    @property
    def restored(self) -> Path:
        return self.root / "archive.tar"  # the archive fetched back from a kept copy

    def fragment(self, activity: str) -> Path:
        return self.root / f"{activity}{FRAGMENT}"

    def fragments_found(self) -> set[str]:
        """The tars staging holds besides the head, the end and a restored archive:
        fragments, whoever wrote them."""
        ours = {self.head.name, END_NAME, self.restored.name}
        return {n for n in os.listdir(self.root) if n.endswith(".tar") and n not in ours}

    def records_of(self, activity: str) -> Path:
        return self.root / f"{activity}.records"

    def records(self) -> list[Path]:
        return [self.records_of(a) for a in self.activities]

    def archive_parts(self) -> list[Path]:
        """The files whose concatenation is the archive, in order."""
        return [self.head, *(self.fragment(a) for a in self.activities), self.end]

    def ensure_end(self) -> None:
        """The two zero blocks that end the archive, in place: written (fsynced, whole)
        when missing or not what they must be; else left alone (a read, no new file)."""
        try:
            with open(self.end, "rb") as f:
                if f.read(len(END) + 1) == END:
                    return
        except OSError:  # gone, unreadable (an operator's file in its place): replaced
            pass
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.end) as f:
            f.write(END)

    def writer(self, activity: str, bag_name: str) -> ArtifactWriter:
        return ArtifactWriter(
            self.fragment(activity), bag_name, activity, self.records_of(activity)
        )

    @staticmethod
    def adopt_earlier_layout(root: Path) -> bool:
        """Staging an earlier version made (`parts/<activity>.tar`, `records/`, `bag/`)
        moved into this layout, for a job that was in flight across the upgrade: the
        fragments, records and payload manifest kept, the other tag files dropped (they
        are made at `sign`). Whether there was any."""
        moved = False
        for folder, suffix in (("parts", FRAGMENT), ("records", ".records")):
            old = root / folder
            if not old.is_dir():
                continue
            for entry in old.iterdir():
                if entry.name.endswith(".tar" if folder == "parts" else ".records"):
                    entry.rename(root / (entry.name.rsplit(".", 1)[0] + suffix))
            shutil.rmtree(old)
            moved = True
        bag_dir = root / "bag"
        if bag_dir.is_dir():
            if (bag_dir / bag.MANIFEST).is_file():
                (bag_dir / bag.MANIFEST).rename(root / bag.MANIFEST)
            shutil.rmtree(bag_dir)
            moved = True
        return moved

    def require_space(self, needed: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        require_space(self.root, needed, "staging")

    def remove(self) -> None:
        shutil.rmtree(self.root, True)

    @staticmethod
    def clear_activity(writer: ArtifactWriter) -> None:
        """Remove what an unfinished earlier try of this task left behind."""
        for path in (writer.fragment, writer.spool, writer.records_path):
            path.unlink(missing_ok=True)
        writer.records_path.with_name(writer.records_path.name + ".part").unlink(missing_ok=True)

    @staticmethod
    def staged_before_restart(reported: dict[str, dict[str, Any]]) -> list[str]:
        """The activities whose staging was written before the machine last started."""
        boot = boot_id()
        return [name for name, result in reported.items() if result.get("boot") != boot]

    async def reverify_after_restart(
        self, job_id: str, reported: dict[str, dict[str, Any]], limiter: anyio.CapacityLimiter
    ) -> list[str]:
        """Re-read, against their records, the fragments written before the machine
        last started: staging is not fsynced, so they may have holes. Returns the
        activities re-read; IntegrityError names the first file that does not match."""
        stale = self.staged_before_restart(reported)
        for name in stale:
            log.warning("the machine restarted since this activity ran: re-reading", activity=name)
            try:
                await anyio.to_thread.run_sync(
                    bag.verify_fragment,
                    self.fragment(name),
                    self.records_of(name),
                    anyio.from_thread.check_cancelled,
                    limiter=limiter,
                )
            except (IntegrityError, OSError, tarfile.TarError) as exc:
                raise IntegrityError(
                    f"activity {name}, staged before the machine restarted: {describe(exc)}; "
                    f"`archived retry {job_id}` archives it again"
                ) from exc
        return stale
