"""The BagIt 1.0 bag (RFC 8493) and its tar: tag files, manifests, packing.

All functions here block; the runner calls each in one worker thread. Payload
digests come from the records the activity tasks wrote while copying, so nothing
here reads the payload except `pack()`, which streams it once into the tar and
hashes the tar as it is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .drivers.base import BUFFER_SIZE, HashingSink, Record

BAGIT_TXT = "BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n"
MANIFEST = "manifest-sha256.txt"
TAGMANIFEST = "tagmanifest-sha256.txt"
EVENTS = "archived-events.jsonl"
SIGNATURE = TAGMANIFEST + ".minisig"
TIMESTAMP = TAGMANIFEST + ".tsr"
# Tag files in the order they go into the tar; the tag manifest covers the first four.
TAG_FILES = ("bagit.txt", "bag-info.txt", MANIFEST, EVENTS)
SEALED_TAG_FILES = (*TAG_FILES, TAGMANIFEST, SIGNATURE, TIMESTAMP)


def decode_path(path: str) -> str:
    """The inverse of BagIt's percent-encoding of CR, LF and %."""
    return path.replace("%0A", "\n").replace("%0D", "\r").replace("%25", "%")


def read_records(paths: Iterable[Path]) -> Iterator[Record]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield Record.parse(line)


@dataclass(frozen=True)
class Oxum:
    bytes: int
    files: int

    def __str__(self) -> str:
        return f"{self.bytes}.{self.files}"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_payload_manifest(bag_dir: Path, records: Iterable[Path]) -> Oxum:
    """manifest-sha256.txt from the activity records, streamed; returns Payload-Oxum."""
    total = count = 0
    tmp = bag_dir / (MANIFEST + ".part")
    with open(tmp, "w", encoding="utf-8", newline="\n") as out:
        for record in read_records(records):
            out.write(f"{record.sha256}  {record.path}\n")
            total += record.size
            count += 1
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, bag_dir / MANIFEST)
    return Oxum(total, count)


def bag_info(*, job_id: str, bagging_date: str, oxum: Oxum, metadata: dict[str, str]) -> str:
    lines = [
        f"Bagging-Date: {bagging_date}",
        f"Bag-Software-Agent: archived {__version__}",
        f"External-Identifier: {job_id}",
        f"Payload-Oxum: {oxum}",
        *(f"{label}: {value}" for label, value in metadata.items()),
    ]
    return "\n".join(lines) + "\n"


def write_tag_files(bag_dir: Path, *, info: str) -> None:
    write_atomic(bag_dir / "bagit.txt", BAGIT_TXT.encode())
    write_atomic(bag_dir / "bag-info.txt", info.encode("utf-8"))


def write_events(bag_dir: Path, events: Iterable[dict[str, Any]]) -> None:
    lines = "".join(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n" for e in events)
    write_atomic(bag_dir / EVENTS, lines.encode("utf-8"))


def write_tag_manifest(bag_dir: Path) -> bytes:
    """tagmanifest-sha256.txt over the tag files; returns its bytes, which get signed."""
    lines = []
    for name in TAG_FILES:
        digest = hashlib.sha256((bag_dir / name).read_bytes()).hexdigest()
        lines.append(f"{digest}  {name}\n")
    data = "".join(lines).encode()
    write_atomic(bag_dir / TAGMANIFEST, data)
    return data


@dataclass(frozen=True)
class Packed:
    sha256: str
    size: int


def pack(
    bag_dir: Path,
    bag_name: str,
    records: Iterable[Path],
    out: Path,
    check: Callable[[], None] = lambda: None,
) -> Packed:
    """Write the bag as one tar at `out` (atomically), hashing it while it is written.

    Members are exactly the tag files and the payload the records list: relative
    names under `bag_name/`, regular files only, no owners.
    """
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb", buffering=BUFFER_SIZE) as raw:
        sink = HashingSink(raw)
        with tarfile.open(
            fileobj=sink,
            mode="w|",
            format=tarfile.PAX_FORMAT,  # type: ignore[call-overload]
            bufsize=BUFFER_SIZE,
            copybufsize=BUFFER_SIZE,
        ) as tar:
            for name in SEALED_TAG_FILES:
                if (bag_dir / name).exists():
                    _add(tar, bag_dir / name, f"{bag_name}/{name}")
            data_dir = tarfile.TarInfo(f"{bag_name}/data")  # present even with no payload
            data_dir.type, data_dir.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(data_dir)
            for record in read_records(records):
                check()
                path = decode_path(record.path)
                _add(tar, bag_dir / path, f"{bag_name}/{path}", expect_size=record.size)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, out)
    return Packed(sink.hexdigest(), sink.size)


def _add(tar: tarfile.TarFile, path: Path, arcname: str, expect_size: int | None = None) -> None:
    with open(path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        if expect_size is not None and st.st_size != expect_size:
            raise ValueError(f"{arcname}: staged size {st.st_size} != recorded {expect_size}")
        info = tarfile.TarInfo(arcname)
        info.size = st.st_size
        info.mtime = int(st.st_mtime)
        info.mode = 0o644
        info.uname = info.gname = ""
        tar.addfile(info, f)
