"""Checking an archive, or any BagIt bag, without trusting whoever made it.

`verify_path()` reads a directory, a tar or a zip without extracting it (`bagread`),
hashing every payload file once per algorithm a manifest lists, and returns a `Report`
with a verdict: `valid`; `invalid`, each problem named (the file, or "" for the bag as
a whole); or `unverifiable`: nothing was found wrong, but nothing proves it right either
(no payload manifest in an algorithm this machine computes). Bad input is never an
exception.

The rules are RFC 8493's for BagIt 1.0 and the drafts' for 0.93 to 0.97 (section numbers
below are the RFC's): a MUST broken is a problem, a SHOULD broken a warning. A `Policy`
says what a bag must be beyond that: `ARCHIVE`, one of ours (signed, time-stamped when
its bag-info says so, with its event log, complete without fetching), or `ANY_BAG` for
`--bag-only`, where what other tools and file systems leave (a name listed twice in
another case or Unicode form, an operating system's special files) is a warning.
"""

from __future__ import annotations

import codecs
import io
import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from .bag import (
    EVENTS,
    MANIFEST,
    SIGNATURE,
    TAG_FILES,
    TAGMANIFEST,
    TIMESTAMP,
    TIMESTAMP_LABEL,
    decode_path,
)
from .bagread import (
    MACOS_ZIP_DIR,
    MANIFEST_NAME,
    READ_ERRORS,
    Algorithm,
    Contents,
    algorithm,
    hash_stream,
    is_payload,
    open_bag,
    read_error,
)
from .minisign import MinisignError, PublicKey
from .minisign import verify as minisign_verify
from .names import collision_warning
from .timestamp import TimestampRefused, check_token

# Tag files parsed whole (bagit.txt, bag-info.txt, the event log); manifests and
# fetch.txt are read line by line, however long.
TAG_FILE_LIMIT = 16 * 1024 * 1024

_VERSION = re.compile(r"(\d{1,9})\.(\d{1,9})")
_KNOWN_VERSIONS = {(0, 93), (0, 94), (0, 95), (0, 96), (0, 97), (1, 0)}
_BAGIT_LINE = re.compile(
    r"[ \t]*(BagIt-Version|Tag-File-Character-Encoding)[ \t]*:[ \t]*(.*?)[ \t]*"
)
_OXUM = re.compile(r"(\d{1,30})\.(\d{1,30})")
_HEX = re.compile(r"[0-9A-Fa-f]+")
_MANIFEST_LINE = re.compile(r"[ \t]*(\S+)[ \t]+(.+)")
_BARE_PERCENT = re.compile(r"%(?!25|0[AaDd])")  # what BagIt 1.0 encodes: %, CR, LF
_FETCH_LINE = re.compile(r"[ \t]*(\S+)[ \t]+(\d{1,30}|-)[ \t]+(.+)")
# bag-info labels that must not (Payload-Oxum), or should not, appear twice (2.2.2).
_ONCE = {"payload-oxum": "Payload-Oxum"}
_SHOULD_BE_ONCE = {
    label.lower(): label
    for label in ("Bagging-Date", "Bag-Size", "Bag-Group-Identifier", "Bag-Count")
}
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
    unverifiable: list[str] = field(default_factory=list)  # why it is not proven valid
    files: int = 0
    bytes: int = 0
    version: str | None = None  # BagIt-Version, as bagit.txt declares it
    signed_by: str | None = None
    timestamp: str | None = None  # the time-stamp token's genTime, ISO 8601 UTC

    @property
    def verdict(self) -> str:
        if self.problems:
            return "invalid"
        return "unverifiable" if self.unverifiable else "valid"

    @property
    def ok(self) -> bool:
        return self.verdict == "valid"

    def to_json(self) -> dict[str, Any]:
        return {
            "bag": self.bag,
            "verdict": self.verdict,
            "ok": self.ok,
            "bagit_version": self.version,
            "files": self.files,
            "bytes": self.bytes,
            "signed_by": self.signed_by,
            "timestamp": self.timestamp,
            "problems": [asdict(p) for p in self.problems],
            "warnings": list(self.warnings),
            "unverifiable": list(self.unverifiable),
        }

    def add_problem(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))


@dataclass(frozen=True)
class Policy:
    """Everything that differs between checking an archive of ours (`ARCHIVE`) and any
    BagIt bag (`ANY_BAG`, `--bag-only`); the checker asks this, never which one it is."""

    # One of ours: manifest-sha256, bag-info with Payload-Oxum, nothing to fetch, a tag
    # manifest over its tag files, the event log, signed, and the time-stamp token
    # bag-info announces (`check_archived`). Any bag: a missing token is a warning.
    ours: bool
    # A tar or zip format not read here (7-Zip, RAR, zstd): another tool's bag in one is
    # not known to be wrong (unverifiable); an archive of ours in one was replaced.
    unread_format_unverifiable: bool
    # fetch.txt read, and a holey bag named as such (ours must have none: check_archived)
    fetch: bool
    # The drafts' serialization rules (one directory, the bag, and nothing beside it)
    # bind a 1.0 bag too: our archives keep them; RFC 8493 dropped them.
    draft_serialization: bool
    # What other file systems and operating systems leave is a warning: a name listed
    # twice in another case or Unicode form and present once, special files (.DS_Store),
    # macOS's __MACOSX/ beside the bag.
    forgive_os: bool


ARCHIVE = Policy(
    ours=True,
    unread_format_unverifiable=False,
    fetch=False,
    draft_serialization=True,
    forgive_os=False,
)
ANY_BAG = Policy(
    ours=False,
    unread_format_unverifiable=True,
    fetch=True,
    draft_serialization=False,
    forgive_os=True,
)


def verify_path(
    path: Path | str,
    *,
    keys: list[PublicKey],
    bag_only: bool = False,
    tsa_ca: list[x509.Certificate] | None = None,
    policy: Policy | None = None,
) -> Report:
    """Check the bag directory, tar or zip at `path`; see the module docstring. The
    policy is `policy`, else ANY_BAG with `bag_only`, else ARCHIVE."""
    if policy is None:
        policy = ANY_BAG if bag_only else ARCHIVE
    path = Path(path)
    report = Report(bag=path.name or path.resolve().name)
    unread = report.unverifiable.append if policy.unread_format_unverifiable else None
    contents = open_bag(path, report.add_problem, unread)
    if contents is None:
        if report.unverifiable:
            return report
        if not report.problems:
            report.add_problem("", "empty archive: no bag directory in it")
        return report
    try:
        report.bag = contents.name
        _check(contents, report, policy, keys=keys, tsa_ca=tsa_ca)
    finally:
        contents.close()
    return report


@dataclass
class _Manifest:
    name: str
    spelled: str  # the algorithm as its file name spells it
    algorithm: Algorithm | None  # None: not one hashlib computes here
    tag: bool
    id: int
    tag_entries: dict[str, bytes] = field(default_factory=dict)  # tag manifests: tag files


class _Bag:
    """One bag as it is read: its contents, what its tag files declared so far, and the
    report its problems and warnings go to. The checks below work on it, in the order
    `_check` calls them."""

    def __init__(self, contents: Contents, report: Report, policy: Policy) -> None:
        self.contents, self.tags, self.index = contents, contents.tags, contents.index
        self.report, self.policy = report, policy
        self.encoding = "utf-8"
        self.version: tuple[int, int] = (1, 0)
        self.missing: set[str] = set()  # required files already reported missing
        self.reported: set[tuple[str, str]] = set()
        self.info: dict[str, list[str]] = {}  # bag-info labels (lower case) and values
        self.oxum: tuple[str, int, int] | None = None  # as declared
        self.holes: list[tuple[str, int | None]] = []  # fetch.txt's files not present
        self.tag_digests: dict[tuple[str, str], bytes] = {}
        self.info_name = "bag-info.txt"  # package-info.txt in 0.93 to 0.95
        self.unencoded: dict[str, list[tuple[int, str]]] = {}  # paths with a bare "%"

    @property
    def strict(self) -> bool:
        """BagIt 1.0 made MUSTs of what earlier versions let pass."""
        return self.version >= (1, 0)

    def problem(self, path: str, message: str) -> None:
        if (path, message) not in self.reported:
            self.reported.add((path, message))
            self.report.add_problem(path, message)

    def warn(self, message: str) -> None:
        self.report.warnings.append(message)

    def breach(self, path: str, message: str) -> None:
        """A rule that BagIt 1.0 makes a MUST and earlier versions did not."""
        if self.strict:
            self.problem(path, message)
        else:
            self.warn(f"{path}: {message}")

    def present(self, name: str, *, required: bool) -> bool:
        if name in self.tags:
            return True
        if required and name not in self.contents.rejected | self.missing:
            self.problem(name, "missing")
            self.missing.add(name)
        return False

    def content(self, name: str, *, required: bool) -> bytes | None:
        """A small tag file's bytes."""
        if not self.present(name, required=required):
            return None
        file = self.tags[name]
        if file.size > TAG_FILE_LIMIT:
            self.problem(name, f"larger than {TAG_FILE_LIMIT} bytes; not read")
            return None
        try:
            with file.open() as f:
                return f.read()
        except READ_ERRORS as exc:
            self.problem(name, f"cannot read: {read_error(exc)}")
            return None

    def lines(self, name: str, *, limit: int | None = None) -> Iterator[tuple[int, str]]:
        """A tag file's lines, decoded, split at LF, CR or CRLF (2.3), numbered from 1."""
        file = self.tags[name]
        if limit is not None and file.size > limit:
            self.problem(name, f"larger than {limit} bytes; not read")
            return
        number = 0
        try:
            with file.open() as raw, io.TextIOWrapper(raw, self.encoding, newline=None) as text:
                for number, line in enumerate(text, 1):
                    line = line.removesuffix("\n")
                    if number == 1 and line.startswith("\ufeff"):
                        # 2.3: only where the encoding needs one (UTF-16 does: its codec
                        # reads it), never in UTF-8
                        self.breach(name, f"starts with a byte-order mark ({self.encoding})")
                        line = line[1:]
                    yield number, line
        except UnicodeDecodeError as exc:
            self.problem(name, f"line {number + 1}: not valid {self.encoding}: {exc.reason}")
        except READ_ERRORS as exc:
            self.problem(name, f"cannot read: {read_error(exc)}")

    def tag_digest(self, name: str, algo: Algorithm) -> bytes | None:
        key = (name, algo.key)
        if key not in self.tag_digests:
            try:
                with self.tags[name].open() as f:
                    self.tag_digests[key] = hash_stream(f, [algo])[1][algo.key]
            except READ_ERRORS as exc:
                self.problem(name, f"cannot read: {read_error(exc)}")
                return None
        return self.tag_digests[key]

    def listed_path(self, name: str, number: int, raw: str) -> str | None:
        """A path as a manifest or fetch.txt writes it, as a bag-relative path."""
        if self.version < (1, 0):
            raw = raw.strip()  # trailing blanks were not significant
        if _BARE_PERCENT.search(raw):
            self.unencoded.setdefault(name, []).append((number, raw))
        path = _bag_path(decode_path(raw))
        if path is None:
            self.problem(name, f"line {number}: path {raw!r} is outside the bag")
        return path

    def check_unencoded(self, name: str) -> None:
        """2.1.3, 2.2.3: a "%" in a path MUST be written %25 (since 1.0)."""
        if found := self.unencoded.pop(name, []):
            number, raw = found[0]
            self.breach(
                name,
                f"{len(found)} paths with a '%' not percent-encoded as %25 (line {number}: "
                f"{raw!r}); read as written",
            )

    def announced_timestamp(self) -> bool:
        return "rfc3161" in self.info.get(TIMESTAMP_LABEL.lower(), [])


def _check(
    contents: Contents,
    report: Report,
    policy: Policy,
    *,
    keys: list[PublicKey],
    tsa_ca: list[x509.Certificate] | None,
) -> None:
    bag = _Bag(contents, report, policy)
    report.files, report.bytes = contents.index.totals()
    report.warnings += contents.warnings
    for path in contents.index.duplicates():
        bag.problem(path, f"duplicate member in the {contents.container}")
    declaration = _Declaration(bag)
    declaration.check_bagit_txt()
    declaration.check_serialization()
    declaration.check_layout()
    declaration.check_bag_info()
    listings = _Listings(bag)
    if policy.fetch:
        listings.check_fetch()
    manifests = listings.load_manifests()
    contents.index.resolve()
    contents.complete(bag.problem)
    payload = [m for m in manifests if not m.tag]
    tag = [m for m in manifests if m.tag]
    checks = _Payload(bag)
    checks.check_payload(payload)
    for manifest in manifests:
        checks.check_entries(manifest)
    checks.check_oxum()
    for manifest in tag:
        checks.check_tag_manifest(manifest, payload)
    checks.check_names()
    if policy.ours:
        _Ours(bag, keys, tsa_ca).check_archived(tag)
    elif bag.announced_timestamp() and TIMESTAMP not in contents.tags:
        bag.warn(f"{TIMESTAMP}: missing, though bag-info.txt says {TIMESTAMP_LABEL}: rfc3161")


class _Declaration:
    """2.1.1 the bag declaration and 2.1.2 the payload directory, with the drafts'
    serialization rules; 2.2.2 bag-info.txt."""

    def __init__(self, bag: _Bag) -> None:
        self.bag = bag

    def check_bagit_txt(self) -> None:
        data = self.bag.content("bagit.txt", required=True)
        if data is None:
            return
        if data.startswith(codecs.BOM_UTF8):
            self.bag.problem("bagit.txt", "starts with a byte-order mark")
            data = data[len(codecs.BOM_UTF8) :]
        try:
            lines = re.split(r"\r\n|\r|\n", data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            self.bag.problem("bagit.txt", f"not valid UTF-8: {exc.reason}")
            return
        if lines[-1] == "":
            lines.pop()
        tags: dict[str, str] = {}
        loose: list[tuple[int, str]] = []  # more blanks than "Label: value"
        other: list[tuple[int, str]] = []
        for number, line in enumerate(lines, 1):
            match = _BAGIT_LINE.fullmatch(line)
            if not line.strip(" \t"):
                self.bag.warn(f"bagit.txt: line {number} is blank")
                continue
            if match is None:
                other.append((number, line))
                continue
            label, value = match.groups()
            if label in tags:
                self.bag.problem("bagit.txt", f"line {number}: {label} declared twice")
            tags[label] = value
            if not re.fullmatch(rf"{label}: \S+", line):
                loose.append((number, line))
        self.read_version(tags.get("BagIt-Version"))
        for number, line in loose:
            self.bag.breach(
                "bagit.txt",
                f"line {number}: {line!r} is not exactly '<label>: <value>' (one space after "
                "the colon, no other blanks)",
            )
        for number, line in other:  # "exactly two lines", in the drafts too (bagit-python)
            self.bag.problem(
                "bagit.txt",
                f"line {number}: {line!r} is not 'BagIt-Version: M.N' or "
                "'Tag-File-Character-Encoding: ENCODING'; bagit.txt is exactly those two lines",
            )
        if list(tags) == ["Tag-File-Character-Encoding", "BagIt-Version"]:
            self.bag.breach("bagit.txt", "BagIt-Version must be the first line")
        encoding = tags.get("Tag-File-Character-Encoding")
        if encoding is None:
            self.bag.problem("bagit.txt", "does not declare Tag-File-Character-Encoding")
            return
        try:
            # A text encoding: Python also names binary transforms (hex, rot13, zlib).
            "".encode(encoding)
            b"".decode(encoding)
        except (LookupError, ValueError):
            self.bag.problem(
                "bagit.txt", f"Tag-File-Character-Encoding {encoding!r} is not a character encoding"
            )
            return
        self.bag.encoding = encoding

    def read_version(self, version: str | None) -> None:
        if version is None:
            self.bag.problem("bagit.txt", "does not declare BagIt-Version")
            return
        self.bag.report.version = version
        found = _VERSION.fullmatch(version)
        if found is None:
            self.bag.problem("bagit.txt", f"BagIt-Version {version!r} is not a M.N number")
            return
        number = (int(found.group(1)), int(found.group(2)))
        if not (0, 93) <= number < (2, 0):
            self.bag.problem(
                "bagit.txt", f"unsupported BagIt-Version {version}: I read 0.93 to 1.0"
            )
            return
        self.bag.version = number
        if number not in _KNOWN_VERSIONS:
            rules = "1.0" if number > (1, 0) else "0.97"
            self.bag.warn(f"bagit.txt: BagIt-Version {version} is not one I know; read as {rules}")

    def check_serialization(self) -> None:
        """A tar or zip unpacks to one directory, the bag, and nothing beside it: a MUST of
        the BagIt drafts to 0.97 (section 4, "Serialization"), which RFC 8493 dropped (a
        bag is what validates), so a warning for a 1.0 bag of another tool; our archives
        keep it. What macOS's Archive Utility adds beside the bag (__MACOSX/) is an
        operating system's leftover."""
        outside: dict[str, list[tuple[str, str]]] = {}  # by the top directory they are in
        for name, message in self.bag.contents.shape:
            if not name:
                message += " (serialized from inside the bag directory); read as the bag"
                self.draft_rule("", message, "one directory, the bag")
            else:
                outside.setdefault(name.strip("/").split("/")[0], []).append((name, message))
        for top, found in outside.items():
            path, message = found[0] if len(found) == 1 else (f"{top}/", f"{len(found)} members")
            message = f"{message} {found[0][1]}"
            if top == MACOS_ZIP_DIR and self.bag.policy.forgive_os:
                self.bag.warn(f"{path}: {message}, left by macOS's Archive Utility; not read")
            else:
                self.draft_rule(path, message, "nothing but the bag directory")

    def draft_rule(self, path: str, message: str, rule: str) -> None:
        """A serialization rule of the drafts (0.97 section 4) that RFC 8493 dropped."""
        if self.bag.policy.draft_serialization or self.bag.version < (1, 0):
            must = f"a serialized bag must hold {rule} (BagIt 0.97 section 4)"
            self.bag.problem(path, f"{message}: {must}")
        else:
            self.bag.warn(
                f"{path or self.bag.report.bag}: {message} (a serialized bag held {rule} until "
                "BagIt 0.97; RFC 8493 has no such rule)"
            )

    def check_layout(self) -> None:
        if "data" in self.bag.tags:
            self.bag.problem("data", "is a file; the payload directory must be a directory")
        elif not self.bag.contents.data_dir and "data" not in self.bag.contents.rejected:
            self.bag.problem("data", "payload directory missing")

    def check_bag_info(self) -> None:
        # bagit-python and bagit-java read 0.93 to 0.95 bags' metadata from package-info.txt.
        older = self.bag.version < (0, 96)
        name, other = ("package-info.txt", "bag-info.txt")[:: 1 if older else -1]
        if name not in self.bag.tags and other in self.bag.tags:
            self.bag.warn(f"{other}: read as the metadata of a BagIt {self.bag.report.version} bag")
            name = other
        self.bag.info_name = name
        if not self.bag.present(name, required=False):
            return
        for label, value in self.metadata(name):
            self.bag.info.setdefault(label.lower(), []).append(value)
        for key, label in (_ONCE | _SHOULD_BE_ONCE).items():
            values = self.bag.info.get(key, [])
            if len(values) < 2:
                continue
            if key in _SHOULD_BE_ONCE:
                if self.bag.strict:
                    self.bag.warn(
                        f"{name}: {label} appears more than once; it should not be repeated"
                    )
            elif self.bag.strict or len(set(values)) > 1:
                self.bag.problem(name, f"declares Payload-Oxum {len(values)} times: {values}")
        oxums = self.bag.info.get("payload-oxum", [])
        if not oxums:
            return
        match = _OXUM.fullmatch(oxums[0])
        if match is None:
            self.bag.problem(name, f"malformed Payload-Oxum {oxums[0]!r}: not <octets>.<files>")
            return
        self.bag.oxum = (oxums[0], int(match.group(1)), int(match.group(2)))

    def metadata(self, name: str) -> Iterator[tuple[str, str]]:
        """(label, value) of each element: `Label: value` with one space or
        tab after the colon in 1.0 (more blanks either side before 1.0), a value folded
        onto lines that start with a space or tab."""
        element: list[str] | None = None  # [label, value]
        for number, line in self.bag.lines(name, limit=TAG_FILE_LIMIT):
            if not line.strip(" \t"):
                continue
            if line[0] in " \t":
                if element is not None:
                    element[1] += " " + line.strip(" \t")
                    continue
                self.bag.breach(name, f"line {number}: starts with a blank, but continues nothing")
                if self.bag.strict:
                    continue
                line = line.lstrip(" \t")
            if element is not None:
                yield element[0], element[1]
                element = None
            label, colon, value = line.partition(":")
            if not colon:
                self.bag.problem(name, f"line {number}: {line!r} is not 'Label: value'")
            elif not label.strip(" \t"):
                self.bag.problem(name, f"line {number}: no label before the colon")
            elif self.bag.strict and label != label.rstrip(" \t"):
                self.bag.problem(name, f"line {number}: the label {label!r} ends with whitespace")
            elif self.bag.strict and not value.startswith((" ", "\t")):
                self.bag.problem(name, f"line {number}: no space or tab after the colon")
            else:
                element = [label.strip(" \t"), value.strip(" \t")]
        if element is not None:
            yield element[0], element[1]


class _Listings:
    """2.2.3 fetch.txt, and the lines of 2.1.3 payload and 2.2.1 tag manifests, into the
    payload index."""

    def __init__(self, bag: _Bag) -> None:
        self.bag = bag

    def check_fetch(self) -> None:
        if "fetch.txt" not in self.bag.tags:
            return
        self.bag.index.add_fetch(self.fetch_lines())
        for path in self.bag.index.fetch_repeated():
            self.bag.warn(f"{path}: listed twice in fetch.txt")
        self.bag.holes = self.bag.index.holes()
        if self.bag.holes:
            shown = ", ".join(p for p, _ in self.bag.holes[:3]) + (
                ", ..." if len(self.bag.holes) > 3 else ""
            )
            self.bag.problem(
                "fetch.txt",
                f"holey bag: {len(self.bag.holes)} files listed here are not present, to be "
                f"fetched ({shown}): the bag is incomplete",
            )

    def fetch_lines(self) -> Iterator[tuple[str, int | None]]:
        for number, line in self.bag.lines("fetch.txt"):
            if not line.strip():
                continue
            match = _FETCH_LINE.fullmatch(line)
            if match is None:
                self.bag.problem("fetch.txt", f"line {number}: not '<url> <length> <path>'")
                continue
            url, length, raw_path = match.groups()
            if not _absolute_url(url):
                self.bag.problem("fetch.txt", f"line {number}: {url!r} is not an absolute URL")
                continue
            path = self.bag.listed_path("fetch.txt", number, raw_path)
            if path is None:
                continue
            if not is_payload(path):
                self.bag.problem(
                    "fetch.txt", f"line {number}: {path} is not in the payload directory data/"
                )
                continue
            yield path, None if length == "-" else int(length)
        self.bag.check_unencoded("fetch.txt")

    def load_manifests(self) -> list[_Manifest]:
        manifests: list[_Manifest] = []
        for name in sorted(self.bag.tags):
            match = MANIFEST_NAME.fullmatch(name)
            if match is None:
                continue
            tag, spelled = bool(match.group(1)), match.group(2)
            algo = algorithm(spelled)
            if algo is None:
                self.bag.warn(
                    f"{name}: algorithm {spelled} not supported; its checksums are not checked"
                )
            manifest = _Manifest(
                name,
                spelled,
                algo,
                tag,
                self.bag.index.add_manifest(name, algo.key if algo else None, tag=tag),
            )
            self.bag.index.add_entries(manifest.id, self.manifest_lines(manifest))
            manifests.append(manifest)
        if not any(not m.tag for m in manifests) and not any(
            MANIFEST_NAME.fullmatch(n) for n in self.bag.contents.rejected
        ):
            self.bag.problem("", "no payload manifest (manifest-<algorithm>.txt)")
        return manifests

    def manifest_lines(self, manifest: _Manifest) -> Iterator[tuple[str, str, bytes]]:
        """A manifest's lines for payload files, as (path, path as written, digest); a tag
        manifest's lines for tag files go to its `tag_entries`."""
        name = manifest.name
        length = manifest.algorithm.hex_length if manifest.algorithm else None
        starred = reworded = 0
        example = ("", "")  # the first path not written plainly, as written and as read
        for number, line in self.bag.lines(name):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            match = _MANIFEST_LINE.fullmatch(line)
            if match is None:
                self.bag.problem(name, f"line {number}: not '<checksum>  <path>'")
                continue
            checksum, raw = match.groups()
            if self.bag.version < (1, 0):
                raw = raw.strip()  # trailing blanks were not significant
                if raw.startswith("*"):
                    starred += 1  # md5sum's mark of binary mode
                    raw = raw[1:]
            if (
                not _HEX.fullmatch(checksum)
                or len(checksum) % 2
                or length not in (None, len(checksum))
            ):
                self.bag.problem(
                    name, f"line {number}: {checksum!r} is not a {manifest.spelled} checksum"
                )
                continue
            path = self.bag.listed_path(name, number, raw)
            if path is None:
                continue
            if path != decode_path(raw):
                reworded += 1
                example = example if reworded > 1 else (raw, path)
            written = _bag_path(raw) or path  # a "%" another tool did not encode
            digest = bytes.fromhex(checksum)
            if manifest.tag and not is_payload(path):
                self.tag_entry(manifest, number, path, digest)
                continue
            if manifest.tag:
                self.bag.breach(
                    name, f"line {number}: lists {path}, a payload file; a tag manifest must not"
                )
                if self.bag.strict:
                    continue
            elif not is_payload(path):
                self.bag.problem(
                    name, f"line {number}: {path} is not in the payload directory data/"
                )
                continue
            yield path, written, digest
        self.bag.check_unencoded(name)
        if starred:
            self.bag.warn(
                f"{name}: {starred} lines mark the path with '*', as md5sum does for "
                "binary mode; read without it"
            )
        if reworded:
            self.bag.warn(
                f"{name}: {reworded} paths not written as plain bag-relative paths "
                f"(e.g. {example[0]!r}, read as {example[1]!r})"
            )

    def tag_entry(self, manifest: _Manifest, number: int, path: str, digest: bytes) -> None:
        entries = manifest.tag_entries
        if (found := MANIFEST_NAME.fullmatch(path)) and found.group(1):
            self.bag.breach(
                manifest.name,
                f"line {number}: lists {path}; a tag manifest must not list tag manifests",
            )
            if self.bag.strict:
                return
        if path in entries:
            if entries[path] != digest:
                self.bag.problem(path, f"listed twice in {manifest.name} with different checksums")
            else:
                self.bag.breach(path, f"listed twice in {manifest.name}")
            return
        entries[path] = digest


class _Payload:
    """Section 3: the payload and the tag files against the manifests, the
    Payload-Oxum, and names that would collide on extraction."""

    def __init__(self, bag: _Bag) -> None:
        self.bag = bag
        self.absent_special: set[str] = set()  # special system files listed, not present
        self.tag_forms: dict[str, str] | None = None  # tag files by NFC name, where one

    def check_payload(self, manifests: list[_Manifest]) -> None:
        """Section 3: every payload file in every payload manifest (before 1.0: in one),
        and, holey bags, every file fetch.txt lists."""
        supported = [m.id for m in manifests if m.algorithm]
        if manifests and not supported:
            names = ", ".join(m.name for m in manifests)
            self.bag.report.unverifiable.append(
                f"no manifest in a supported algorithm ({names}): no checksum could be checked"
            )
        elif len(supported) < len(manifests) and not self.bag.strict:
            # Before 1.0 a file may be in one manifest only: it may be one we cannot check.
            unchecked = sum(1 for _ in self.bag.index.unlisted(supported))
            if unchecked:
                self.bag.report.unverifiable.append(
                    f"{unchecked} payload files are listed only in manifests in algorithms "
                    "not supported: their checksums could not be checked"
                )
        unlisted: dict[str, list[str]] = {}
        if self.bag.strict:
            for manifest in manifests:
                for path in self.bag.index.unlisted([manifest.id]):
                    unlisted.setdefault(path, []).append(manifest.name)
            for path, manifest_names in unlisted.items():
                self.bag.problem(path, f"not in {', '.join(manifest_names)}")
        elif manifests:
            for path in self.bag.index.unlisted([m.id for m in manifests]):
                self.bag.problem(path, "not in any payload manifest")
        for manifest in manifests:
            for path in self.bag.index.fetched_not_listed(manifest.id):
                self.bag.problem(path, f"listed in fetch.txt but not in {manifest.name}")

    def check_entries(self, manifest: _Manifest) -> None:
        """A manifest's payload lines against the payload: present, and the same digest."""
        holes = {p for p, _ in self.bag.holes}
        for path, conflict in self.bag.index.repeated(manifest.id):
            if conflict:
                self.bag.problem(path, f"listed twice in {manifest.name} with different checksums")
            else:
                self.bag.breach(path, f"listed twice in {manifest.name}")
        for how, written, actual in self.bag.index.renamed(manifest.id):
            if how == "form":
                self.bag.warn(
                    f"{actual}: listed in {manifest.name} under another Unicode normalization"
                )
            else:  # its '%25' is no encoding: "100%25" is the file's name (2.1.3)
                self.bag.breach(
                    actual,
                    f"listed in {manifest.name} as {written!r}, with '%' not percent-encoded; "
                    "read as written",
                )
        for path, digest in self.bag.index.unresolved(manifest.id):
            if path in holes or path in self.bag.contents.rejected:
                continue
            why = self.excuse_absent(path, digest, manifest)
            if why is None:
                self.bag.problem(path, f"missing from payload (listed in {manifest.name})")
            else:
                self.bag.warn(f"{path}: {why} (listed in {manifest.name})")
        if manifest.algorithm is None:
            return
        for path, expected, got in self.bag.index.compared(manifest.id, manifest.algorithm.key):
            if got is None:
                self.bag.problem(path, f"not checked against {manifest.name}: it could not be read")
            else:
                self.bag.problem(
                    path, f"{manifest.spelled} mismatch: expected {expected.hex()}, got {got.hex()}"
                )

    def excuse_absent(self, path: str, expected: bytes, manifest: _Manifest) -> str | None:
        """Why a listed file may be absent from another tool's bag, or None: it is
        missing. The manifest names it twice, and a file system that folds case or
        normalizes names kept one; or it is an operating system's file, dropped in a copy."""
        if not self.bag.policy.forgive_os:
            return None
        form = unicodedata.normalize("NFC", path)
        for other in self.bag.index.names.alike(path):
            found = self.bag.index.lookup(other)
            if found is None or manifest.algorithm is None:
                continue
            if self.bag.index.digest(found[0], manifest.algorithm.key) != expected:
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

    def check_oxum(self) -> None:
        if self.bag.oxum is None:
            return
        text, *declared = self.bag.oxum
        unknown = sum(n is None for _, n in self.bag.holes)
        if unknown:
            self.bag.warn(
                f"{self.bag.info_name}: Payload-Oxum {text} not checked: fetch.txt gives no "
                f"length for {unknown} files not present"
            )
            return
        actual = [
            self.bag.report.bytes + sum(n or 0 for _, n in self.bag.holes),
            self.bag.report.files + len(self.bag.holes),
        ]
        if declared == actual:
            return
        special = len(self.absent_special)
        if special and declared == [actual[0], actual[1] + special]:
            # Their sizes are unknown; the byte count must match without them.
            self.bag.warn(
                f"{self.bag.info_name}: Payload-Oxum {text} counts {special} special system "
                "files that are not present"
            )
            return
        where = " and fetch.txt" if self.bag.holes else ""
        self.bag.problem(
            self.bag.info_name,
            f"Payload-Oxum {text} does not match the "
            f"payload{where}: {actual[0]} bytes in {actual[1]} files",
        )

    def check_tag_manifest(self, manifest: _Manifest, payload: list[_Manifest]) -> None:
        """2.2.1: every payload manifest listed, every listed tag file present and as
        listed; the other tag files should be listed too (1.0)."""
        entries = manifest.tag_entries
        for listed in payload:
            if listed.name not in entries:
                self.bag.breach(
                    manifest.name,
                    f"does not list {listed.name}; a tag manifest must list every payload manifest",
                )
        found: set[str] = set()
        for listed_as, expected in entries.items():
            path = self.tag_file(listed_as)
            if path is None:
                if listed_as not in self.bag.contents.rejected | self.bag.missing:
                    self.bag.problem(listed_as, f"missing (listed in {manifest.name})")
                continue
            found.add(path)
            if path != listed_as:
                self.bag.warn(
                    f"{path}: listed in {manifest.name} under another Unicode normalization"
                )
            if manifest.algorithm is None:
                continue
            got = self.bag.tag_digest(path, manifest.algorithm)
            if got is not None and got != expected:
                self.bag.problem(
                    path,
                    f"{manifest.spelled} mismatch: expected {expected.hex()}, "
                    f"got {got.hex()} (per {manifest.name})",
                )
        if self.bag.strict:
            left_out = [
                n
                for n in sorted(self.bag.tags)
                if n not in found
                and not (MANIFEST_NAME.fullmatch(n) and n.startswith("tag"))
                and n not in (SIGNATURE, TIMESTAMP)  # made after it, over it
            ]
            if left_out:
                self.bag.warn(
                    f"{manifest.name} does not list {', '.join(left_out)}; a tag manifest "
                    "should list every tag file"
                )

    def tag_file(self, listed: str) -> str | None:
        """The tag file a tag manifest's line names: by its name, else by Unicode
        normalization (macOS stores names decomposed; RFC 8493 section 6.1.1 asks for
        this tolerance) where that names one file."""
        if listed in self.bag.tags:
            return listed
        if self.tag_forms is None:
            forms: dict[str, list[str]] = {}
            for name in self.bag.tags:
                forms.setdefault(unicodedata.normalize("NFC", name), []).append(name)
            self.tag_forms = {form: names[0] for form, names in forms.items() if len(names) == 1}
        return self.tag_forms.get(unicodedata.normalize("NFC", listed))

    def check_names(self) -> None:
        """Names that would collide on extraction; in another tool's bag, the files an
        operating system leaves in a folder."""
        for group in self.bag.index.names.groups():
            self.bag.warn(collision_warning(group))
        if self.bag.policy.forgive_os:
            for path in self.bag.index.paths():
                if _is_special(path):
                    self.bag.warn(
                        f"{path}: special system file in the payload (left by an operating "
                        "system, not usually content)"
                    )


class _Ours:
    """What makes it an archive of ours: its payload manifest, bag-info with
    Payload-Oxum, nothing to fetch, the tag manifest, the event log, the signature and
    the time-stamp token."""

    def __init__(
        self, bag: _Bag, keys: list[PublicKey], tsa_ca: list[x509.Certificate] | None
    ) -> None:
        self.bag, self.keys, self.tsa_ca = bag, keys, tsa_ca

    def check_archived(self, tagmanifests: list[_Manifest]) -> None:
        """What an archive of ours has beyond BagIt: its payload manifest, bag-info with
        Payload-Oxum, nothing to fetch, a tag manifest over its tag files and event log,
        signed, and the time-stamp token bag-info announces."""
        bag = self.bag
        bag.present(MANIFEST, required=True)
        if bag.present(bag.info_name, required=True) and "payload-oxum" not in bag.info:
            bag.problem(bag.info_name, "has no Payload-Oxum")
        if "fetch.txt" in self.bag.tags:
            self.bag.problem(
                "fetch.txt", "the bag lists files to fetch; only complete bags can be verified"
            )
        signed = next((m for m in tagmanifests if m.name == TAGMANIFEST), None)
        if signed is None:
            self.bag.present(TAGMANIFEST, required=True)
        else:
            for name in TAG_FILES:
                if name not in signed.tag_entries:
                    self.bag.problem(
                        name, f"not covered by {TAGMANIFEST}, so not protected by the signature"
                    )
            for name in sorted(self.bag.tags):
                if name not in signed.tag_entries and name not in (
                    *TAG_FILES,
                    TAGMANIFEST,
                    SIGNATURE,
                    TIMESTAMP,
                ):
                    self.bag.warn(
                        f"{name}: not covered by {TAGMANIFEST}, so not protected by the signature"
                    )
        self.check_events()
        message = self.bag.content(TAGMANIFEST, required=False) if signed else None
        self.check_signature(message)
        if TIMESTAMP in self.bag.tags:
            if message is not None:
                self.check_timestamp(message)
        elif self.bag.announced_timestamp() and TIMESTAMP not in self.bag.contents.rejected:
            self.bag.problem(
                TIMESTAMP,
                f"missing, though bag-info.txt says the archive was time-stamped "
                f"({TIMESTAMP_LABEL}: rfc3161)",
            )

    def check_events(self) -> None:
        if not self.bag.present(EVENTS, required=True):
            return
        for number, line in self.bag.lines(EVENTS, limit=TAG_FILE_LIMIT):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                event = None
            if not isinstance(event, dict):
                self.bag.problem(EVENTS, f"line {number} is not a JSON object")

    def check_signature(self, message: bytes | None) -> None:
        data = self.bag.content(SIGNATURE, required=False)
        if data is None:
            if SIGNATURE not in self.bag.tags and SIGNATURE not in self.bag.contents.rejected:
                self.bag.problem(SIGNATURE, "missing: the archive is not signed")
            return
        if not self.keys:
            self.bag.problem(SIGNATURE, "no public key to check the signature against")
            return
        if message is None:
            self.bag.problem(SIGNATURE, f"cannot be checked without {TAGMANIFEST}")
            return
        try:
            signature = data.decode("utf-8")
        except UnicodeDecodeError:
            self.bag.problem(
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
                self.bag.report.signed_by = key.key_id_hex
                return
        errors = list(dict.fromkeys(errors))
        self.bag.problem(SIGNATURE, "signature does not verify: " + "; ".join(errors))

    def check_timestamp(self, message: bytes) -> None:
        data = self.bag.content(TIMESTAMP, required=False)
        if data is None:
            return
        try:
            token = check_token(data, message, ca=self.tsa_ca)
        except TimestampRefused as exc:
            self.bag.problem(TIMESTAMP, f"time-stamp token does not verify: {exc}")
            return
        self.bag.report.timestamp = token.gen_time.isoformat().replace("+00:00", "Z")
        if self.tsa_ca is None:
            self.bag.warn(
                f"{TIMESTAMP}: covers {TAGMANIFEST}, but no time-stamping CA was given "
                "(--tsa-ca or signing.tsa_ca), so the authority's signature is not checked"
            )


def _absolute_url(url: str) -> bool:
    """An absolute URI (RFC 3986 section 4.3): a scheme (one letter would be a Windows
    drive), and a host where it says "//" (but for file:///path)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if len(parts.scheme) < 2 or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", parts.scheme):
        return False
    hierarchical = url[len(parts.scheme) + 1 :].startswith("//")
    return bool(parts.netloc) or not hierarchical or parts.scheme.lower() == "file"


def _bag_path(path: str) -> str | None:
    """A listed path as a bag-relative path, or None if it points outside the bag."""
    if not (
        "//" in path
        or "/." in path
        or path.startswith((".", "/", "~"))
        or path.endswith("/")
        or path[1:2] == ":"
    ):
        return path  # already one: most are
    if path.startswith(("/", "~")) or re.match(r"[A-Za-z]:[\\/]", path):
        return None
    parts: list[str] = []
    for part in path.split("/"):
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/".join(parts) or None


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
