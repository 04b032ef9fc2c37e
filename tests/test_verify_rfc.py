"""verify --bag-only: the rules of RFC 8493 (and the BagIt 0.93-0.97 drafts), one by one.

Every bag here is built in the test, by hand, as another tool may write it, and each
test breaks one rule. A MUST broken makes the bag invalid; a SHOULD broken is a
warning on a valid bag. Digests are computed here with hashlib, never by the code
under test.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import unicodedata
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from archived.verify import Report, verify_path

Hash = Callable[[bytes], str]

# BagIt names (RFC 8493 section 2.4: the lowercase name without punctuation) and the
# names other tools write (bagit-python: hashlib's names).
HASHES: dict[str, Hash] = {
    "md5": lambda d: hashlib.md5(d).hexdigest(),
    "sha1": lambda d: hashlib.sha1(d).hexdigest(),
    "sha224": lambda d: hashlib.sha224(d).hexdigest(),
    "sha256": lambda d: hashlib.sha256(d).hexdigest(),
    "sha384": lambda d: hashlib.sha384(d).hexdigest(),
    "sha512": lambda d: hashlib.sha512(d).hexdigest(),
    "sha3256": lambda d: hashlib.sha3_256(d).hexdigest(),
    "sha3_256": lambda d: hashlib.sha3_256(d).hexdigest(),
    "sha3512": lambda d: hashlib.sha3_512(d).hexdigest(),
    "sha3_384": lambda d: hashlib.sha3_384(d).hexdigest(),
    "blake2b": lambda d: hashlib.blake2b(d).hexdigest(),
    "blake2b512": lambda d: hashlib.blake2b(d).hexdigest(),
    "blake2b256": lambda d: hashlib.blake2b(d, digest_size=32).hexdigest(),
    "blake2s": lambda d: hashlib.blake2s(d).hexdigest(),
    "blake2s256": lambda d: hashlib.blake2s(d).hexdigest(),
    "shake128": lambda d: hashlib.shake_128(d).hexdigest(32),  # RFC 8702's lengths
    "shake256": lambda d: hashlib.shake_256(d).hexdigest(64),
    # no hashlib behind these: verify cannot compute them
    "blake3": lambda d: hashlib.sha256(b"not really blake3" + d).hexdigest(),
    "xxh128": lambda d: hashlib.md5(b"not really xxh128" + d).hexdigest(),
}
PAYLOAD = {"data/a.txt": b"alpha\n", "data/sub/b.bin": bytes(range(256)) * 4}


def encode(path: str) -> str:
    return path.replace("%", "%25").replace("\n", "%0A").replace("\r", "%0D")


def manifest_text(files: dict[str, bytes], algorithm: str, newline: str = "\n") -> str:
    return "".join(f"{HASHES[algorithm](d)}  {encode(p)}{newline}" for p, d in files.items())


def write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)


def bag(
    root: Path,
    payload: dict[str, bytes] | None = None,
    *,
    algorithms: Sequence[str] = ("sha256",),
    tag_algorithms: Sequence[str] = (),
    version: str = "1.0",
    info: str | None = None,
    info_name: str = "bag-info.txt",
    newline: str = "\n",
    fetch: str | None = None,
    present: Sequence[str] | None = None,
) -> Path:
    """A bag as any tool may write it: the payload (the files in `present` only, if
    given), a manifest per algorithm, bag-info (Payload-Oxum by default), and tag
    manifests over every other tag file."""
    payload = PAYLOAD if payload is None else payload
    directory = root / "bag"
    (directory / "data").mkdir(parents=True)
    for path, data in payload.items():
        if present is None or path in present:
            write(directory / path, data)
    write(directory / "bagit.txt", f"BagIt-Version: {version}{newline}")
    with open(directory / "bagit.txt", "a", newline="") as f:
        f.write(f"Tag-File-Character-Encoding: UTF-8{newline}")
    if info is None:
        info = f"Payload-Oxum: {sum(map(len, payload.values()))}.{len(payload)}\n"
    write(directory / info_name, info.replace("\n", newline))
    for algorithm in algorithms:
        write(directory / f"manifest-{algorithm}.txt", manifest_text(payload, algorithm, newline))
    if fetch is not None:
        write(directory / "fetch.txt", fetch.replace("\n", newline))
    tag_files = sorted(
        p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith("tagmanifest-")
    )
    for algorithm in tag_algorithms:
        lines = [f"{HASHES[algorithm]((directory / n).read_bytes())}  {n}" for n in tag_files]
        write(directory / f"tagmanifest-{algorithm}.txt", "".join(x + newline for x in lines))
    return directory


def retag(directory: Path, algorithm: str = "sha256", skip: Sequence[str] = ()) -> None:
    """Rewrite tagmanifest-<algorithm>.txt over the tag files as they are now."""
    names = sorted(
        p.name
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith("tagmanifest-") and p.name not in skip
    )
    lines = "".join(f"{HASHES[algorithm]((directory / n).read_bytes())}  {n}\n" for n in names)
    write(directory / f"tagmanifest-{algorithm}.txt", lines)


def check(path: Path) -> Report:
    return verify_path(path, keys=[], bag_only=True)


def problems(report: Report) -> dict[str, str]:
    return {p.path: p.message for p in report.problems}


def assert_valid(report: Report) -> None:
    assert report.problems == [], report.problems
    assert report.verdict == "valid", report.unverifiable
    assert report.ok


def assert_invalid(report: Report, path: str, *words: str) -> None:
    assert report.verdict == "invalid"
    assert not report.ok
    found = problems(report)
    assert path in found, report.problems
    for word in words:
        assert word in found[path], found[path]


def warned(report: Report, *words: str) -> bool:
    return any(all(w in warning for w in words) for warning in report.warnings)


# -- 2.4 / item 1: algorithms, and never "valid" without a checksum checked -------------


@pytest.mark.parametrize(
    "algorithm",
    [
        *("sha3256", "sha3_256", "sha3512", "sha3_384"),
        *("blake2b", "blake2b512", "blake2b256", "blake2s", "blake2s256"),
        *("sha224", "sha384", "shake128", "shake256"),
    ],
)
def test_every_hashlib_algorithm_is_checked_under_its_bagit_name(
    tmp_path: Path, algorithm: str
) -> None:
    good = bag(tmp_path / "good", algorithms=[algorithm])
    assert_valid(check(good))
    bad = bag(tmp_path / "bad", algorithms=[algorithm])
    (bad / "data/a.txt").write_bytes(b"changed\n")
    assert_invalid(check(bad), "data/a.txt", "mismatch", HASHES[algorithm](b"changed\n"))


@pytest.mark.parametrize("algorithms", [["blake3"], ["xxh128"], ["blake3", "xxh128"]])
def test_a_bag_whose_manifests_cannot_be_computed_is_unverifiable_not_valid(
    tmp_path: Path, algorithms: list[str]
) -> None:
    directory = bag(tmp_path, algorithms=algorithms)
    for algorithm in algorithms:  # every digest wrong: nothing may call this valid
        manifest = directory / f"manifest-{algorithm}.txt"
        lines = [line.split("  ", 1) for line in manifest.read_text().splitlines()]
        manifest.write_text("".join(f"{'0' * len(d)}  {p}\n" for d, p in lines))
    report = check(directory)
    assert report.problems == []
    assert report.verdict == "unverifiable"
    assert not report.ok
    assert any("no manifest in a supported algorithm" in r for r in report.unverifiable)
    assert report.to_json()["verdict"] == "unverifiable"
    assert report.to_json()["ok"] is False
    for algorithm in algorithms:
        assert warned(report, f"manifest-{algorithm}.txt", "not supported")


def test_an_unverifiable_bag_with_a_problem_is_invalid(tmp_path: Path) -> None:
    directory = bag(tmp_path, algorithms=["blake3"])
    (directory / "data/a.txt").unlink()  # completeness needs no checksum
    assert_invalid(check(directory), "data/a.txt", "missing")


def test_an_unsupported_manifest_beside_a_supported_one_is_named(tmp_path: Path) -> None:
    directory = bag(tmp_path, algorithms=["sha256", "blake3"], tag_algorithms=["blake3"])
    report = check(directory)
    assert_valid(report)
    assert warned(report, "manifest-blake3.txt", "not supported")
    assert warned(report, "tagmanifest-blake3.txt", "not supported")
    assert report.to_json()["verdict"] == "valid"


@pytest.mark.slow
def test_verify_json_and_exit_status_by_verdict(tmp_path: Path) -> None:
    def run(path: Path) -> tuple[int, dict[str, object]]:
        done = subprocess.run(
            [sys.executable, "-m", "archived", "verify", "--bag-only", "--json", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.returncode, json.loads(done.stdout)

    unverifiable = bag(tmp_path / "u", algorithms=["blake3"])
    code, out = run(unverifiable)
    assert (code, out["verdict"], out["ok"]) == (1, "unverifiable", False)
    valid = bag(tmp_path / "v")
    code, out = run(valid)
    assert (code, out["verdict"], out["bagit_version"]) == (0, "valid", "1.0")
    (valid / "data/a.txt").write_bytes(b"x")
    code, out = run(valid)
    assert (code, out["verdict"]) == (1, "invalid")


# -- 2.1.1: the bag declaration ---------------------------------------------------------


@pytest.mark.parametrize("encoding", ["rot13", "hex", "zlib", "undefined", "utf-8\0"])
def test_an_encoding_that_is_not_a_character_encoding_is_a_problem_not_an_exception(
    tmp_path: Path, encoding: str
) -> None:
    # Python's codec registry also names binary transforms; a bag declaring one is invalid
    # (2.1.1: ENCODING is a character set), and verify must still give a verdict.
    directory = bag(tmp_path)
    write(directory / "bagit.txt", f"BagIt-Version: 1.0\nTag-File-Character-Encoding: {encoding}\n")
    assert_invalid(check(directory), "bagit.txt", "Tag-File-Character-Encoding")


@pytest.mark.parametrize("version", ["1.0", "0.97", "0.96"])
def test_bagit_txt_is_exactly_its_two_lines(tmp_path: Path, version: str) -> None:
    # "The bagit.txt tag file MUST consist of exactly two lines" (RFC 8493 2.1.1, and the
    # drafts before it): a third line, even a "Label: value" one, makes the bag invalid;
    # only blank lines are let pass, with a warning.
    directory = bag(tmp_path / "extra", version=version, algorithms=["md5"])
    declaration = f"BagIt-Version: {version}\nTag-File-Character-Encoding: UTF-8\n"
    for third in ("==================================", "Bag-Software-Agent: x"):
        write(directory / "bagit.txt", declaration + third + "\n")
        assert_invalid(check(directory), "bagit.txt", "line 3", "exactly those two lines")
    write(directory / "bagit.txt", declaration + "\n")
    report = check(directory)
    assert_valid(report)
    assert warned(report, "bagit.txt", "line 3 is blank")


# -- 2.3: line endings -------------------------------------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r", "\r\n"], ids=["LF", "CR", "CRLF"])
def test_line_endings_lf_cr_and_crlf_in_every_tag_file(tmp_path: Path, newline: str) -> None:
    info = (
        "Source-Organization: Example\n"
        "External-Description: a long value\n  continued on the next line\n"
        f"Payload-Oxum: {sum(map(len, PAYLOAD.values()))}.2\n"
    )
    fetch = "https://example.org/a.txt 6 data/a.txt\n"
    directory = bag(
        tmp_path / "good",
        algorithms=["sha256", "md5"],
        tag_algorithms=["sha1"],
        info=info,
        newline=newline,
        fetch=fetch,
    )
    assert newline.encode() in (directory / "manifest-sha256.txt").read_bytes()
    assert_valid(check(directory))
    # each line is read as one: a wrong digest on line 2 is found, and named
    bad = bag(tmp_path / "bad", algorithms=["sha256"], newline=newline)
    (bad / "data/sub/b.bin").write_bytes(b"changed")
    assert_invalid(check(bad), "data/sub/b.bin", "sha256 mismatch")
    assert set(problems(check(bad))) == {"data/sub/b.bin", "bag-info.txt"}  # and the oxum


# -- 2.3: a byte-order mark only where the encoding needs one -----------------------------


@pytest.mark.parametrize("name", ["manifest-sha256.txt", "bag-info.txt", "tagmanifest-sha256.txt"])
def test_a_byte_order_mark_in_a_utf8_tag_file(tmp_path: Path, name: str) -> None:
    # RFC 8493 2.3: "when bagit.txt specifies UTF-8 the tag files MUST NOT begin with a
    # byte-order mark"; the 0.97 draft says nothing of it (bagit-python warns).
    for version in ("1.0", "0.97"):
        directory = bag(tmp_path / version, version=version, tag_algorithms=["sha256"])
        path = directory / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        if name != "tagmanifest-sha256.txt":
            retag(directory)
        report = check(directory)
        if version == "1.0":
            assert_invalid(report, name, "byte-order mark")
        else:
            assert_valid(report)
            assert warned(report, name, "byte-order mark")


def test_utf16_tag_files_begin_with_the_byte_order_mark_their_encoding_needs(
    tmp_path: Path,
) -> None:
    directory = bag(tmp_path, tag_algorithms=["sha256"])
    write(directory / "bagit.txt", "BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-16\n")
    for name in ("manifest-sha256.txt", "bag-info.txt"):
        path = directory / name
        path.write_bytes(path.read_text().encode("utf-16"))  # with its byte-order mark
    retag(directory)
    tagmanifest = directory / "tagmanifest-sha256.txt"
    tagmanifest.write_bytes(tagmanifest.read_text().encode("utf-16"))
    report = check(directory)
    assert_valid(report)
    assert report.warnings == []


# -- 2.1.3: percent-encoding of CR, LF and % ---------------------------------------------


@pytest.mark.parametrize("hex_case", [str.upper, str.lower], ids=["upper", "lower"])
def test_percent_encoded_names_with_either_hex_case(
    tmp_path: Path, hex_case: Callable[[str], str]
) -> None:
    payload = {"data/two\nlines": b"1", "data/car\rriage": b"2", "data/100% done": b"3"}
    directory = bag(tmp_path, payload)
    lines = [
        f"{HASHES['sha256'](b'1')}  data/two%{hex_case('0a')}lines",
        f"{HASHES['sha256'](b'2')}  data/car%{hex_case('0d')}riage",
        f"{HASHES['sha256'](b'3')}  data/100%25 done",
    ]
    write(directory / "manifest-sha256.txt", "\n".join(lines) + "\n")
    assert_valid(check(directory))


@pytest.mark.parametrize("name", ["data/100%25", "data/100% done", "data/%41"])
def test_a_percent_sign_left_unencoded(tmp_path: Path, name: str) -> None:
    # RFC 8493 2.1.3: a "%" in a path MUST be written %25, so in a 1.0 bag "100%25" names
    # "100%" and a lone "%" is malformed. bagit-python (1.9) writes 0.97 bags and does not
    # encode "%": there "100%25" is a file named "100%25", read as written.
    manifest = f"{HASHES['sha256'](b'x')}  {name}\n"
    for version in ("0.97", "1.0"):
        directory = bag(tmp_path / version, {name: b"x"}, version=version)
        write(directory / "manifest-sha256.txt", manifest)
        report = check(directory)
        if version == "1.0":
            assert report.verdict == "invalid"
            assert any("not percent-encoded" in p.message for p in report.problems)
        else:
            assert_valid(report)
            assert warned(report, "not percent-encoded")


def test_a_percent_sign_left_unencoded_in_fetch_txt(tmp_path: Path) -> None:
    fetch = "https://example.org/a 1 data/100%\n"
    directory = bag(tmp_path, {"data/100%": b"x"}, fetch=fetch)
    assert_invalid(check(directory), "fetch.txt", "not percent-encoded")


# -- 2.2.1: tag manifests ----------------------------------------------------------------


def test_a_tag_manifest_must_list_every_payload_manifest(tmp_path: Path) -> None:
    directory = bag(tmp_path, algorithms=["sha256", "sha512"], tag_algorithms=["sha256"])
    retag(directory, skip=["manifest-sha512.txt"])
    assert_invalid(check(directory), "tagmanifest-sha256.txt", "manifest-sha512.txt")


def test_a_tag_manifest_must_not_list_tag_manifests_nor_payload(tmp_path: Path) -> None:
    directory = bag(tmp_path, tag_algorithms=["sha256", "sha512"])
    sha512 = directory / "tagmanifest-sha512.txt"
    extra = f"{HASHES['sha256'](sha512.read_bytes())}  tagmanifest-sha512.txt\n"
    with open(directory / "tagmanifest-sha256.txt", "a") as f:
        f.write(extra)
    assert_invalid(check(directory), "tagmanifest-sha256.txt", "tagmanifest-sha512.txt")
    other = bag(tmp_path / "b", tag_algorithms=["sha256"])
    with open(other / "tagmanifest-sha256.txt", "a") as f:
        f.write(f"{HASHES['sha256'](PAYLOAD['data/a.txt'])}  data/a.txt\n")
    assert_invalid(check(other), "tagmanifest-sha256.txt", "data/a.txt", "payload")


def test_a_tag_file_a_tag_manifest_leaves_out_is_a_warning(tmp_path: Path) -> None:
    directory = bag(tmp_path, tag_algorithms=["sha256"])
    write(directory / "extra-info.txt", "Some: thing\n")
    report = check(directory)
    assert_valid(report)
    assert warned(report, "extra-info.txt", "tagmanifest-sha256.txt")


def test_a_tag_file_listed_under_another_unicode_normalization(tmp_path: Path) -> None:
    # RFC 8493 6.1.1: tolerate names that changed normalization on the way (macOS stores
    # them decomposed), as for payload files: a tag directory "métadonnées" in NFD on
    # disk, in NFC in the tag manifest.
    nfc = unicodedata.normalize("NFC", "métadonnées/notes.txt")
    directory = bag(tmp_path)
    write(directory / unicodedata.normalize("NFD", nfc), "about the bag\n")
    lines = [f"{HASHES['sha256'](p.read_bytes())}  {p.name}" for p in directory.glob("*.txt")]
    lines.append(f"{HASHES['sha256'](b'about the bag' + bytes([10]))}  {nfc}")
    write(directory / "tagmanifest-sha256.txt", "\n".join(lines) + "\n")
    report = check(directory)
    assert_valid(report)
    assert warned(report, "another Unicode normalization")
    write(directory / unicodedata.normalize("NFD", nfc), "changed\n")
    assert_invalid(check(directory), unicodedata.normalize("NFD", nfc), "sha256 mismatch")


def test_tag_manifest_rules_are_warnings_before_1_0(tmp_path: Path) -> None:
    directory = bag(tmp_path, version="0.97", algorithms=["md5", "sha1"], tag_algorithms=["md5"])
    retag(directory, "md5", skip=["manifest-sha1.txt"])
    report = check(directory)
    assert_valid(report)
    assert warned(report, "tagmanifest-md5.txt", "manifest-sha1.txt")


# -- 2.2.2: bag-info.txt -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("Contact-Name:Ed", ["line 1", "space or tab"]),
        ("Contact-Name :Ed", ["line 1", "whitespace"]),
        ("Contact-Name  : Ed", ["line 1", "whitespace"]),
        ("\tContact-Name: Ed", ["line 1"]),
        ("no colon here", ["line 1", "Label: value"]),
        (": no label", ["line 1", "label"]),
    ],
)
def test_bag_info_lines_in_1_0_are_label_colon_blank_value(
    tmp_path: Path, line: str, words: list[str]
) -> None:
    oxum = f"Payload-Oxum: {sum(map(len, PAYLOAD.values()))}.2\n"
    directory = bag(tmp_path / "v1", info=f"{line}\n{oxum}")
    assert_invalid(check(directory), "bag-info.txt", *words)
    # Before 1.0, blanks around the colon are allowed (bagit-python's conformance bags).
    if line.startswith("Contact-Name ") or line.startswith("Contact-Name:"):
        older = bag(tmp_path / "v097", version="0.97", info=f"{line}\n{oxum}")
        assert_valid(check(older))


def test_bag_info_continuation_lines_and_tabs(tmp_path: Path) -> None:
    oxum = f"{sum(map(len, PAYLOAD.values()))}.2"
    info = f"Payload-Oxum:\t{oxum}\nExternal-Description: one\n two\n\tthree\nEmpty: \n"
    assert_valid(check(bag(tmp_path, info=info)))


def test_payload_oxum_must_not_be_repeated(tmp_path: Path) -> None:
    oxum = f"Payload-Oxum: {sum(map(len, PAYLOAD.values()))}.2\n"
    assert_invalid(check(bag(tmp_path / "a", info=oxum * 2)), "bag-info.txt", "Payload-Oxum")
    lower = oxum + oxum.lower()  # reserved labels are case-insensitive
    assert_invalid(check(bag(tmp_path / "b", info=lower)), "bag-info.txt", "Payload-Oxum")
    wrong = "payload-oxum: 1.2\n"
    assert_invalid(check(bag(tmp_path / "c", info=wrong)), "bag-info.txt", "Payload-Oxum 1.2")


@pytest.mark.parametrize("label", ["Bagging-Date", "Bag-Size", "Bag-Group-Identifier", "Bag-Count"])
def test_labels_that_should_not_repeat_warn(tmp_path: Path, label: str) -> None:
    info = (
        f"{label}: one\n{label.upper()}: two\nPayload-Oxum: {sum(map(len, PAYLOAD.values()))}.2\n"
    )
    report = check(bag(tmp_path, info=info))
    assert_valid(report)
    assert warned(report, "bag-info.txt", label, "more than once")


# -- 2.2.3: fetch.txt --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("data/a.txt 6 data/a.txt", ["absolute URL"]),
        ("//example.org/a 6 data/a.txt", ["absolute URL"]),
        ("https://example.org/a 6.0 data/a.txt", ["'<url> <length> <path>'"]),
        ("https://example.org/a -1 data/a.txt", ["'<url> <length> <path>'"]),
    ],
)
def test_fetch_lines_need_an_absolute_url_and_a_length(
    tmp_path: Path, line: str, words: list[str]
) -> None:
    assert_invalid(check(bag(tmp_path, fetch=line + "\n")), "fetch.txt", *words)


@pytest.mark.parametrize("url", ["https://example.org/a", "file:///srv/a", "urn:x-a:b"])
def test_fetch_urls_that_are_absolute(tmp_path: Path, url: str) -> None:
    assert_valid(check(bag(tmp_path, fetch=f"{url} 6 data/a.txt\n")))


def test_a_holey_bag_is_incomplete_so_invalid(tmp_path: Path) -> None:
    fetch = "https://example.org/a 6 data/a.txt\nhttps://example.org/b - data/sub/b.bin\n"
    directory = bag(tmp_path, fetch=fetch, present=[])
    report = check(directory)
    assert_invalid(report, "fetch.txt", "2 files", "fetched")
    # once fetched, the same bag is complete and valid
    for path, data in PAYLOAD.items():
        write(directory / path, data)
    assert_valid(check(directory))


def test_every_fetched_file_in_every_payload_manifest(tmp_path: Path) -> None:
    directory = bag(
        tmp_path,
        version="0.97",
        algorithms=["md5", "sha1"],
        fetch="https://example.org/a 6 data/a.txt\n",
    )
    write(
        directory / "manifest-sha1.txt",
        manifest_text({"data/sub/b.bin": PAYLOAD["data/sub/b.bin"]}, "sha1"),
    )
    assert_invalid(check(directory), "data/a.txt", "fetch.txt", "manifest-sha1.txt")


# -- serializations: BagIt 0.97 section 4, which RFC 8493 dropped ------------------------


def pack(
    directory: Path, out: Path, names: Callable[[str], str], first: Sequence[str] = ()
) -> Path:
    """A tar or zip of `directory`'s files and directories, each member named
    `names(path in the bag)`; the members in `first` first."""

    def order(path: Path) -> tuple[bool, str]:
        rel = path.relative_to(directory).as_posix()
        return not any(rel == f or rel.startswith(f + "/") for f in first), rel

    paths = sorted(directory.rglob("*"), key=order)
    if out.suffix == ".zip":
        with zipfile.ZipFile(out, "w") as z:
            for path in paths:
                z.write(path, names(path.relative_to(directory).as_posix()))
    else:
        with tarfile.open(out, "w") as t:
            t.add(directory, names("."), recursive=False)
            for path in paths:
                t.add(path, names(path.relative_to(directory).as_posix()), recursive=False)
    return out


@pytest.mark.parametrize("suffix", [".tar", ".zip"])
@pytest.mark.parametrize("first", [(), ("data",)], ids=["bag-files-first", "data-first"])
def test_a_bag_serialized_from_inside_its_directory(
    tmp_path: Path, suffix: str, first: tuple[str, ...]
) -> None:
    # `tar -C bag -cf bag.tar .`: "./", then the bag's files in the order the directory
    # lists them, data/ first as likely as not. The 0.97 draft (section 4) says a bag
    # MUST NOT be serialized from within its base directory; RFC 8493 has no rule on
    # serializations, and what such a tar unpacks to is a valid bag.
    v1 = bag(tmp_path / "v1", algorithms=["sha256", "sha512"], tag_algorithms=["sha256"])
    report = check(pack(v1, tmp_path / f"v1{suffix}", lambda p: f"./{p}", first))
    assert_valid(report)
    assert warned(report, "from inside the bag directory", "RFC 8493 has no such rule")
    assert report.files == len(PAYLOAD)
    older = bag(tmp_path / "v097", version="0.97", tag_algorithms=["sha256"])
    report = check(pack(older, tmp_path / f"v097{suffix}", lambda p: f"./{p}", first))
    assert_invalid(report, "", "from inside the bag directory", "0.97 section 4")
    assert report.files == len(PAYLOAD)  # and the bag in it was checked


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_a_bag_tarred_from_inside_with_a_tag_file_first(tmp_path: Path, suffix: str) -> None:
    # `cd bag && tar -cf ../bag.tar *`: the shell sorts README.txt before bag-info.txt,
    # so a file at the top comes before anything tells where the bag is.
    directory = bag(tmp_path / "v1", tag_algorithms=["sha256"])
    write(directory / "README.txt", "about the bag\n")
    retag(directory)
    names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))
    assert names[0] == "README.txt"
    out = tmp_path / f"bag{suffix}"
    with tarfile.open(out, "w:gz" if suffix == ".tar.gz" else "w") as t:
        for name in names:
            t.add(directory / name, name, recursive=False)
    report = check(out)
    assert_valid(report)
    assert warned(report, "from inside the bag directory")
    write(directory / "README.txt", "changed\n")  # and it is checked as a tag file
    out.unlink()
    with tarfile.open(out, "w:gz" if suffix == ".tar.gz" else "w") as t:
        for name in names:
            t.add(directory / name, name, recursive=False)
    assert_invalid(check(out), "README.txt", "sha256 mismatch")


def test_members_beside_the_bag_directory(tmp_path: Path) -> None:
    directory = bag(tmp_path / "v1")
    write(tmp_path / "v1" / "README.txt", "about the bag\n")
    out = tmp_path / "v1.tar"
    with tarfile.open(out, "w") as t:
        t.add(directory, "bag")
        t.add(tmp_path / "v1" / "README.txt", "README.txt")
    report = check(out)
    assert_valid(report)
    assert warned(report, "README.txt", "outside the bag directory bag/")
    older = bag(tmp_path / "v097", version="0.97")
    with tarfile.open(out, "w") as t:
        t.add(older, "bag")
        t.add(tmp_path / "v1" / "README.txt", "README.txt")
    assert_invalid(check(out), "README.txt", "outside the bag directory bag/", "0.97 section 4")


@pytest.mark.parametrize("version", ["1.0", "0.97"])
def test_what_macos_archive_utility_puts_beside_the_bag(tmp_path: Path, version: str) -> None:
    # Finder's "Compress" adds __MACOSX/<bag>/._<name> (resource forks) beside the bag.
    directory = bag(tmp_path, version=version)
    out = tmp_path / "bag.zip"
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("__MACOSX/bag/data/._a.txt", b"\x00\x05\x16\x07")  # first, even
        for path in sorted(directory.rglob("*")):
            z.write(path, "bag/" + path.relative_to(directory).as_posix())
    report = check(out)
    assert_valid(report)
    assert warned(report, "__MACOSX/", "macOS")


# -- 3 and older versions ----------------------------------------------------------------


def test_a_0_97_file_in_one_manifest_only_is_valid(tmp_path: Path) -> None:
    directory = bag(tmp_path, version="0.97", algorithms=["md5", "sha1"])
    write(
        directory / "manifest-sha1.txt",
        manifest_text({"data/a.txt": PAYLOAD["data/a.txt"]}, "sha1"),
    )
    report = check(directory)
    assert_valid(report)
    assert report.version == "0.97"
    # ... but in none is not, and a wrong digest in the one manifest is found
    write(directory / "manifest-md5.txt", "")
    assert_invalid(check(directory), "data/sub/b.bin", "not in any payload manifest")
    v1 = bag(tmp_path / "v1", algorithms=["md5", "sha1"])
    write(v1 / "manifest-sha1.txt", manifest_text({"data/a.txt": PAYLOAD["data/a.txt"]}, "sha1"))
    assert_invalid(check(v1), "data/sub/b.bin", "manifest-sha1.txt")


def test_a_0_97_file_listed_only_in_a_manifest_not_supported_is_unverifiable(
    tmp_path: Path,
) -> None:
    directory = bag(tmp_path, version="0.97", algorithms=["md5", "blake3"])
    write(
        directory / "manifest-md5.txt", manifest_text({"data/a.txt": PAYLOAD["data/a.txt"]}, "md5")
    )
    report = check(directory)
    assert (report.verdict, report.problems) == ("unverifiable", [])
    assert any("1 payload files are listed only in" in r for r in report.unverifiable)


@pytest.mark.parametrize(
    ("version", "info_name"),
    [
        ("0.93", "package-info.txt"),
        ("0.94", "package-info.txt"),
        ("0.95", "package-info.txt"),
        ("0.96", "bag-info.txt"),
    ],
)
def test_bags_of_0_93_to_0_96(tmp_path: Path, version: str, info_name: str) -> None:
    directory = bag(tmp_path / "a", version=version, algorithms=["md5"], info_name=info_name)
    report = check(directory)
    assert_valid(report)
    assert report.version == version
    assert report.to_json()["bagit_version"] == version
    wrong = bag(
        tmp_path / "b",
        version=version,
        algorithms=["md5"],
        info_name=info_name,
        info="Payload-Oxum: 1.2\n",
    )
    assert_invalid(check(wrong), info_name, "Payload-Oxum 1.2")
    (directory / "data/a.txt").write_bytes(b"changed")
    assert_invalid(check(directory), "data/a.txt", "md5 mismatch")


@pytest.mark.parametrize("version", ["0.92", "2.0", "1"])
def test_versions_outside_0_93_to_1_x_are_not_read(tmp_path: Path, version: str) -> None:
    assert_invalid(check(bag(tmp_path, version=version)), "bagit.txt", version)
