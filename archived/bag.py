"""The BagIt 1.0 bag (RFC 8493) and its tar: tag files, manifests, packing.

All functions here block; the runner calls each in one worker thread. Payload
digests come from the records the activity tasks wrote while copying, and the
payload's tar members are already in the activities' fragments, so the archive is
`write_head()`'s tag files, the fragments and `END`, concatenated; nothing here
reads the payload except `digest()`, which hashes that concatenation once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .errors import IntegrityError
from .fileio import BUFFER_SIZE, file_sha256, hash_file, scratch_file
from .tarformat import padding, tar_header

BAGIT_TXT = "BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n"
MANIFEST = "manifest-sha256.txt"
TAGMANIFEST = "tagmanifest-sha256.txt"
EVENTS = "archived-events.jsonl"
SIGNATURE = TAGMANIFEST + ".minisig"
TIMESTAMP = TAGMANIFEST + ".tsr"
# Tag files in the order they go into the tar; the tag manifest covers the first four.
TAG_FILES = ("bagit.txt", "bag-info.txt", MANIFEST, EVENTS)
SEALED_TAG_FILES = (*TAG_FILES, TAGMANIFEST, SIGNATURE, TIMESTAMP)
# In bag-info.txt, "rfc3161" when a time-stamp token was asked for: the token is not
# under the signature (it is made over the signed tag manifest), this label is.
TIMESTAMP_LABEL = "Archived-Timestamp"


_PERCENT = re.compile(r"%(0[AaDd]|25)")
_DECODED = {"0a": "\n", "0d": "\r", "25": "%"}


def decode_path(path: str) -> str:
    """The inverse of BagIt's percent-encoding of CR, LF and % (hex digits in either case)."""
    if "%" not in path:
        return path
    return _PERCENT.sub(lambda m: _DECODED[m.group(1).lower()], path)


def record_fields(paths: Iterable[Path]) -> Iterator[list[str]]:
    """Each record's `sha256`, `size` and `path` (BagIt-encoded, with its newline), as
    the activities' writers wrote them, one line a file; streamed, never held whole."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield line.split(" ", 2)


def payload_paths(records: Iterable[Path]) -> Iterator[str]:
    """Each payload file's bag-relative path, from the activities' records."""
    for _, _, path in record_fields(records):
        yield decode_path(path.rstrip("\n"))


@dataclass(frozen=True)
class Oxum:
    bytes: int
    files: int

    def __str__(self) -> str:
        return f"{self.bytes}.{self.files}"


def write_payload_manifest(bag_dir: Path, records: Iterable[Path]) -> Oxum:
    """manifest-sha256.txt from the activity records, streamed; returns Payload-Oxum."""
    with scratch_file(bag_dir / MANIFEST) as out:
        return _payload_manifest(records, out.write)


def payload_manifest(records: Iterable[Path]) -> tuple[bytes, Oxum]:
    """manifest-sha256.txt from the activity records, in memory (a small job's)."""
    lines: list[bytes] = []
    oxum = _payload_manifest(records, lines.append)
    return b"".join(lines), oxum


def _payload_manifest(records: Iterable[Path], write: Callable[[bytes], object]) -> Oxum:
    total = count = 0
    for sha256, size, path in record_fields(records):
        write(f"{sha256}  {path}".encode())
        total += int(size)
        count += 1
    return Oxum(total, count)


def bag_info(
    *,
    job_id: str,
    bagging_date: str,
    oxum: Oxum,
    metadata: dict[str, str],
    timestamped: bool = False,
) -> str:
    lines = [
        f"Bagging-Date: {bagging_date}",
        f"Bag-Software-Agent: archived {__version__}",
        f"External-Identifier: {job_id}",
        f"Payload-Oxum: {oxum}",
        *([f"{TIMESTAMP_LABEL}: rfc3161"] if timestamped else []),
        *(f"{label}: {value}" for label, value in metadata.items()),
    ]
    return "\n".join(lines) + "\n"


def tag_files(info: str, events: Iterable[dict[str, Any]]) -> dict[str, bytes]:
    """bagit.txt, bag-info.txt and the event log: small, made in memory, never staged
    as files of their own (they go into the head, which is)."""
    lines = "".join(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n" for e in events)
    return {
        "bagit.txt": BAGIT_TXT.encode(),
        "bag-info.txt": info.encode("utf-8"),
        EVENTS: lines.encode("utf-8"),
    }


def sign_tags(tags: dict[str, bytes], bag_dir: Path, sign: Callable[[bytes], str]) -> bytes:
    """tagmanifest-sha256.txt over the tag files (the payload manifest, which grows with
    the files, streamed from `bag_dir`) and its signature `sign` makes, added to `tags`;
    returns the tag manifest: what is signed, and what a time-stamp is asked for."""
    lines = []
    for name in TAG_FILES:
        if name in tags:
            digest = hashlib.sha256(tags[name]).hexdigest()
        else:
            digest, _ = file_sha256(bag_dir / name)
        lines.append(f"{digest}  {name}\n")
    manifest = "".join(lines).encode()
    tags[TAGMANIFEST] = manifest
    tags[SIGNATURE] = sign(manifest).encode()
    return manifest


def verify_fragment(
    fragment: Path, records: Path, check: Callable[[], None] = lambda: None
) -> tuple[int, int]:
    """Re-read a tar fragment and match each member to its record, in order: the path,
    the size and the sha256 of its data; (files, bytes) if all match.

    For staging that may not have reached the disk whole: it is not fsynced (the
    copies are), so a restart of the machine can leave holes in it.
    """
    files = total = 0
    with open(fragment, "rb") as raw:
        tar = None  # for an empty fragment (no files found): tarfile calls it an error
        if os.fstat(raw.fileno()).st_size:  # reads `raw`, which this block closes
            tar = tarfile.open(fileobj=raw, mode="r|", errors="surrogateescape")  # noqa: SIM115
        for sha256, size, path in record_fields([records]):
            check()
            name = decode_path(path.rstrip("\n"))
            member = tar.next() if tar is not None else None
            if tar is None or member is None:
                raise IntegrityError(f"{name}: recorded, but not in the staged tar fragment")
            tar.members.clear()  # type: ignore[attr-defined]  # kept by tarfile: memory
            stream = tar.extractfile(member) if member.isreg() else None
            if stream is None or member.name.split("/", 1)[-1] != name:
                raise IntegrityError(f"{name}: the staged tar fragment has {member.name} instead")
            digest = hashlib.sha256()
            while chunk := stream.read(BUFFER_SIZE):
                digest.update(chunk)
            if member.size != int(size) or digest.hexdigest() != sha256:
                raise IntegrityError(
                    f"{name}: staged data does not match what was read from the source "
                    f"(sha256 {digest.hexdigest()}, {member.size} bytes; "
                    f"recorded {sha256}, {size} bytes)"
                )
            files += 1
            total += member.size
        if tar is not None and (extra := tar.next()) is not None:
            raise IntegrityError(f"the staged tar fragment holds {extra.name}, never recorded")
    return files, total


@dataclass(frozen=True)
class Packed:
    sha256: str
    size: int


def write_head(bag_dir: Path, tags: dict[str, bytes], bag_name: str, out: Path) -> None:
    """The members that open the archive: the tag files (from `tags`, else from
    `bag_dir`: the payload manifest), then the `data/` directory.

    The payload members follow in the activities' fragments, then `END`. Fsynced with
    its directory: what the sealed archive is made of must survive a restart of the
    machine (the fragments are read again then; `END`, shared, is fsynced when made).
    """
    mtime = int(time.time())
    with scratch_file(out, durable=True) as f:
        for name in SEALED_TAG_FILES:
            if name in tags:
                f.write(tar_header(f"{bag_name}/{name}", len(tags[name]), mtime))
                f.write(tags[name])
                f.write(padding(len(tags[name])))
                continue
            if name != MANIFEST:
                continue  # the time-stamp token, when no TSA is configured
            with open(bag_dir / name, "rb") as src:
                st = os.fstat(src.fileno())
                f.write(tar_header(f"{bag_name}/{name}", st.st_size, int(st.st_mtime)))
                shutil.copyfileobj(src, f, BUFFER_SIZE)
                f.write(padding(st.st_size))
        data_dir = tarfile.TarInfo(f"{bag_name}/data")  # present even with no payload
        data_dir.type, data_dir.mode, data_dir.mtime = tarfile.DIRTYPE, 0o755, mtime
        data_dir.uname = data_dir.gname = ""
        f.write(data_dir.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))


def digest(parts: Iterable[Path], check: Callable[[], None] = lambda: None) -> Packed:
    """The sha256 and size of the archive the concatenation of `parts` is."""
    sha = hashlib.sha256()
    size = sum(hash_file(part, sha, check=check) for part in parts)
    return Packed(sha.hexdigest(), size)
