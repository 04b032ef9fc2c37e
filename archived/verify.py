"""Checking an archive, or any BagIt bag, without trusting whoever made it.

`verify_path()` reads a tar as a stream (never extracting it) or walks a bag
directory (never following a symlink), hashing every file once, and returns a
`Report` that names each file that is wrong. Bad input is never an exception:
it is a `Problem`, with path "" when it concerns the archive as a whole.

Tag files are kept in memory (they are small; each is capped), payload files
only as digests. A tar read as a stream cannot be rewound, so a payload file that
comes before the manifests is hashed with every supported algorithm; our own
packer writes the tag files first, so the payload is hashed once with sha256.

With `bag_only`, any BagIt bag is checked, not only ours: a holey bag's fetch.txt
files may be absent, and what other tools and file systems leave (a file listed
twice in another case or Unicode normalization, an operating system's special
files) is a warning. Our own archives keep the strict rules.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import lzma
import os
import re
import stat
import tarfile
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from cryptography import x509

from .bag import EVENTS, MANIFEST, SIGNATURE, TAG_FILES, TAGMANIFEST, TIMESTAMP, decode_path
from .minisign import MinisignError, PublicKey
from .minisign import verify as minisign_verify
from .timestamp import TimestampRefused, check_token

CHUNK = 1024 * 1024
TAG_FILE_LIMIT = 16 * 1024 * 1024
# A payload manifest grows with the payload (about 100 bytes a file).
MANIFEST_LIMIT = 512 * 1024 * 1024
ALGORITHMS = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512")

_MANIFEST_NAME = re.compile(r"(tag)?manifest-([A-Za-z0-9_]+)\.txt")
_BAGIT_LINE = re.compile(r"(BagIt-Version|Tag-File-Character-Encoding): (\S.*)")
_VERSION = re.compile(r"(\d{1,9})\.(\d{1,9})")
_OXUM = re.compile(r"(\d{1,30})\.(\d{1,30})")
_HEX = re.compile(r"[0-9A-Fa-f]+")
_MANIFEST_LINE = re.compile(r"[ \t]*(\S+)[ \t]+(.+)")
_FETCH_LINE = re.compile(r"[ \t]*(\S+)[ \t]+(\d{1,30}|-)[ \t]+(.+)")
# Files an operating system leaves behind (Finder, Explorer, Spotlight), and the
# directories it keeps them in; compared casefolded, as those systems do.
_SPECIAL_FILES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "icon\r"})
_SPECIAL_DIRS = frozenset({".spotlight-v100", ".trashes", ".fseventsd"})


@dataclass
class Problem:
    path: str  # bag-relative path of the bad file, or "" for the archive as a whole
    message: str


@dataclass
class Report:
    bag: str
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    signed_by: str | None = None
    timestamp: str | None = None  # the time-stamp token's genTime, ISO 8601 UTC

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "bag": self.bag,
            "ok": self.ok,
            "files": self.files,
            "bytes": self.bytes,
            "signed_by": self.signed_by,
            "timestamp": self.timestamp,
            "problems": [asdict(p) for p in self.problems],
            "warnings": list(self.warnings),
        }

    def add_problem(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))


def verify_path(
    path: Path,
    *,
    keys: list[PublicKey],
    bag_only: bool = False,
    tsa_ca: list[x509.Certificate] | None = None,
) -> Report:
    """Check the tar or bag directory at `path`; see the module docstring."""
    path = Path(path)
    report = Report(bag=path.name or path.resolve().name)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        report.add_problem("", f"{path}: {exc.strerror or exc}")
        return report
    contents: _Contents | None
    if stat.S_ISDIR(mode):
        contents = _read_directory(path, report)
    elif stat.S_ISREG(mode):
        contents = _read_tar(path, report)
    else:
        report.add_problem("", f"{path}: neither a tar file nor a bag directory")
        return report
    if contents is not None:
        _Checker(contents, report, keys=keys, bag_only=bag_only, tsa_ca=tsa_ca).run()
    return report


# -- reading ---------------------------------------------------------------------------


@dataclass
class _File:
    size: int
    digests: dict[str, str]
    content: bytes | None = None  # tag files no larger than their limit

    def digest(self, algorithm: str) -> str | None:
        if algorithm not in self.digests and self.content is not None:
            self.digests[algorithm] = hashlib.new(algorithm, self.content).hexdigest()
        return self.digests.get(algorithm)


@dataclass
class _Contents:
    files: dict[str, _File] = field(default_factory=dict)  # regular files, bag-relative
    rejected: set[str] = field(default_factory=set)  # present, but not as a regular file
    payload_algorithms: set[str] = field(default_factory=set)  # of the manifests read so far
    data_dir: bool = False

    def payload(self) -> dict[str, _File]:
        return {p: f for p, f in self.files.items() if _is_payload(p)}


def _is_payload(path: str) -> bool:
    return path.startswith("data/")


def _tag_limit(path: str) -> int:
    return MANIFEST_LIMIT if _MANIFEST_NAME.fullmatch(path) else TAG_FILE_LIMIT


def _hash_stream(stream: IO[bytes], algorithms: Iterable[str]) -> _File:
    hashers = [(alg, hashlib.new(alg)) for alg in algorithms]
    size = 0
    while chunk := stream.read(CHUNK):
        size += len(chunk)
        for _, h in hashers:
            h.update(chunk)
    return _File(size, {alg: h.hexdigest() for alg, h in hashers})


def _read_tag_file(stream: IO[bytes], limit: int) -> _File:
    """A tag file's bytes, hashed on demand; past `limit` only its digests, in every
    algorithm, as any tag manifest may list it."""
    kept = bytearray()
    while chunk := stream.read(CHUNK):
        kept += chunk
        if len(kept) > limit:
            hashers = [(alg, hashlib.new(alg, kept)) for alg in ALGORITHMS]
            size = len(kept)
            del kept
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                for _, h in hashers:
                    h.update(chunk)
            return _File(size, {alg: h.hexdigest() for alg, h in hashers})
    return _File(len(kept), {}, bytes(kept))


def _read_file(stream: IO[bytes], rel: str, contents: _Contents) -> None:
    if _is_payload(rel):
        algorithms = contents.payload_algorithms or set(ALGORITHMS)
        contents.files[rel] = _hash_stream(stream, algorithms | {"sha256"})
        return
    contents.files[rel] = _read_tag_file(stream, _tag_limit(rel))
    match = _MANIFEST_NAME.fullmatch(rel)
    if match and not match.group(1) and match.group(2) in ALGORITHMS:
        contents.payload_algorithms.add(match.group(2))


def _read_tar(path: Path, report: Report) -> _Contents | None:
    contents = _Contents()
    top: str | None = None
    seen: set[str] = set()
    try:
        with tarfile.open(path, "r|*", encoding="utf-8", errors="surrogateescape") as tar:
            last = ""
            for member in tar:
                name = last = member.name
                parts = [p for p in name.split("/") if p not in ("", ".")]
                if name.startswith("/"):
                    report.add_problem(name, "unsafe member name: absolute path")
                    continue
                if ".." in parts:
                    report.add_problem(name, "unsafe member name: contains '..'")
                    continue
                if not parts:
                    if not member.isdir():
                        report.add_problem(name, "member without a name")
                    continue
                if top is None and (len(parts) > 1 or member.isdir()):
                    top = parts[0]
                    report.bag = top
                if parts[0] != top:
                    where = f"the bag directory {top}/" if top else "a bag directory"
                    report.add_problem(
                        name, f"outside {where}: every member must be under one top directory"
                    )
                    continue
                rel = "/".join(parts[1:])
                shown = rel or name
                if rel in seen:
                    report.add_problem(shown, "duplicate member in the tar")
                    continue
                seen.add(rel)
                if member.isdir():
                    contents.data_dir |= rel == "data"
                    continue
                if not member.isreg():
                    report.add_problem(
                        shown,
                        _member_kind(member) + ": only regular files and directories are allowed",
                    )
                    contents.rejected.add(rel)
                    continue
                if not rel:
                    report.add_problem(name, "a file where the bag directory should be")
                    continue
                contents.data_dir |= _is_payload(rel)
                stream = tar.extractfile(member)
                if stream is None:  # not reachable for a regular file
                    report.add_problem(shown, "cannot read member")
                    continue
                _read_file(stream, rel, contents)
            # tarfile takes a damaged header for the end of the archive; what follows it
            # is not the zero padding a real end has.
            if _rest_is_not_zeros(tar):
                after = f"after {last!r}" if last else "at the start"
                report.add_problem(
                    "",
                    f"unreadable data {after}: a damaged tar header, or data appended to the tar",
                )
    except (
        tarfile.TarError,
        EOFError,
        OSError,
        zlib.error,
        lzma.LZMAError,
        ValueError,
        RecursionError,
    ) as exc:
        report.add_problem("", f"cannot read the tar: {exc or type(exc).__name__}")
    if top is None:
        if not report.problems:
            report.add_problem("", "empty archive: no bag directory in the tar")
        return None
    contents.data_dir |= any(r.startswith("data/") for r in contents.rejected)
    return contents


def _rest_is_not_zeros(tar: tarfile.TarFile) -> bool:
    stream = tar.fileobj
    if stream is None:
        return False
    while chunk := stream.read(CHUNK):
        if chunk.count(0) != len(chunk):
            return True
    return False


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


def _read_directory(root: Path, report: Report) -> _Contents:
    contents = _Contents()
    payload: list[str] = []

    def onerror(exc: OSError) -> None:
        where = os.path.relpath(exc.filename, root) if exc.filename else ""
        report.add_problem(where.replace(os.sep, "/"), f"cannot read: {exc.strerror or exc}")

    # os.walk lists a symlink to a directory among dirnames, but never enters it.
    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        dirnames.sort()
        base = os.path.relpath(dirpath, root)
        for name in sorted([*dirnames, *filenames]):
            rel = name if base == "." else f"{base.replace(os.sep, '/')}/{name}"
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except OSError as exc:
                report.add_problem(rel, f"cannot read: {exc.strerror or exc}")
                continue
            if stat.S_ISDIR(st.st_mode):
                contents.data_dir |= rel == "data"
            elif stat.S_ISREG(st.st_mode):
                if _is_payload(rel):
                    payload.append(rel)
                else:
                    _read_path(full, rel, contents, report)
            else:
                report.add_problem(
                    rel,
                    _file_kind(full, st.st_mode) + ": only regular "
                    "files and directories are allowed",
                )
                contents.rejected.add(rel)
    # The manifests are read by now, so each payload file is hashed once, with their algorithms.
    for rel in payload:
        _read_path(os.path.join(root, rel), rel, contents, report)
    return contents


def _read_path(full: str, rel: str, contents: _Contents, report: Report) -> None:
    try:
        # Not following a symlink, nor blocking on a FIFO, that replaced the file since.
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb", buffering=0) as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{rel} is no longer a regular file")
            _read_file(f, rel, contents)
    except OSError as exc:
        report.add_problem(rel, f"cannot read: {exc.strerror or exc}")
        contents.rejected.add(rel)


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


# -- checking --------------------------------------------------------------------------


@dataclass
class _Manifest:
    name: str
    algorithm: str
    entries: dict[str, str]  # bag-relative path -> lowercase hex digest


class _Checker:
    def __init__(
        self,
        contents: _Contents,
        report: Report,
        *,
        keys: list[PublicKey],
        bag_only: bool,
        tsa_ca: list[x509.Certificate] | None = None,
    ) -> None:
        self.tsa_ca = tsa_ca
        self.contents = contents
        self.files = contents.files
        self.report = report
        self.keys = keys
        self.bag_only = bag_only
        self.encoding = "utf-8"
        self.version: tuple[int, int] = (1, 0)
        self.missing: set[str] = set()  # required files already reported missing
        self.reported: set[tuple[str, str]] = set()
        self.oxum: tuple[str, int, int] | None = None  # as declared, to check after the payload
        self.fetch: dict[str, int | None] = {}  # fetch.txt: path -> length, None for "-"
        self.holes: dict[str, int | None] = {}  # ... those not present in the payload
        self.absent_special: set[str] = set()  # special system files listed, not present

    def problem(self, path: str, message: str) -> None:
        if (path, message) not in self.reported:
            self.reported.add((path, message))
            self.report.add_problem(path, message)

    def run(self) -> None:
        payload = self.contents.payload()
        self.report.files = len(payload)
        self.report.bytes = sum(f.size for f in payload.values())
        self.check_bagit_txt()
        self.check_layout()
        self.check_bag_info()
        if self.bag_only:
            self.check_fetch(payload)
        manifests, tagmanifests = self.load_manifests()
        self.check_payload(payload, manifests)
        self.check_oxum()
        for manifest in tagmanifests:
            self.check_tag_manifest(manifest)
        if not self.bag_only:
            self.check_archived(tagmanifests)

    # The tag files as text ----------------------------------------------------------

    def content(self, name: str, *, required: bool) -> bytes | None:
        file = self.files.get(name)
        if file is None:
            if required and name not in self.contents.rejected | self.missing:
                self.problem(name, "missing")
                self.missing.add(name)
            return None
        if file.content is None:
            self.problem(name, f"larger than {_tag_limit(name)} bytes; not read")
        return file.content

    def text(self, name: str, *, required: bool) -> str | None:
        data = self.content(name, required=required)
        if data is None:
            return None
        try:
            text = data.decode(self.encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            self.problem(name, f"not valid {self.encoding}: {exc}")
            return None
        if text.startswith("\ufeff"):
            self.report.warnings.append(f"{name}: starts with a byte-order mark")
            text = text[1:]
        return text

    def check_bagit_txt(self) -> None:
        data = self.content("bagit.txt", required=True)
        if data is None:
            return
        if data.startswith(codecs.BOM_UTF8):
            self.problem("bagit.txt", "starts with a byte-order mark")
            data = data[len(codecs.BOM_UTF8) :]
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            self.problem("bagit.txt", f"not valid UTF-8: {exc}")
            return
        tags: dict[str, str] = {}
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            match = _BAGIT_LINE.fullmatch(line)
            if match is None:
                self.problem(
                    "bagit.txt",
                    f"line {number}: {line!r} is not "
                    "'BagIt-Version: M.N' or 'Tag-File-Character-Encoding: ENCODING'",
                )
            else:
                tags[match.group(1)] = match.group(2).strip()
        version = tags.get("BagIt-Version")
        if version is None:
            self.problem("bagit.txt", "does not declare BagIt-Version")
        elif (found := _VERSION.fullmatch(version)) is None:
            self.problem("bagit.txt", f"BagIt-Version {version!r} is not a M.N number")
        else:
            self.version = (int(found.group(1)), int(found.group(2)))
            if not (0, 96) <= self.version < (2, 0):
                self.problem("bagit.txt", f"unsupported BagIt-Version {version}")
        encoding = tags.get("Tag-File-Character-Encoding")
        if encoding is None:
            self.problem("bagit.txt", "does not declare Tag-File-Character-Encoding")
            return
        try:
            codecs.lookup(encoding)
        except LookupError:
            self.problem("bagit.txt", f"unknown Tag-File-Character-Encoding {encoding!r}")
            return
        self.encoding = encoding

    def check_layout(self) -> None:
        if "data" in self.files:
            self.problem("data", "is a file; the payload directory must be a directory")
        elif (
            not self.contents.data_dir
            and not self.contents.payload()
            and "data" not in self.contents.rejected
        ):
            self.problem("data", "payload directory missing")
        if "fetch.txt" in self.files and not self.bag_only:
            self.problem(
                "fetch.txt", "the bag lists files to fetch; only complete bags can be verified"
            )

    def check_bag_info(self) -> None:
        text = self.text("bag-info.txt", required=not self.bag_only)
        if text is None:
            return
        info = _parse_tags(text, lambda m: self.problem("bag-info.txt", m))
        oxums = info.get("Payload-Oxum", [])
        if not oxums:
            if not self.bag_only:
                self.problem("bag-info.txt", "has no Payload-Oxum")
            return
        if len(set(oxums)) > 1:
            self.problem("bag-info.txt", f"declares several Payload-Oxum values: {oxums}")
            return
        match = _OXUM.fullmatch(oxums[0])
        if match is None:
            self.problem("bag-info.txt", f"malformed Payload-Oxum {oxums[0]!r}")
            return
        self.oxum = (oxums[0], int(match.group(1)), int(match.group(2)))

    def check_fetch(self, payload: dict[str, _File]) -> None:
        """A holey bag (bag_only): what fetch.txt lists may be absent from the payload,
        but each line must name a file in the payload directory."""
        text = self.text("fetch.txt", required=False)
        if text is None:
            return
        for number, line in enumerate(_lines(text), 1):
            if not line.strip():
                continue
            match = _FETCH_LINE.fullmatch(line)
            if match is None:
                self.problem("fetch.txt", f"line {number}: not '<url> <length> <path>'")
                continue
            _, length, raw_path = match.groups()
            if self.version < (1, 0):
                raw_path = raw_path.strip()
            path = _normalize(decode_path(raw_path))
            if path is None:
                self.problem("fetch.txt", f"line {number}: path {raw_path!r} is outside the bag")
                continue
            if not _is_payload(path):
                self.problem(
                    "fetch.txt", f"line {number}: {path} is not in the payload directory data/"
                )
                continue
            if path in self.fetch:
                self.report.warnings.append(f"{path}: listed twice in fetch.txt")
            self.fetch[path] = None if length == "-" else int(length)
        self.holes = {
            p: n
            for p, n in self.fetch.items()
            if p not in payload and p not in self.contents.rejected
        }
        if self.holes:
            self.report.warnings.append(
                f"holey bag: {len(self.holes)} files listed in fetch.txt are not present "
                "(their checksums are not checked)"
            )

    def check_oxum(self) -> None:
        if self.oxum is None:
            return
        text, *declared = self.oxum
        unknown = sum(n is None for n in self.holes.values())
        if unknown:
            self.report.warnings.append(
                f"bag-info.txt: Payload-Oxum {text} not checked: fetch.txt gives no "
                f"length for {unknown} files not present"
            )
            return
        actual = [
            self.report.bytes + sum(n or 0 for n in self.holes.values()),
            self.report.files + len(self.holes),
        ]
        if declared == actual:
            return
        special = len(self.absent_special)
        if special and declared == [actual[0], actual[1] + special]:
            # Their sizes are unknown; the byte count must match without them.
            self.report.warnings.append(
                f"bag-info.txt: Payload-Oxum {text} counts {special} special system "
                "files that are not present"
            )
            return
        where = " and fetch.txt" if self.holes else ""
        self.problem(
            "bag-info.txt",
            f"Payload-Oxum {text} does not match the "
            f"payload{where}: {actual[0]} bytes in {actual[1]} files",
        )

    # Manifests ----------------------------------------------------------------------

    def load_manifests(self) -> tuple[list[_Manifest], list[_Manifest]]:
        manifests: list[_Manifest] = []
        tagmanifests: list[_Manifest] = []
        for name in sorted(self.files):
            match = _MANIFEST_NAME.fullmatch(name)
            if match is None:
                continue
            algorithm = match.group(2)
            if algorithm not in ALGORITHMS:
                self.report.warnings.append(
                    f"{name}: algorithm {algorithm} not supported; not checked"
                )
                continue
            text = self.text(name, required=True)
            if text is None:
                continue
            manifest = self.parse_manifest(name, algorithm, text, tag=bool(match.group(1)))
            (tagmanifests if match.group(1) else manifests).append(manifest)
        if not self.bag_only:
            if MANIFEST not in self.files:
                self.content(MANIFEST, required=True)
        elif not any(n.startswith("manifest-") for n in [*self.files, *self.contents.rejected]):
            self.problem("", "no payload manifest (manifest-<algorithm>.txt)")
        return manifests, tagmanifests

    def parse_manifest(self, name: str, algorithm: str, text: str, *, tag: bool) -> _Manifest:
        size = hashlib.new(algorithm).digest_size * 2
        entries: dict[str, str] = {}
        starred = 0
        reworded: list[tuple[str, str]] = []  # (as written, as read) for paths not in plain form
        for number, line in enumerate(_lines(text), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            match = _MANIFEST_LINE.fullmatch(line)
            if match is None:
                self.problem(name, f"line {number}: not '<checksum>  <path>'")
                continue
            checksum, raw_path = match.groups()
            if self.version < (1, 0):
                # Older bags came from md5sum-like tools: "*" marks binary mode, and
                # trailing blanks were not significant. In 1.0 the path is exact.
                raw_path = raw_path.strip()
                if raw_path.startswith("*"):
                    starred += 1
                    raw_path = raw_path[1:]
            decoded = decode_path(raw_path)
            digest, path = checksum.lower(), _normalize(decoded)
            if len(digest) != size or not _HEX.fullmatch(digest):
                self.problem(name, f"line {number}: {checksum!r} is not a {algorithm} checksum")
                continue
            if path is None:
                self.problem(name, f"line {number}: path {raw_path!r} is outside the bag")
                continue
            if not tag and not _is_payload(path):
                self.problem(name, f"line {number}: {path} is not in the payload directory data/")
                continue
            if path != decoded:
                reworded.append((raw_path, path))
            if path in entries:
                if entries[path] != digest:
                    self.problem(path, f"listed twice in {name} with different checksums")
                elif self.version >= (1, 0):
                    self.problem(path, f"listed twice in {name}")
                else:
                    self.report.warnings.append(f"{path}: listed twice in {name}")
                continue
            entries[path] = digest
        if starred:
            self.report.warnings.append(
                f"{name}: {starred} lines mark the path with '*', as md5sum does for "
                "binary mode; read without it"
            )
        if reworded:
            written, read = reworded[0]
            self.report.warnings.append(
                f"{name}: {len(reworded)} paths not written as plain bag-relative paths "
                f"(e.g. {written!r}, read as {read!r})"
            )
        return _Manifest(name, algorithm, entries)

    def check_payload(self, payload: dict[str, _File], manifests: list[_Manifest]) -> None:
        by_form = {unicodedata.normalize("NFC", p): p for p in payload}
        by_fold: dict[str, list[str]] = {}
        for p in payload:
            by_fold.setdefault(_fold(p), []).append(p)
        missing: dict[str, list[str]] = {}
        unlisted: dict[str, list[str]] = {}
        not_fetched: dict[str, list[str]] = {}  # holes a manifest does not list
        excused: dict[tuple[str, str], list[str]] = {}  # (path, why) -> manifest names
        mismatches: list[Problem] = []
        for manifest in manifests:
            listed: set[str] = set()
            unhashed = 0
            for path, expected in manifest.entries.items():
                actual_path = path
                if path not in payload:
                    other = by_form.get(unicodedata.normalize("NFC", path))
                    if other is None or other in manifest.entries:
                        if path in self.contents.rejected or path in self.holes:
                            continue
                        why = self.excuse_absent(path, expected, manifest, payload, by_fold)
                        if why is None:
                            missing.setdefault(path, []).append(manifest.name)
                        else:
                            excused.setdefault((path, why), []).append(manifest.name)
                        continue
                    self.report.warnings.append(
                        f"{other}: listed in {manifest.name} under another Unicode normalization"
                    )
                    actual_path = other
                listed.add(actual_path)
                got = payload[actual_path].digest(manifest.algorithm)
                if got is None:
                    unhashed += 1
                elif got != expected:
                    mismatches.append(
                        Problem(
                            actual_path,
                            f"{manifest.algorithm} mismatch: expected {expected}, got {got}",
                        )
                    )
            for path in payload:
                if path not in listed:
                    unlisted.setdefault(path, []).append(manifest.name)
            for path in self.holes:
                if path not in manifest.entries:
                    not_fetched.setdefault(path, []).append(manifest.name)
            if unhashed:
                # Only a tar that holds payload before this manifest gets here.
                self.problem(
                    manifest.name,
                    f"{unhashed} payload files come before it in the "
                    f"tar and were not hashed with {manifest.algorithm}, so they are "
                    "not checked against it",
                )
        for (path, why), names in excused.items():
            self.report.warnings.append(f"{path}: {why} (listed in {', '.join(names)})")
        if self.bag_only:
            self.warn_special_names(payload, by_fold)
        for path, names in missing.items():
            self.problem(path, f"missing from payload (listed in {', '.join(names)})")
        for path, names in unlisted.items():
            self.problem(path, f"not in {', '.join(names)}")
        for path, names in not_fetched.items():
            self.problem(path, f"listed in fetch.txt but not in {', '.join(names)}")
        for mismatch in mismatches:
            self.problem(mismatch.path, mismatch.message)

    def excuse_absent(
        self,
        path: str,
        expected: str,
        manifest: _Manifest,
        payload: dict[str, _File],
        by_fold: dict[str, list[str]],
    ) -> str | None:
        """Why a listed file may be absent from any BagIt bag (bag_only), or None: it is
        missing. The manifest names it twice, and a file system that folds case or
        normalizes names kept one; or it is an operating system's file, dropped in a copy."""
        if not self.bag_only:
            return None
        form = unicodedata.normalize("NFC", path)
        for other in by_fold.get(_fold(path), []):
            if other == path or payload[other].digest(manifest.algorithm) != expected:
                continue
            if unicodedata.normalize("NFC", other) == form:
                return (
                    "not present; listed twice with different Unicode normalization "
                    f"({path!a}, and {other!a} which is present); one file on a "
                    "file system that normalizes names"
                )
            return (
                f"not present; listed twice with different case (also as {other!r}); "
                "would collide on a case-insensitive file system"
            )
        if _is_special(path):
            self.absent_special.add(path)
            return "special system file listed but not present"
        return None

    def warn_special_names(self, payload: dict[str, _File], by_fold: dict[str, list[str]]) -> None:
        for path in payload:
            if _is_special(path):
                self.report.warnings.append(
                    f"{path}: special system file in the payload (left by an operating "
                    "system, not usually content)"
                )
        for paths in by_fold.values():
            if len(paths) > 1:
                self.report.warnings.append(
                    f"{', '.join(map(repr, paths))}: names differ only in case or Unicode "
                    "normalization; would collide on a case-insensitive file system"
                )

    def check_tag_manifest(self, manifest: _Manifest) -> None:
        for path, expected in manifest.entries.items():
            file = self.files.get(path)
            if file is None:
                if path not in self.contents.rejected | self.missing:
                    self.problem(path, f"missing (listed in {manifest.name})")
                continue
            got = file.digest(manifest.algorithm)
            if got is None:
                self.problem(
                    path,
                    f"cannot check against {manifest.name}: not hashed with {manifest.algorithm}",
                )
            elif got != expected:
                self.problem(
                    path,
                    f"{manifest.algorithm} mismatch: expected {expected}, "
                    f"got {got} (per {manifest.name})",
                )

    # What makes it an archived archive -------------------------------------------------

    def check_archived(self, tagmanifests: list[_Manifest]) -> None:
        signed = next((m for m in tagmanifests if m.name == TAGMANIFEST), None)
        if signed is None:
            self.content(TAGMANIFEST, required=True)
        else:
            for name in TAG_FILES:
                if name not in signed.entries:
                    self.problem(
                        name, f"not covered by {TAGMANIFEST}, so not protected by the signature"
                    )
            for name in sorted(self.files):
                if (
                    not _is_payload(name)
                    and name not in signed.entries
                    and name not in (*TAG_FILES, TAGMANIFEST, SIGNATURE, TIMESTAMP)
                ):
                    self.report.warnings.append(
                        f"{name}: not covered by {TAGMANIFEST}, so not protected by the signature"
                    )
        self.check_events()
        message = self.content(TAGMANIFEST, required=False) if signed else None
        self.check_signature(message)
        if message is not None and TIMESTAMP in self.files:
            self.check_timestamp(message)

    def check_events(self) -> None:
        text = self.text(EVENTS, required=True)
        if text is None:
            return
        for number, line in enumerate(_lines(text), 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                event = None
            if not isinstance(event, dict):
                self.problem(EVENTS, f"line {number} is not a JSON object")

    def check_signature(self, message: bytes | None) -> None:
        data = self.content(SIGNATURE, required=False)
        if data is None:
            if SIGNATURE not in self.files and SIGNATURE not in self.contents.rejected:
                self.problem(SIGNATURE, "missing: the archive is not signed")
            return
        if not self.keys:
            self.problem(SIGNATURE, "no public key to check the signature against")
            return
        if message is None:
            self.problem(SIGNATURE, f"cannot be checked without {TAGMANIFEST}")
            return
        try:
            signature = data.decode("utf-8")
        except UnicodeDecodeError:
            self.problem(
                SIGNATURE, "signature does not verify: not a minisign signature (not UTF-8)"
            )
            return
        errors: list[str] = []
        for key in self.keys:
            try:
                minisign_verify(key, message, signature)
            except MinisignError as exc:
                errors.append(str(exc))
            else:
                self.report.signed_by = key.key_id_hex
                return
        self.problem(SIGNATURE, "signature does not verify: " + "; ".join(dict.fromkeys(errors)))

    def check_timestamp(self, message: bytes) -> None:
        data = self.content(TIMESTAMP, required=False)
        if data is None:
            return
        try:
            token = check_token(data, message, ca=self.tsa_ca)
        except TimestampRefused as exc:
            self.problem(TIMESTAMP, f"time-stamp token does not verify: {exc}")
            return
        self.report.timestamp = token.gen_time.isoformat().replace("+00:00", "Z")
        if self.tsa_ca is None:
            self.report.warnings.append(
                f"{TIMESTAMP}: covers {TAGMANIFEST}, but no time-stamping CA was given "
                "(--tsa-ca or signing.tsa_ca), so the authority's signature is not checked"
            )


def _lines(text: str) -> list[str]:
    """Lines split at LF (and CRLF) only: a file name may hold any other separator."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _normalize(path: str) -> str | None:
    """A manifest path as a bag-relative path, or None if it points outside the bag."""
    if path.startswith(("/", "~")) or re.match(r"[A-Za-z]:[\\/]", path):
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _fold(path: str) -> str:
    """A path as a case-insensitive, normalizing file system would see it."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", path).casefold())


def _is_special(path: str) -> bool:
    """Whether `path` is a file an operating system leaves behind: Finder's .DS_Store,
    Icon\\r and ._* AppleDouble files, Explorer's Thumbs.db and desktop.ini, or what
    is in Spotlight's, the Trash's or fseventsd's directories."""
    parts = path.casefold().split("/")
    base = parts[-1]
    return (
        base in _SPECIAL_FILES
        or (base.startswith("._") and len(base) > 2)
        or any(part in _SPECIAL_DIRS for part in parts)
    )


def _parse_tags(text: str, problem: Callable[[str], None]) -> dict[str, list[str]]:
    """`Label: value` lines, with folded continuation lines (RFC 8493 section 2.2.2)."""
    tags: dict[str, list[str]] = {}
    for label, value in _tag_lines(text, problem):
        tags.setdefault(label, []).append(value)
    return tags


def _tag_lines(text: str, problem: Callable[[str], None]) -> Iterator[tuple[str, str]]:
    label: str | None = None
    value = ""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line[0].isspace() and label is not None:
            value += " " + line.strip()
            continue
        if label is not None:
            yield label, value.strip()
            label = None
        name, colon, rest = line.partition(":")
        if not colon or not name.strip():
            problem(f"line {number}: {line.strip()!r} is not 'Label: value'")
            continue
        label, value = name.strip(), rest
    if label is not None:
        yield label, value.strip()
