"""Reading a bag as it is stored: a directory, a tar (plain, gzip, bzip2 or xz) or a zip,
never extracted to disk, never following a link.

`open_bag()` reads through the bag once and returns `Contents`: its tag files (every
file outside data/), each read again when it is needed, and its payload files in a
`PayloadIndex` (SQLite in a temporary file: memory stays flat however many members
there are). A payload file is hashed as it is read, with the algorithms of the payload
manifests known by then: all of them in a directory and a zip, whose names come first;
in a tar, those of the manifests that come before it. `Contents.complete()` then hashes
what a later manifest needs, going back by member offset in a plain tar (reading the
stream once more in a compressed one), and never with an algorithm no manifest lists.

Bad input is never an exception: it is reported through `problem(path, message)`, with
path "" for the bag as a whole.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import io
import lzma
import os
import re
import stat
import struct
import tarfile
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol, cast

from . import cpus
from .bagindex import PayloadIndex, Rehash

CHUNK = 1024 * 1024
# A tag file of a compressed tar is kept in memory up to this size, else in a temporary file.
SPOOL_IN_MEMORY = 1024 * 1024
MANIFEST_NAME = re.compile(r"(tag)?manifest-([A-Za-z0-9_-]+)\.txt")

Problem = Callable[[str, str], None]

# -- algorithms --------------------------------------------------------------------------


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def digest(self) -> bytes: ...


@dataclass(frozen=True)
class Algorithm:
    key: str  # one name however a manifest spells it: "sha3256" for sha3-256 and sha3_256
    new: Callable[[], Hasher]
    hex_length: int


# RFC 8493 section 2.4 names an algorithm in lower case without punctuation; other tools
# write hashlib's names (bagit-python: sha3_256). Both come down to these keys.
_HASHLIB = {
    "md5": "md5",
    "sha1": "sha1",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "sha512224": "sha512_224",
    "sha512256": "sha512_256",
    "sha3224": "sha3_224",
    "sha3256": "sha3_256",
    "sha3384": "sha3_384",
    "sha3512": "sha3_512",
    "ripemd160": "ripemd160",
    "sm3": "sm3",
}
# SHAKE has no fixed length: the one RFC 8702 gives each (the full strength of each).
_SHAKE = {"shake128": 32, "shake256": 64}


class _Shake:
    def __init__(self, name: str, length: int) -> None:
        self.hash, self.length = hashlib.new(name), length

    def update(self, data: bytes | memoryview, /) -> None:
        self.hash.update(data)

    def digest(self) -> bytes:
        return self.hash.digest(self.length)  # type: ignore[call-arg]


@functools.cache
def algorithm(name: str) -> Algorithm | None:
    """The algorithm a manifest named manifest-`name`.txt uses, or None if hashlib here
    cannot compute it."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    new: Callable[[], Hasher]
    if key in _HASHLIB:
        new = functools.partial(hashlib.new, _HASHLIB[key])
    elif key in _SHAKE:
        new = functools.partial(_Shake, key[:5] + "_" + key[5:], _SHAKE[key])
    elif match := re.fullmatch(r"blake2([bs])(\d{0,3})", key):
        largest = 512 if match.group(1) == "b" else 256
        bits = int(match.group(2) or largest)
        if bits % 8 or not 8 <= bits <= largest:
            return None
        key = f"blake2{match.group(1)}{bits}"
        new = functools.partial(getattr(hashlib, f"blake2{match.group(1)}"), digest_size=bits // 8)
    else:
        return None
    try:
        size = len(new().digest())
    except ValueError:  # not in this OpenSSL
        return None
    return Algorithm(key, new, 2 * size)


_buffers = threading.local()  # one read buffer a thread, not one a file


def hash_stream(stream: IO[bytes], algorithms: Iterable[Algorithm]) -> tuple[int, dict[str, bytes]]:
    """Size and digests of what `stream` holds, read once."""
    hashers = [(a.key, a.new()) for a in algorithms]
    size = 0
    buffer = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = memoryview(bytearray(CHUNK))
    while n := stream.readinto(buffer):  # type: ignore[attr-defined]
        size += n
        _update([h for _, h in hashers], buffer[:n])
    return size, {k: h.digest() for k, h in hashers}


_pool: ThreadPoolExecutor | None = None
PARALLEL_FROM = 256 * 1024  # below this, handing a chunk to a thread costs more than it saves


def _update(hashers: list[Hasher], data: memoryview) -> None:
    """Feed `data` to every hasher; to several at once on as many cores (hashlib lets go
    of the GIL), where bagit-python hashes one algorithm after the other."""
    if len(hashers) < 2 or len(data) < PARALLEL_FROM:
        for h in hashers:
            h.update(data)
        return
    global _pool
    if _pool is None:
        # it only hashes big chunks: on every CPU, in a daemon that pins its threads too
        _pool = ThreadPoolExecutor(
            max_workers=max(1, (os.cpu_count() or 2) - 1), initializer=cpus.widen
        )
    others = [_pool.submit(h.update, data) for h in hashers[1:]]
    hashers[0].update(data)
    for done in others:
        done.result()


def payload_algorithms(names: Iterable[str]) -> list[Algorithm]:
    """The computable algorithms of the payload manifests among the tag file `names`."""
    found: dict[str, Algorithm] = {}
    for name in names:
        match = MANIFEST_NAME.fullmatch(name)
        if match and not match.group(1) and (a := algorithm(match.group(2))):
            found[a.key] = a
    return list(found.values())


def is_payload(path: str) -> bool:
    return path.startswith("data/")


# -- what was read -----------------------------------------------------------------------


@dataclass
class TagFile:
    size: int
    open: Callable[[], IO[bytes]]  # a new stream over its bytes, from the start


@dataclass
class Contents:
    name: str  # the bag directory's
    index: PayloadIndex
    source: Source
    container: str  # "tar", "zip", "directory"
    tags: dict[str, TagFile] = field(default_factory=dict)
    rejected: set[str] = field(default_factory=set)  # tag paths that are not regular files
    data_dir: bool = False
    warnings: list[str] = field(default_factory=list)  # about how it is stored
    # (member name, what is wrong) where a serialization is not one directory, the bag
    shape: list[tuple[str, str]] = field(default_factory=list)

    def close(self) -> None:
        self.source.close()
        self.index.close()

    def complete(self, problem: Problem) -> None:
        """Hash the payload files with what the manifests need and they were not read with."""
        digests: list[tuple[int, str, bytes]] = []
        try:
            for item, stream in self.source.reopen(self.index.to_rehash(), problem):
                try:
                    _, found = hash_stream(stream, [_by_key(k) for k in item.algorithms])
                except READ_ERRORS as exc:
                    problem(item.path, f"cannot read: {read_error(exc)}")
                    continue
                digests += [(item.id, k, v) for k, v in found.items()]
                if len(digests) >= 4096:
                    self.index.add_digests(digests)
                    digests.clear()
        except READ_ERRORS as exc:
            problem("", f"cannot read the bag again: {read_error(exc)}")
        self.index.add_digests(digests)
        self.index.share_linked()


def _by_key(key: str) -> Algorithm:
    found = algorithm(key)
    assert found is not None, key
    return found


def read_error(exc: BaseException) -> str:
    """Why a read failed, without a file name: the report names the file."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class Source(Protocol):
    def reopen(
        self, items: Iterable[Rehash], problem: Problem
    ) -> Iterator[tuple[Rehash, IO[bytes]]]: ...

    def close(self) -> None: ...


READ_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    EOFError,
    OSError,
    zlib.error,
    lzma.LZMAError,
    ValueError,
    RecursionError,
    NotImplementedError,
)


def open_bag(
    path: Path, problem: Problem, unread: Callable[[str], None] | None = None
) -> Contents | None:
    """Read the bag at `path` (see the module docstring); None if nothing of a bag was
    found, which has been reported: to `unread`, if given, where it is an archive in a
    format this module does not read (7-Zip, RAR, zstd), which may well hold a bag."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        problem("", f"{path}: {read_error(exc)}")
        return None
    if stat.S_ISDIR(mode):
        return _Directory(path).read(problem)
    if not stat.S_ISREG(mode):
        problem("", f"{path}: neither a file nor a bag directory")
        return None
    try:
        kind = _serialization(path)
    except OSError as exc:
        problem("", f"{path}: {read_error(exc)}")
        return None
    if kind == "zip":
        return _Zip(path).read(problem)
    if kind in ("tar", "gz", "bz2", "xz"):
        return _Tar(path, kind).read(problem)
    message = (
        f"not a bag serialization I read ({kind}): a bag is read from a directory, a tar "
        "(plain, gzip, bzip2 or xz), or a zip"
    )
    if unread is not None and kind in _UNREAD:
        unread(message)
    else:
        problem("", message)
    return None


_MAGIC = [
    (b"\x1f\x8b", "gz"),
    (b"BZh", "bz2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!", "a RAR archive"),
]
_UNREAD = {"zstd-compressed", "a 7-Zip archive", "a RAR archive"}  # Archivematica: 7-Zip


def _serialization(path: Path) -> str:
    """What `path` holds, by its first bytes: tar, gz, bz2, xz, zip, or a description."""
    with open(path, "rb") as f:
        head = f.read(tarfile.BLOCKSIZE)
    if not head:
        return "an empty file"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if len(head) == tarfile.BLOCKSIZE and _is_tar_header(head):
        return "tar"
    if zipfile.is_zipfile(path):  # a zip with something before it (self-extracting)
        return "zip"
    return "neither a tar nor a zip"


def _is_tar_header(block: bytes) -> bool:
    """A tar header: its checksum over the block (with the field as blanks) matches."""
    try:
        stored = int(block[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    return stored == unsigned


# -- members of a serialized bag ---------------------------------------------------------


ONLY_REGULAR = ": only regular files and directories are allowed"
# Where macOS's Archive Utility puts the resource forks of what it zips, beside the bag.
MACOS_ZIP_DIR = "__MACOSX"


def _reject(contents: Contents, problem: Problem, rel: str, shown: str, why: str) -> None:
    """A file of the bag that is there but is not read as one (`why`): a payload file is
    present but irregular, a tag file neither present nor missing."""
    problem(rel or shown, why)
    if is_payload(rel):
        contents.index.add(rel, regular=False)
    else:
        contents.rejected.add(rel)


class _Members:
    """Where each member of a tar or zip goes in the bag: under one top directory, by
    safe names only; what is kept of it."""

    def __init__(self, contents: Contents, problem: Problem) -> None:
        self.contents, self.problem = contents, problem
        self.top: str | None = None
        self.dot = False  # the first member was "./"
        self.algorithms: list[Algorithm] = []  # of the payload manifests met so far
        # Files at the top met before the bag's directory is known (`tar -cf x.tar *` in
        # the bag puts README before bagit.txt): tag files if the bag turns out to be there.
        self.waiting: list[tuple[str, TagFile]] = []

    def undecided(self, name: str) -> bool:
        """Whether member `name` is a file at the top that only the members after it
        tell the place of: beside the bag's directory, or a tag file of a bag that is
        there, serialized from inside its directory."""
        parts = [p for p in name.split("/") if p not in ("", ".")]
        return (
            self.top is None
            and not name.startswith("/")
            and len(parts) == 1
            and parts[0] not in ("..", MACOS_ZIP_DIR)
            and not _is_bag_file(parts[0])
        )

    def place(self, name: str, is_dir: bool) -> str | None:
        """The bag-relative path of member `name` ("" for the bag directory), or None
        when it is skipped (reported as a problem, or in `Contents.shape`)."""
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if name.startswith("/"):
            self.problem(name, "unsafe member name: absolute path")
            return None
        if ".." in parts:
            self.problem(name, "unsafe member name: contains '..'")
            return None
        if not parts:
            if not is_dir:
                self.problem(name, "member without a name")
            elif self.top is None:
                self.dot = True  # "./" first: `tar -C dir -cf x.tar .`
            return None
        if self.top is None and parts[0] != MACOS_ZIP_DIR:
            # The bag's own files at the top: it was serialized from inside its directory
            # (after "./", "data" too: a bag named data is less likely).
            if (len(parts) == 1 and not is_dir and _is_bag_file(parts[0])) or (
                self.dot and parts[0] == "data"
            ):
                self.top = ""
                self.contents.shape.append(
                    ("", f"the bag's files are at the top of the {self.contents.container}")
                )
            elif len(parts) > 1 or is_dir:
                self.top = self.contents.name = parts[0]
            if self.top is not None:
                for waited, file in self.waiting:
                    if (rel := self.place(waited, False)) is not None:
                        self.tag(rel, waited, file)
                self.waiting.clear()
        if (rel := self.rel(name)) is None:
            where = f"the bag directory {self.top}/" if self.top else "a bag directory"
            self.contents.shape.append((name, f"outside {where}"))
            return None
        if rel == "data" or is_payload(rel):
            self.contents.data_dir = True
        return rel

    def rel(self, name: str) -> str | None:
        """Member `name`'s path in the bag, once the bag's directory is known; None if
        it is not in it."""
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if self.top == "" and ".." not in parts and not name.startswith("/"):
            return "/".join(parts)
        if self.top and parts[:1] == [self.top] and ".." not in parts:
            return "/".join(parts[1:])
        return None

    def reject(self, rel: str, shown: str, why: str) -> None:
        _reject(self.contents, self.problem, rel, shown, why)

    def tag(self, rel: str, name: str, file: TagFile) -> None:
        if not rel:
            self.problem(name, "a file where the bag directory should be")
        elif rel in self.contents.tags or rel in self.contents.rejected:
            self.problem(rel, f"duplicate member in the {self.contents.container}")
        else:
            self.contents.tags[rel] = file
            known = {a.key for a in self.algorithms}
            self.algorithms += [a for a in payload_algorithms([rel]) if a.key not in known]


def _is_bag_file(name: str) -> bool:
    """A name only a bag's own directory holds."""
    return name in ("bagit.txt", "bag-info.txt", "fetch.txt") or bool(MANIFEST_NAME.fullmatch(name))


# -- tar ---------------------------------------------------------------------------------


class _Slice(io.RawIOBase):
    """`size` bytes at `offset` of the file at `path`: a member, read again."""

    def __init__(self, path: Path | int, offset: int, size: int) -> None:
        self.fd = path if isinstance(path, int) else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.owned = not isinstance(path, int)
        self.pos, self.end = offset, offset + size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        want = min(len(buffer), self.end - self.pos)
        if want <= 0:
            return 0
        data = os.pread(self.fd, want, self.pos)
        if not data:
            raise EOFError(f"unexpected end of data at byte {self.pos}")
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        if self.owned and not self.closed:
            os.close(self.fd)
        super().close()


def _spool(stream: IO[bytes], size: int) -> Callable[[], IO[bytes]]:
    """A tag file of a stream that cannot be read again, kept to be read again."""
    if size <= SPOOL_IN_MEMORY:
        data = stream.read()
        return lambda: io.BytesIO(data)
    spooled = tempfile.TemporaryFile()  # noqa: SIM115  # closed with the process
    while chunk := stream.read(CHUNK):
        spooled.write(chunk)
    spooled.flush()
    return lambda: io.BufferedReader(_Slice(spooled.fileno(), 0, size), CHUNK)


class _Tar:
    def __init__(self, path: Path, compression: str) -> None:
        self.path, self.compression = path, compression
        self.plain = compression == "tar"

    def close(self) -> None:
        pass

    def _open(self, fileobj: IO[bytes]) -> tarfile.TarFile:
        # A plain tar is read by seeking past what is not needed; a compressed one streamed.
        if self.plain:
            return tarfile.open(
                fileobj=fileobj, mode="r:", encoding="utf-8", errors="surrogateescape"
            )
        return _stream(fileobj, self.compression)

    def read(self, problem: Problem) -> Contents | None:
        contents = Contents(self.path.name, PayloadIndex(), self, "tar")
        members = _Members(contents, problem)
        last = ""
        try:
            with open(self.path, "rb") as raw, self._open(raw) as tar:
                while (member := tar.next()) is not None:
                    tar.members.clear()  # type: ignore[attr-defined]  # tarfile keeps them all
                    last = member.name
                    self._member(tar, member, members)
                self._check_end(tar, raw, last, problem)
        except READ_ERRORS as exc:
            if not self.plain and not last and isinstance(exc, tarfile.ReadError):
                problem(
                    "",
                    f"not a bag serialization I read: {read_error(exc)} "
                    "(compressed, but not a tar)",
                )
            else:
                problem("", f"cannot read the tar: {read_error(exc)}")
        contents.index.finish()
        if members.top is None:
            contents.close()
            return None
        return contents

    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo, members: _Members) -> None:
        if members.undecided(member.name) and member.isreg() and not member.issparse():
            members.waiting.append((member.name, self._tag_file(tar, member)))
            return
        rel = members.place(member.name, member.isdir())
        if rel is None or member.isdir():
            return
        if member.islnk() and self._hard_link(member, rel, members):
            return
        if not member.isreg():
            members.reject(rel, member.name, _member_kind(member) + ONLY_REGULAR)
            return
        sparse = member.issparse()
        if is_payload(rel):
            digests = None
            if members.algorithms:  # else it waits for the manifests, unread
                _, digests = hash_stream(_extract(tar, member), members.algorithms)
            members.contents.index.add(
                rel, size=member.size, loc=member.offset_data, sparse=sparse, digests=digests
            )
        else:
            members.tag(rel, member.name, self._tag_file(tar, member))

    def _tag_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> TagFile:
        if self.plain and not member.issparse():
            opener = functools.partial(_buffered_slice, self.path, member.offset_data, member.size)
            return TagFile(member.size, opener)
        return TagFile(member.size, _spool(_extract(tar, member), member.size))

    def _hard_link(self, member: tarfile.TarInfo, rel: str, members: _Members) -> bool:
        """A hard link to a file of the bag met before (GNU tar and bsdtar store a file
        linked twice so, its data once) unpacks to that file: read as a copy of it.
        False if it links to anything else."""
        target = members.rel(member.linkname)
        if target is None or is_payload(target) != is_payload(rel):
            return False
        if is_payload(rel):
            found = members.contents.index.linkable(target)
            if found is None:
                return False
            members.contents.index.add(rel, size=found[1], link=found[0])
        elif (file := members.contents.tags.get(target)) is not None:
            members.tag(rel, member.name, file)
        else:
            return False
        return True

    def _check_end(self, tar: tarfile.TarFile, raw: IO[bytes], last: str, problem: Problem) -> None:
        """tarfile takes a damaged header for the end of the archive: what follows the last
        member must be the zero blocks of a real end."""
        after = f"after {last!r}" if last else "at the start"
        if self.plain:
            end = tar.offset
            size = os.fstat(raw.fileno()).st_size
            if end + tarfile.BLOCKSIZE > size:
                problem(
                    "",
                    f"cannot read the tar: it ends {after} without an end-of-archive "
                    "block: truncated",
                )
                return
            raw.seek(end)
            stream: IO[bytes] = raw
        else:
            stream = tar.fileobj  # type: ignore[assignment]
        while chunk := stream.read(CHUNK):
            if chunk.count(0) != len(chunk):
                problem(
                    "",
                    f"unreadable data {after}: a damaged tar header, or data appended to the tar",
                )
                return

    def reopen(
        self, items: Iterable[Rehash], problem: Problem
    ) -> Iterator[tuple[Rehash, IO[bytes]]]:
        if not self.plain:
            yield from self._restream(items, problem)  # in order of their offsets
            return
        sparse: list[Rehash] = []  # its bytes are not all where its data begins
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for item in items:
                if item.sparse or item.loc is None:
                    sparse.append(item)
                else:
                    yield item, cast(IO[bytes], _Slice(fd, item.loc, item.size))
        finally:
            os.close(fd)
        if sparse:
            yield from self._restream(sparse, problem)

    def _restream(
        self, items: Iterable[Rehash], problem: Problem
    ) -> Iterator[tuple[Rehash, IO[bytes]]]:
        """Read the tar once more from the start, for members by data offset (`items` in
        that order)."""
        wanted = iter(items)
        item = next(wanted, None)
        try:
            with open(self.path, "rb") as raw, _stream(raw, self.compression) as tar:
                while item is not None and (member := tar.next()) is not None:
                    tar.members.clear()  # type: ignore[attr-defined]
                    if member.offset_data == item.loc and member.isreg():
                        yield item, _extract(tar, member)
                        item = next(wanted, None)
        except READ_ERRORS as exc:
            problem("", f"cannot read the tar again: {read_error(exc)}")
        while item is not None:
            problem(item.path, "not found when reading the tar again")
            item = next(wanted, None)


_DECOMPRESSORS: dict[str, Callable[[IO[bytes]], IO[bytes]]] = {
    "tar": lambda raw: raw,
    "gz": lambda raw: cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb")),
    "bz2": lambda raw: bz2.BZ2File(raw, "rb"),
    "xz": lambda raw: lzma.LZMAFile(raw, "rb"),  # noqa: SIM115  # over raw, which the caller closes
}


def _stream(raw: IO[bytes], compression: str) -> tarfile.TarFile:
    """A tar read as a stream, through its compression's own reader: gzip's checks the
    CRC-32 and length that end each gzip member, which tarfile's never reads, once the
    stream is read to its end (`_check_end` does)."""
    return tarfile.open(
        fileobj=_DECOMPRESSORS[compression](raw),
        mode="r|",
        encoding="utf-8",
        errors="surrogateescape",
    )


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    stream = tar.extractfile(member)
    assert stream is not None  # a regular file
    return stream


def _buffered_slice(path: Path, offset: int, size: int) -> IO[bytes]:
    return io.BufferedReader(_Slice(path, offset, size), CHUNK)


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"hard link to {member.linkname!r}"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO"
    return f"unsupported member type {member.type!r}"


# -- zip ---------------------------------------------------------------------------------


class _ZipFile(zipfile.ZipFile):
    """zipfile.ZipFile that reads the central directory an entry at a time (`entries()`)
    instead of keeping them all (about 0.5 KiB each: 570 MB for a million members);
    zipfile still reads the members (`open(info)`). The layout is PKWARE's APPNOTE 6.3,
    sections 4.3.12 (central directory), 4.3.14-16 (end records), 4.5.3 (zip64 extra)."""

    def _RealGetContents(self) -> None:  # what ZipFile.__init__ calls to read the directory
        assert self.fp is not None
        self.cd_start, self.cd_size, self.concat, self.count = _central_directory(self.fp)

    def entries(self) -> Iterator[_Entry]:
        assert isinstance(self.filename, str)
        with open(self.filename, "rb", buffering=CHUNK) as f:
            f.seek(self.cd_start)
            read = 0
            while read < self.cd_size:
                record = f.read(46)
                if len(record) != 46 or record[:4] != b"PK\x01\x02":
                    raise zipfile.BadZipFile("bad central directory entry")
                (made, system, needed, flags, method, time, date, crc, csize, usize) = (
                    struct.unpack("<4x2BHHHHHLLL", record[:28])
                )
                nlen, xlen, clen, disk, _, attributes, offset = struct.unpack(
                    "<HHHHHLL", record[28:46]
                )
                raw_name, extra = f.read(nlen), f.read(xlen)
                f.seek(clen, io.SEEK_CUR)
                read += 46 + nlen + xlen + clen
                if disk or needed > _ZIP_VERSION:
                    raise zipfile.BadZipFile(
                        f"bad central directory entry: on disk {disk}, needs zip version "
                        f"{needed / 10:.1f}"
                    )
                # zipfile's name for it, which open() compares with the local header's
                info = _Entry(raw_name.decode("utf-8" if flags & 0x800 else "cp437", "replace"))
                info.raw_name, info.filename = raw_name, _zip_name(raw_name, flags, system, extra)
                info.create_version, info.create_system, info.extract_version = made, system, needed
                info.flag_bits, info.compress_type, info.CRC = flags, method, crc
                info.external_attr, info.extra = attributes, extra
                info.date_time = (
                    (date >> 9) + 1980, (date >> 5) & 0xF, date & 0x1F,
                    time >> 11, (time >> 5) & 0x3F, (time & 0x1F) * 2,
                )  # fmt: skip
                usize, csize, offset = _zip64(extra, usize, csize, offset)
                info.file_size, info.compress_size = usize, csize
                info.header_offset = offset + self.concat
                if not _fields_fit(extra):
                    raise zipfile.BadZipFile(f"bad extra field of {info.filename!r}")
                yield info
            if read != self.cd_size:
                raise zipfile.BadZipFile("the central directory's entries overrun its size")

    def local_header_differs(self, info: _Entry) -> str | None:
        """How the member's local header disagrees with its central directory entry (a
        reader that streams the zip, as unzip partly and bsdtar wholly do, goes by the
        local header), or None."""
        assert self.fp is not None
        self.fp.seek(info.header_offset)
        header = self.fp.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            return "no local header where the central directory places it"
        needed, flags, method, _, _, crc, csize, usize, nlen, xlen = struct.unpack(
            "<4xHHHHHLLLHH", header
        )
        name, extra = self.fp.read(nlen), self.fp.read(xlen)
        if name != info.raw_name:
            return f"its local header names it {name.decode('utf-8', 'replace')!r}"
        if not _fields_fit(extra) or self.fp.tell() + info.compress_size > self.cd_start:
            return "its local header's extra field or size runs past where it can end"
        if needed > _ZIP_VERSION:
            return f"its local header needs zip version {needed / 10:.1f}"
        if method != info.compress_type or (flags ^ info.flag_bits) & ~_ZIP_FREE_FLAGS:
            return "its local header gives another compression method or flags"
        usize, csize, _ = _zip64(extra, usize, csize, 0)
        # With a data descriptor (flag bit 3) they follow the data, and may be 0 here.
        central = (info.CRC, info.compress_size, info.file_size)
        for here, there in zip((crc, csize, usize), central, strict=True):
            if here != there and not (flags & 0x8 and here == 0):
                return "its local header gives another CRC-32 or size"
        return None


def _fields_fit(extra: bytes) -> bool:
    """Whether an extra field is a run of (id, length, data) records that fits in it
    (APPNOTE 4.5.1), but for fewer than 4 zero bytes of padding."""
    at = 0
    while at + 4 <= len(extra):
        at += 4 + struct.unpack("<H", extra[at + 2 : at + 4])[0]
    return at == len(extra) or (at < len(extra) and not any(extra[at:]))


def _read_to_its_end(stream: IO[bytes]) -> bool:
    """Whether a zip member read to its end used up its compressed bytes and its
    compressed stream ended there. zipfile stops at the size the entry gives and does not
    tell: a damaged end of a deflate stream, or a stored entry's two sizes disagreeing,
    would pass where unzip fails. (zipfile's private state, checked where it is there.)"""
    decompressor = getattr(stream, "_decompressor", None)
    return getattr(stream, "_compress_left", 0) <= 0 and getattr(decompressor, "eof", True)


class _Entry(zipfile.ZipInfo):
    """A central directory entry; `filename` as the bag names it, `raw_name` as stored."""

    __slots__ = ("raw_name",)
    raw_name: bytes


# The highest zip version zipfile reads (6.3), and the flag bits a local header may set
# otherwise than its central entry: 1-2 (how hard deflate tried), 3 (a data descriptor).
_ZIP_VERSION = 63
_ZIP_FREE_FLAGS = 0x000E
# "Version made by" of MS-DOS (FAT), OS/2 HPFS, Windows NTFS and VFAT: names there cannot
# hold "\\", and some Windows zippers wrote it as the separator (against APPNOTE 4.4.17).
_ZIP_WINDOWS = {0, 6, 10, 14}


def _zip_name(raw: bytes, flags: int, system: int, extra: bytes) -> str:
    """A member's name: UTF-8 if flagged so (APPNOTE 4.4.4 bit 11); else from an Info-ZIP
    Unicode Path extra field (4.6.9) if it still matches the name; else UTF-8 if the name
    is that (Info-ZIP's zip, macOS and most Unix zippers write it unflagged), else IBM
    code page 437 as APPNOTE says. Backslashes of Windows zippers read as "/"."""
    if flags & 0x800:
        name = raw.decode("utf-8", "surrogateescape")
    else:
        name = _unicode_path(extra, raw) or ""
        if not name:
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                name = raw.decode("cp437")
    if system in _ZIP_WINDOWS:
        name = name.replace("\\", "/")
    return name


def _unicode_path(extra: bytes, raw: bytes) -> str | None:
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack("<HH", extra[at : at + 4])
        field = extra[at + 4 : at + 4 + length]
        # version 1, the CRC-32 of the name it stands for (else the name was changed since)
        crc = struct.pack("<L", zlib.crc32(raw))
        if tag == 0x7075 and field[:1] == b"\x01" and field[1:5] == crc:
            try:
                return field[5:].decode("utf-8")
            except UnicodeDecodeError:
                return None
        at += 4 + length
    return None


def _central_directory(fp: IO[bytes]) -> tuple[int, int, int, int]:
    """Where the central directory starts, its size, how many bytes come before the
    zip proper (a self-extracting stub), and how many entries the end record counts."""
    end = fp.seek(0, io.SEEK_END)
    tail_start = max(0, end - 22 - 0xFFFF)  # the end record, and a comment of at most 64 KiB
    fp.seek(tail_start)
    tail = fp.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise zipfile.BadZipFile("no end of central directory record")
    disk, cd_disk, here, count, size, offset, comment = struct.unpack(
        "<HHHHLLH", tail[at + 4 : at + 22]
    )
    if at + 22 + comment != len(tail):
        raise zipfile.BadZipFile("the end of central directory record does not end the file")
    record_at = tail_start + at
    locator = tail[at - 20 : at] if at >= 20 else b""
    if locator[:4] == b"PK\x06\x07":  # zip64: the sizes are in the zip64 end record
        (zip64_at,) = struct.unpack("<Q", locator[8:16])
        fp.seek(zip64_at)
        zip64 = fp.read(56)
        if zip64[:4] != b"PK\x06\x06":
            raise zipfile.BadZipFile("bad zip64 end of central directory record")
        disk, cd_disk, here, count, size, offset = struct.unpack("<LLQQQQ", zip64[16:56])
        record_at -= 56 + 20
    if disk or cd_disk or here != count:
        raise zipfile.BadZipFile("a zip of several disks (or a damaged end record)")
    concat = record_at - size - offset
    if offset + concat < 0:
        raise zipfile.BadZipFile("bad offset of the central directory")
    return offset + concat, size, concat, count


def _zip64(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """The sizes and offset a zip64 extra field gives for those at their 32-bit maximum."""
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack("<HH", extra[at : at + 4])
        if tag == 1:
            values = iter(
                struct.unpack(f"<{length // 8}Q", extra[at + 4 : at + 4 + length // 8 * 8])
            )
            if usize == 0xFFFFFFFF:
                usize = next(values)
            if csize == 0xFFFFFFFF:
                csize = next(values)
            if offset == 0xFFFFFFFF:
                offset = next(values)
            break
        at += 4 + length
    return usize, csize, offset


class _Zip:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip: _ZipFile | None = None
        self.backslashed = 0  # names with "\\" for "/"

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()

    def read(self, problem: Problem) -> Contents | None:
        contents = Contents(self.path.name, PayloadIndex(), self, "zip")
        members = _Members(contents, problem)
        entries = 0
        readable = True
        try:
            self.zip = _ZipFile(self.path)  # closed by close()
            # The central directory names every member first: the manifests, and whether
            # the bag is in a directory at all, are known before any member is read.
            tops = [i.filename for i in self.zip.entries() if i.filename.count("/") < 2]
            members.algorithms = payload_algorithms(t.partition("/")[2] for t in tops)
            if at_top := [t for t in tops if _is_bag_file(t)]:
                members.algorithms = payload_algorithms(tops)
                members.place(at_top[0], False)
            for info in self.zip.entries():
                entries += 1
                self._member(info, members)
            if entries != self.zip.count:
                problem(
                    "",
                    f"the zip's end record counts {self.zip.count} entries, its central "
                    f"directory holds {entries}",
                )
        except READ_ERRORS as exc:
            problem("", f"cannot read the zip: {read_error(exc)}")
            readable = False
        if self.backslashed:
            contents.warnings.append(
                f"{self.backslashed} member names of the zip use '\\' as the path separator, "
                "as old Windows zippers wrote them (APPNOTE 4.4.17 says '/'); read as '/'"
            )
        contents.index.finish()
        if members.top is None:
            if readable and not entries:
                problem("", "empty archive: no bag directory in the zip")
            contents.close()
            return None
        return contents

    def _member(self, info: _Entry, members: _Members) -> None:
        assert self.zip is not None
        mode = info.external_attr >> 16 if info.create_system == 3 else 0  # from Unix
        windows = info.create_system in _ZIP_WINDOWS
        self.backslashed += windows and b"\\" in info.raw_name
        # MS-DOS attributes: 0x10 a directory
        is_dir = info.is_dir() or stat.S_ISDIR(mode) or bool(windows and info.external_attr & 0x10)
        rel = members.place(info.filename, is_dir)
        if rel is None:
            return
        if differs := self.zip.local_header_differs(info):
            members.reject(rel, info.filename, f"damaged zip entry: {differs}")
            return
        if is_dir:
            return
        if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
            members.reject(rel, info.filename, self._kind(info, mode) + ONLY_REGULAR)
            return
        if info.flag_bits & 0x1:
            members.reject(rel, info.filename, "encrypted member: cannot be read")
            return
        payload = is_payload(rel)
        try:  # a tag file too is read through once, so that zipfile checks its CRC-32
            with self.zip.open(info) as stream:
                _, digests = hash_stream(stream, members.algorithms if payload else ())
                if not _read_to_its_end(stream):
                    raise zipfile.BadZipFile("its compressed data ends elsewhere than it says")
        except READ_ERRORS as exc:
            members.reject(rel, info.filename, f"cannot read: {read_error(exc)}")
            return
        if payload:
            members.contents.index.add(
                rel, size=info.file_size, loc=info.header_offset, digests=digests
            )
        else:
            opener = functools.partial(self.zip.open, info)
            members.tag(rel, info.filename, TagFile(info.file_size, opener))

    def _kind(self, info: zipfile.ZipInfo, mode: int) -> str:
        assert self.zip is not None
        if stat.S_ISLNK(mode):
            target = self.zip.read(info)[:4096].decode("utf-8", "surrogateescape")
            return f"symbolic link to {target!r}"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            return "device file"
        if stat.S_ISFIFO(mode):
            return "FIFO"
        return f"unsupported member type {stat.S_IFMT(mode):o}"

    def reopen(
        self, items: Iterable[Rehash], problem: Problem
    ) -> Iterator[tuple[Rehash, IO[bytes]]]:
        """Only what a tag manifest of an old bag lists is read again (the payload
        manifests were all known before the payload was read): a few files."""
        assert self.zip is not None
        wanted = {item.loc: item for item in items}
        for info in self.zip.entries():
            if (item := wanted.pop(info.header_offset, None)) is not None:
                with self.zip.open(info) as stream:
                    yield item, stream
        for item in wanted.values():
            problem(item.path, "not found when reading the zip again")


# -- directory ---------------------------------------------------------------------------


class _Directory:
    def __init__(self, root: Path) -> None:
        self.root = root

    def close(self) -> None:
        pass

    def read(self, problem: Problem) -> Contents:
        contents = Contents(
            self.root.name or self.root.resolve().name, PayloadIndex(), self, "directory"
        )
        top = self._scan("", contents, problem)
        # The manifests are at the top: each payload file is hashed once, with their algorithms.
        algorithms = payload_algorithms(contents.tags)
        stack = [rel for rel in top]
        while stack:
            for rel in self._scan(stack.pop(), contents, problem, algorithms):
                stack.append(rel)
        contents.index.finish()
        return contents

    def _scan(
        self,
        base: str,
        contents: Contents,
        problem: Problem,
        algorithms: Sequence[Algorithm] = (),
    ) -> list[str]:
        """Read the files of one directory; returns its subdirectories (bag-relative)."""
        directories: list[str] = []
        try:
            entries = os.scandir(self.root / base if base else self.root)
        except OSError as exc:
            problem(base, f"cannot read: {read_error(exc)}")
            return directories
        with entries:
            for entry in entries:
                rel = f"{base}/{entry.name}" if base else entry.name
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    problem(rel, f"cannot read: {read_error(exc)}")
                    continue
                if stat.S_ISDIR(st.st_mode):
                    contents.data_dir |= rel == "data" or is_payload(rel)
                    directories.append(rel)
                elif not stat.S_ISREG(st.st_mode):
                    why = _file_kind(entry.path, st.st_mode) + ONLY_REGULAR
                    _reject(contents, problem, rel, rel, why)
                elif is_payload(rel):
                    contents.data_dir = True
                    try:
                        with _open_regular(entry.path) as f:
                            size, digests = hash_stream(f, algorithms)
                    except OSError as exc:
                        _reject(contents, problem, rel, rel, f"cannot read: {read_error(exc)}")
                        continue
                    contents.index.add(rel, size=size, digests=digests)
                else:
                    opener = functools.partial(_open_regular, entry.path)
                    contents.tags[rel] = TagFile(st.st_size, opener)
        return directories

    def reopen(
        self, items: Iterable[Rehash], problem: Problem
    ) -> Iterator[tuple[Rehash, IO[bytes]]]:
        for item in items:
            try:
                stream = _open_regular(str(self.root / item.path))
            except OSError as exc:
                problem(item.path, f"cannot read: {read_error(exc)}")
                continue
            with stream:
                yield item, stream


def _open_regular(path: str) -> IO[bytes]:
    # Not following a symlink, nor blocking on a FIFO, that replaced the file since.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    f = open(fd, "rb", buffering=CHUNK)  # noqa: SIM115  # the caller closes it
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise OSError(f"{path} is no longer a regular file")
    return f


def _file_kind(full: str, mode: int) -> str:
    if stat.S_ISLNK(mode):
        try:
            return f"symbolic link to {os.readlink(full)!r}"
        except OSError:
            return "symbolic link"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"
