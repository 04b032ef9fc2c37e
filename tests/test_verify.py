"""verify: real bags built by hand in tmp_path, tarred with tarfile, then broken one way each."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import bagit  # type: ignore[import-untyped]
import pytest

from archived.bag import BAGIT_TXT, EVENTS, MANIFEST, SIGNATURE, TAG_FILES, TAGMANIFEST, TIMESTAMP
from archived.minisign import SecretKey
from archived.verify import Problem, Report, verify_path

BAG = "job-1-20240101T000000Z"
PAYLOAD = {
    "data/docs/a.txt": b"hello, archive\n",
    "data/docs/b.bin": bytes(range(256)) * 41,
    "data/logs/two\nlines.txt": b"a name BagIt must percent-encode\n",
}
# the Library of Congress BagIt conformance suite (public domain, CC0), kept in the repository
CONFORMANCE = Path(__file__).resolve().parent / "data" / "bagit-conformance"


def encode(path: str) -> str:
    return path.replace("%", "%25").replace("\n", "%0A").replace("\r", "%0D")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def key() -> SecretKey:
    return SecretKey.generate()


def make_bag(
    root: Path,
    key: SecretKey,
    *,
    payload: dict[str, bytes] | None = None,
    oxum: str | None = None,
    sign_with: SecretKey | None = None,
    info_extra: str = "",
) -> Path:
    """A bag directory as the packer lays it out, written here without the packer."""
    payload = PAYLOAD if payload is None else payload
    bag = root / BAG
    for path, data in payload.items():
        (bag / path).parent.mkdir(parents=True, exist_ok=True)
        (bag / path).write_bytes(data)
    (bag / "data").mkdir(parents=True, exist_ok=True)
    total = sum(len(d) for d in payload.values())
    (bag / "bagit.txt").write_text(BAGIT_TXT, encoding="utf-8")
    (bag / "bag-info.txt").write_text(
        "Bagging-Date: 2024-01-01\n"
        "External-Identifier: job-1\n"
        f"Payload-Oxum: {oxum or f'{total}.{len(payload)}'}\n" + info_extra,
        encoding="utf-8",
    )
    (bag / MANIFEST).write_text(
        "".join(f"{sha256(d)}  {encode(p)}\n" for p, d in sorted(payload.items())),
        encoding="utf-8",
        newline="\n",
    )
    (bag / EVENTS).write_text(
        json.dumps({"event": "created", "job": "job-1"}) + "\n", encoding="utf-8"
    )
    tagmanifest = "".join(f"{sha256((bag / n).read_bytes())}  {n}\n" for n in TAG_FILES)
    (bag / TAGMANIFEST).write_text(tagmanifest, encoding="utf-8", newline="\n")
    signature = (sign_with or key).sign(tagmanifest.encode(), trusted_comment="job-1")
    (bag / SIGNATURE).write_text(signature, encoding="utf-8")
    return bag


def make_tar(
    bag: Path,
    out: Path,
    *,
    extra: Sequence[tuple[tarfile.TarInfo, bytes | None]] = (),
    skip: tuple[str, ...] = (),
    mode: Literal["w", "w:gz"] = "w",
) -> Path:
    """`bag` as a PAX tar under its own name, tag files first, plus hand-made members."""
    names = sorted(p.relative_to(bag).as_posix() for p in bag.rglob("*") if p.is_file())
    names.sort(key=lambda n: n.startswith("data/"))
    with tarfile.open(out, mode, format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            if name not in skip:
                tar.add(bag / name, arcname=f"{bag.name}/{name}", recursive=False)
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def member(name: str, data: bytes = b"", **attrs: object) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for attr, value in attrs.items():
        setattr(info, attr, value)
    return info, data


def paths(report: Report) -> dict[str, str]:
    return {p.path: p.message for p in report.problems}


def only_problem(report: Report) -> Problem:
    assert len(report.problems) == 1, report.problems
    return report.problems[0]


# -- good bags ---------------------------------------------------------------------------


def test_good_archive_verifies_and_names_the_signing_key(tmp_path: Path, key: SecretKey) -> None:
    tar = make_tar(make_bag(tmp_path, key), tmp_path / "a.tar")
    report = verify_path(tar, keys=[key.public_key()])
    assert report.ok, report.problems
    assert report.bag == BAG
    assert report.signed_by == key.public_key().key_id_hex
    assert (report.files, report.bytes) == (3, sum(len(d) for d in PAYLOAD.values()))
    assert report.to_json()["ok"] is True
    assert report.to_json()["problems"] == []


def test_good_bag_directory_verifies(tmp_path: Path, key: SecretKey) -> None:
    report = verify_path(make_bag(tmp_path, key), keys=[key.public_key()])
    assert report.ok, report.problems
    assert report.signed_by == key.public_key().key_id_hex
    assert report.files == 3


def test_the_test_bag_is_valid_for_bagit_python(tmp_path: Path, key: SecretKey) -> None:
    bag = bagit.Bag(str(make_bag(tmp_path, key)))
    bag.validate()  # raises on any problem
    assert set(bag.payload_entries()) == set(PAYLOAD)


@pytest.mark.skipif(shutil.which("minisign") is None, reason="no minisign binary")
def test_what_verify_accepts_the_spec_s_manual_check_accepts(
    tmp_path: Path, key: SecretKey
) -> None:
    tar = make_tar(make_bag(tmp_path / "src", key), tmp_path / "a.tar")
    assert verify_path(tar, keys=[key.public_key()]).ok
    with tarfile.open(tar) as t:
        t.extractall(tmp_path / "out", filter="data")
    bag = tmp_path / "out" / BAG
    bagit.Bag(str(bag)).validate()
    (tmp_path / "archived.pub").write_text(key.public_key().dumps())
    subprocess.run(
        ["minisign", "-Vm", str(bag / TAGMANIFEST), "-p", str(tmp_path / "archived.pub")],
        check=True,
        capture_output=True,
    )


def test_what_the_writer_and_packer_write_verifies(tmp_path: Path, key: SecretKey) -> None:
    """Fragments from every ArtifactWriter entry point, the head and END, concatenated."""
    import io

    from archived import bag as packer
    from archived.artifacts import HASH_ASIDE, SMALL_FILE, ArtifactWriter
    from archived.tarformat import END

    big = bytes(range(256)) * (SMALL_FILE // 128)  # past the whole-file path
    long_name = "deep/" * 30 + "long name.txt"  # past ustar's 100 bytes: a PAX header
    parts = tmp_path / "parts"
    writers = []
    for activity in ("docs", "logs"):
        writer = ArtifactWriter(parts / f"{activity}.tar", BAG, activity, tmp_path / activity)
        writer.start()
        writers.append(writer)
    docs, logs = writers
    docs.add("a.txt", b"hello, archive\n", 1_700_000_000.5)
    for i in range(3):  # big enough to be hashed aside, in a helper thread
        docs.add(f"mid{i}.bin", bytes([i]) * (HASH_ASIDE + 1), 1_700_000_000)
    docs.add("caf\u00e9/\u65e5\u672c.txt", b"non-ASCII names get PAX headers\n", 0)
    docs.add(long_name, b"", 1_700_000_000)
    docs.copy_from("big.bin", io.BytesIO(big), len(big), 1_700_000_000)
    staged = tmp_path / "snapshot"
    staged.write_bytes(b"adopted\n")
    logs.adopt("snap.db", staged)
    with logs.stream("two\nlines.txt") as sink:
        sink.write(b"streamed, ")
        sink.write(b"length unknown up front\n")
    results = [w.finish() for w in writers]
    assert not staged.exists()
    assert [r["files"] for r in results] == [7, 2]
    # records in member order, each with the digest of its member's data
    for writer, result in zip(writers, results, strict=True):
        assert packer.verify_fragment(writer.fragment, writer.records_path) == (
            result["files"],
            result["bytes"],
        )
    assert [r["tar_bytes"] for r in results] == [
        (parts / f"{a}.tar").stat().st_size for a in ("docs", "logs")
    ]

    bag_dir = tmp_path / "bag"
    bag_dir.mkdir()
    records = [w.records_path for w in writers]
    oxum = packer.write_payload_manifest(bag_dir, records)
    assert (oxum.files, oxum.bytes) == (9, sum(r["bytes"] for r in results))
    tags = packer.tag_files(
        packer.bag_info(job_id="job-1", bagging_date="2024-01-01", oxum=oxum, metadata={}),
        [{"event": "created"}],
    )
    packer.sign_tags(tags, bag_dir, lambda data: key.sign(data, trusted_comment="job-1"))
    head, end = tmp_path / "head.tar", tmp_path / "end.tar"
    packer.write_head(bag_dir, tags, BAG, head)
    end.write_bytes(END)
    archive = [head, parts / "docs.tar", parts / "logs.tar", end]
    out_tar = tmp_path / "out.tar"
    out_tar.write_bytes(b"".join(p.read_bytes() for p in archive))
    packed = packer.digest(archive)
    assert (packed.sha256, packed.size) == (sha256(out_tar.read_bytes()), out_tar.stat().st_size)

    report = verify_path(out_tar, keys=[key.public_key()])
    assert report.ok, report.problems
    assert (report.bag, report.files) == (BAG, 9)
    # what GNU tar and bagit-python, which we did not write, make of it
    listing = subprocess.run(
        ["tar", "-tvf", str(out_tar)], check=True, capture_output=True, text=True
    ).stdout
    assert f"{BAG}/data/docs/{long_name}" in listing
    assert f"{BAG}/data/docs/caf\u00e9/\u65e5\u672c.txt" in listing
    (tmp_path / "out").mkdir()
    subprocess.run(["tar", "-xf", str(out_tar), "-C", str(tmp_path / "out")], check=True)
    extracted = tmp_path / "out" / BAG
    bagit.Bag(str(extracted)).validate()
    assert (extracted / "data" / "docs" / "big.bin").read_bytes() == big
    assert (extracted / "data" / "docs" / "a.txt").stat().st_mtime == 1_700_000_000


def test_the_fast_tar_header_is_what_tarfile_reads_back() -> None:
    from archived.tarformat import tar_header

    for name, size, mtime in [
        ("b/data/x/a.txt", 0, 0),
        ("b/data/x/" + "n" * 91, 8**11 - 1, 8**11 - 1),  # the largest a ustar header holds
        ("b/data/x/" + "n" * 92, 1, 1),  # 101 bytes: PAX
        ("b/data/x/big", 8**11, 1_700_000_000),  # 8 GiB: PAX
        ("b/data/x/\u00e9", 5, 1_700_000_000),
    ]:
        header = tar_header(name, size, mtime)
        assert len(header) % 512 == 0
        with tarfile.open(fileobj=io.BytesIO(header + bytes(-size % 512 + 1024)), mode="r|") as t:
            info = t.next()
        assert info is not None
        assert (info.name, info.size, info.mtime, info.mode, info.type, info.uname) == (
            name,
            size,
            mtime,
            0o644,
            tarfile.REGTYPE,
            "",
        ), name
        if len(name) <= 100 and name.isascii() and size < 8**11:
            expected = tarfile.TarInfo(name)
            expected.size, expected.mtime, expected.mode = size, mtime, 0o644
            expected.uname = expected.gname = ""
            assert header == expected.tobuf(tarfile.USTAR_FORMAT), name


def test_percent_in_a_name_is_encoded_as_rfc_8493_says(tmp_path: Path, key: SecretKey) -> None:
    # bagit-python (1.9) does not decode %25, so this bag is not in the cross-check above.
    payload = {"data/logs/100% done.txt": b"x", "data/logs/%0A literally": b"y"}
    bag = make_bag(tmp_path, key, payload=payload)
    assert "data/logs/100%25 done.txt" in (bag / MANIFEST).read_text()
    report = verify_path(make_tar(bag, tmp_path / "a.tar"), keys=[key.public_key()])
    assert report.ok, report.problems
    assert report.files == 2


def test_names_that_trip_line_splitting(tmp_path: Path, key: SecretKey) -> None:
    # Trailing blanks and Unicode line separators are part of a name in BagIt 1.0;
    # the events file is written with ensure_ascii=False, so it may hold U+2028 too.
    payload = {"data/x/ends with space ": b"1", "data/x/sep\u2028\x85\x0cname": b"2"}
    bag = make_bag(tmp_path, key, payload=payload)
    (bag / EVENTS).write_text(json.dumps({"note": "a\u2028b"}, ensure_ascii=False) + "\n")
    lines = [f"{sha256((bag / n).read_bytes())}  {n}\n" for n in TAG_FILES]
    (bag / TAGMANIFEST).write_text("".join(lines))
    (bag / SIGNATURE).write_text(key.sign("".join(lines).encode(), trusted_comment="x"))
    report = verify_path(make_tar(bag, tmp_path / "a.tar"), keys=[key.public_key()])
    assert report.ok, report.problems
    assert report.files == 2


def test_empty_payload_needs_a_data_directory(tmp_path: Path, key: SecretKey) -> None:
    bag = make_bag(tmp_path, key, payload={})
    assert verify_path(bag, keys=[key.public_key()]).ok
    files_only = make_tar(bag, tmp_path / "a.tar")
    assert paths(verify_path(files_only, keys=[key.public_key()])) == {
        "data": "payload directory missing"
    }
    data_dir = tarfile.TarInfo(f"{BAG}/data")
    data_dir.type = tarfile.DIRTYPE
    with_dir = make_tar(bag, tmp_path / "b.tar", extra=[(data_dir, None)])
    assert verify_path(with_dir, keys=[key.public_key()]).ok


def test_compressed_tar_is_read_too(tmp_path: Path, key: SecretKey) -> None:
    tar = make_tar(make_bag(tmp_path, key), tmp_path / "a.tar.gz", mode="w:gz")
    report = verify_path(tar, keys=[key.public_key()])
    assert report.ok, report.problems


def test_any_of_several_keys_may_verify(tmp_path: Path, key: SecretKey) -> None:
    other = SecretKey.generate().public_key()
    tar = make_tar(make_bag(tmp_path, key), tmp_path / "a.tar")
    report = verify_path(tar, keys=[other, key.public_key()])
    assert report.ok, report.problems
    assert report.signed_by == key.public_key().key_id_hex


# -- each way to break it names the file -------------------------------------------------


def test_flipped_payload_byte_names_the_file_and_both_digests(
    tmp_path: Path, key: SecretKey
) -> None:
    bag = make_bag(tmp_path, key)
    original = (bag / "data/docs/b.bin").read_bytes()
    broken = bytearray(original)
    broken[1000] ^= 0x01
    (bag / "data/docs/b.bin").write_bytes(bytes(broken))
    for target in (make_tar(bag, tmp_path / "a.tar"), bag):
        problem = only_problem(verify_path(target, keys=[key.public_key()]))
        assert problem.path == "data/docs/b.bin"
        assert problem.message == (
            f"sha256 mismatch: expected {sha256(original)}, got {sha256(bytes(broken))}"
        )


def test_changed_bag_info_breaks_the_tag_manifest(tmp_path: Path, key: SecretKey) -> None:
    bag = make_bag(tmp_path, key)
    info = bag / "bag-info.txt"
    info.write_text(info.read_text().replace("job-1", "job-2"))
    report = verify_path(make_tar(bag, tmp_path / "a.tar"), keys=[key.public_key()])
    problem = only_problem(report)
    assert problem.path == "bag-info.txt"
    assert problem.message.startswith("sha256 mismatch: expected ")
    assert sha256(info.read_bytes()) in problem.message
    assert report.signed_by == key.public_key().key_id_hex  # the manifest itself is intact


def test_missing_payload_file(tmp_path: Path, key: SecretKey) -> None:
    tar = make_tar(make_bag(tmp_path, key), tmp_path / "a.tar", skip=("data/docs/a.txt",))
    report = verify_path(tar, keys=[key.public_key()])
    assert paths(report) == {
        "data/docs/a.txt": f"missing from payload (listed in {MANIFEST})",
        "bag-info.txt": f"Payload-Oxum {sum(len(d) for d in PAYLOAD.values())}.3 does not "
        f"match the payload: {report.bytes} bytes in 2 files",
    }


def test_extra_payload_file(tmp_path: Path, key: SecretKey) -> None:
    extra = member(f"{BAG}/data/docs/smuggled.txt", b"not listed\n")
    tar = make_tar(make_bag(tmp_path, key), tmp_path / "a.tar", extra=[extra])
    report = verify_path(tar, keys=[key.public_key()])
    assert paths(report)["data/docs/smuggled.txt"] == f"not in {MANIFEST}"
    assert "Payload-Oxum" in paths(report)["bag-info.txt"]
    assert len(report.problems) == 2


def test_extra_file_in_a_bag_directory(tmp_path: Path, key: SecretKey) -> None:
    bag = make_bag(tmp_path, key)
    (bag / "data/docs/smuggled.txt").write_bytes(b"x")
    assert (
        "not in manifest"
        in paths(verify_path(bag, keys=[key.public_key()]))["data/docs/smuggled.txt"]
    )


def test_signature_by_another_key(tmp_path: Path, key: SecretKey) -> None:
    tar = make_tar(make_bag(tmp_path, key, sign_with=SecretKey.generate()), tmp_path / "a.tar")
    report = verify_path(tar, keys=[key.public_key()])
    problem = only_problem(report)
    assert problem.path == SIGNATURE
    assert problem.message.startswith("signature does not verify: ")
    assert report.signed_by is None


def test_missing_signature_fails_unless_bag_only(tmp_path: Path, key: SecretKey) -> None:
    tar = make_tar(make_bag(tmp_path, key), tmp_path / "a.tar", skip=(SIGNATURE,))
    problem = only_problem(verify_path(tar, keys=[key.public_key()]))
    assert problem == Problem(SIGNATURE, "missing: the archive is not signed")
    assert verify_path(tar, keys=[], bag_only=True).ok


def test_no_key_to_check_against(tmp_path: Path, key: SecretKey) -> None:
    tar = make_tar(make_bag(tmp_path, key), tmp_path / "a.tar")
    problem = only_problem(verify_path(tar, keys=[]))
    assert problem == Problem(SIGNATURE, "no public key to check the signature against")


def test_tampered_tag_manifest_fails_the_signature(tmp_path: Path, key: SecretKey) -> None:
    bag = make_bag(tmp_path, key)
    info = bag / "bag-info.txt"
    info.write_text(info.read_text() + "Note: added later\n")
    lines = [f"{sha256((bag / n).read_bytes())}  {n}\n" for n in TAG_FILES]
    (bag / TAGMANIFEST).write_text("".join(lines))  # consistent again, but not re-signed
    problem = only_problem(verify_path(make_tar(bag, tmp_path / "a.tar"), keys=[key.public_key()]))
    assert problem.path == SIGNATURE
    assert problem.message.startswith("signature does not verify")


def test_wrong_payload_oxum(tmp_path: Path, key: SecretKey) -> None:
    total = sum(len(d) for d in PAYLOAD.values())
    tar = make_tar(make_bag(tmp_path, key, oxum=f"{total + 1}.3"), tmp_path / "a.tar")
    problem = only_problem(verify_path(tar, keys=[key.public_key()]))
    assert problem == Problem(
        "bag-info.txt",
        f"Payload-Oxum {total + 1}.3 does not match the payload: {total} bytes in 3 files",
    )


def test_tag_file_not_covered_by_the_tag_manifest(tmp_path: Path, key: SecretKey) -> None:
    bag = make_bag(tmp_path, key)
    lines = [f"{sha256((bag / n).read_bytes())}  {n}\n" for n in TAG_FILES if n != EVENTS]
    (bag / TAGMANIFEST).write_text("".join(lines))
    (bag / SIGNATURE).write_text(key.sign("".join(lines).encode(), trusted_comment="x"))
    problem = only_problem(verify_path(bag, keys=[key.public_key()]))
    assert problem.path == EVENTS
    assert "not covered by" in problem.message


def test_names_lost_on_extraction_are_a_warning_in_archives(tmp_path: Path, key: SecretKey) -> None:
    """Equal after Unicode normalization, or but for case: two files in the tar, one on
    a case-insensitive or normalizing file system, and bsdtar keeps one of them."""
    payload = {
        **PAYLOAD,
        "data/docs/Read.me": b"1",
        "data/docs/read.ME": b"2",
        "data/docs/caf\u00e9": b"3",
        "data/docs/cafe\u0301": b"4",
    }
    report = verify_path(
        make_tar(make_bag(tmp_path, key, payload=payload), tmp_path / "a.tar"),
        keys=[key.public_key()],
    )
    assert report.ok, report.problems
    collisions = [w for w in report.warnings if "would collide" in w]
    assert len(collisions) == 2, report.warnings
    assert any("Read.me" in w and "read.ME" in w for w in collisions)


# -- tar safety --------------------------------------------------------------------------


def test_member_with_dotdot(tmp_path: Path, key: SecretKey) -> None:
    name = f"{BAG}/data/../../escape.txt"
    tar = make_tar(make_bag(tmp_path, key), tmp_path / "a.tar", extra=[member(name, b"x")])
    problem = only_problem(verify_path(tar, keys=[key.public_key()]))
    assert problem == Problem(name, "unsafe member name: contains '..'")


def test_absolute_member(tmp_path: Path, key: SecretKey) -> None:
    tar = make_tar(make_bag(tmp_path, key), tmp_path / "a.tar", extra=[member("/etc/evil", b"x")])
    assert paths(verify_path(tar, keys=[key.public_key()])) == {
        "/etc/evil": "unsafe member name: absolute path"
    }


def test_symlink_member(tmp_path: Path, key: SecretKey) -> None:
    link = member(f"{BAG}/data/docs/link", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    tar = make_tar(make_bag(tmp_path, key), tmp_path / "a.tar", extra=[link])
    problem = only_problem(verify_path(tar, keys=[key.public_key()]))
    assert problem.path == "data/docs/link"
    assert problem.message.startswith("symbolic link to '/etc/passwd'")


def test_hardlink_member(tmp_path: Path, key: SecretKey) -> None:
    # A hard link unpacks to a copy of the file it links to: one more payload file.
    link = member(f"{BAG}/data/docs/hard", type=tarfile.LNKTYPE, linkname=f"{BAG}/data/docs/a.txt")
    tar = make_tar(make_bag(tmp_path, key), tmp_path / "a.tar", extra=[link])
    found = paths(verify_path(tar, keys=[key.public_key()]))
    assert found["data/docs/hard"] == f"not in {MANIFEST}"
    assert found["bag-info.txt"].startswith("Payload-Oxum")


def test_duplicate_member(tmp_path: Path, key: SecretKey) -> None:
    again = member(f"{BAG}/data/docs/a.txt", PAYLOAD["data/docs/a.txt"])
    tar = make_tar(make_bag(tmp_path, key), tmp_path / "a.tar", extra=[again])
    problem = only_problem(verify_path(tar, keys=[key.public_key()]))
    assert problem == Problem("data/docs/a.txt", "duplicate member in the tar")


def test_member_outside_the_bag_directory(tmp_path: Path, key: SecretKey) -> None:
    tar = make_tar(
        make_bag(tmp_path, key), tmp_path / "a.tar", extra=[member("other/readme.txt", b"x")]
    )
    problem = only_problem(verify_path(tar, keys=[key.public_key()]))
    assert problem.path == "other/readme.txt"
    assert problem.message.startswith(f"outside the bag directory {BAG}/")


def test_truncated_tar_is_a_problem_not_an_exception(tmp_path: Path, key: SecretKey) -> None:
    whole = make_tar(make_bag(tmp_path, key), tmp_path / "a.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2 + 100])
    report = verify_path(cut, keys=[key.public_key()])
    assert not report.ok
    assert report.problems[0].path == ""
    assert report.problems[0].message.startswith("cannot read the tar")


def test_damage_anywhere_is_a_problem_not_an_exception(tmp_path: Path, key: SecretKey) -> None:
    tar = make_tar(make_bag(tmp_path, key), tmp_path / "a.tar")
    whole = tar.read_bytes()
    with tarfile.open(tar) as t:
        # Every byte of a header block is under its checksum; every content byte
        # under a manifest or the signature. (Not so a PAX header's records: mtime.)
        covered = [
            r
            for m in t.getmembers()
            for r in ((m.offset, m.offset + 512), (m.offset_data - 512, m.offset_data + m.size))
        ]
    damaged = tmp_path / "d.tar"
    detected = 0
    for offset in range(0, len(whole), 97):
        data = bytearray(whole)
        data[offset] ^= 0xFF
        damaged.write_bytes(bytes(data))
        report = verify_path(damaged, keys=[key.public_key()])  # never raises
        if any(start <= offset < end for start, end in covered):
            assert not report.ok, offset
            detected += 1
    assert detected > 20


@pytest.mark.parametrize(
    "content", [b"", b"not a tar at all" * 100, gzip.compress(b"junk", mtime=0)]
)
def test_garbage_is_a_problem_not_an_exception(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.tar"
    path.write_bytes(content)
    report = verify_path(path, keys=[])
    assert not report.ok
    assert report.problems[0].path == ""


def test_missing_path(tmp_path: Path) -> None:
    report = verify_path(tmp_path / "nope.tar", keys=[])
    assert report.problems[0].path == ""
    assert "No such file" in report.problems[0].message


# -- bag directories ---------------------------------------------------------------------


def test_symlink_in_a_bag_directory_is_not_followed(tmp_path: Path, key: SecretKey) -> None:
    bag = make_bag(tmp_path, key)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"s")
    (bag / "data/docs/dir-link").symlink_to(outside)
    (bag / "data/docs/file-link").symlink_to(outside / "secret.txt")
    report = verify_path(bag, keys=[key.public_key()])
    assert set(paths(report)) == {"data/docs/dir-link", "data/docs/file-link"}
    assert all(m.startswith("symbolic link to ") for m in paths(report).values())
    assert report.files == 3


def test_missing_payload_file_in_a_bag_directory(tmp_path: Path, key: SecretKey) -> None:
    bag = make_bag(tmp_path, key)
    (bag / "data/docs/a.txt").unlink()
    assert paths(verify_path(bag, keys=[key.public_key()]))["data/docs/a.txt"] == (
        f"missing from payload (listed in {MANIFEST})"
    )


# -- bag_only: any BagIt bag -------------------------------------------------------------


def test_bag_only_accepts_other_algorithms_in_one_pass(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "x.txt").write_bytes(b"x" * 5000)
    (src / "y.txt").write_bytes(b"y")
    bagit.make_bag(str(src), checksums=["md5", "sha1", "sha512"])
    assert verify_path(src, keys=[], bag_only=True).ok
    # Payload before the manifests in the tar: hashed with every algorithm on the way.
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        for path in sorted(src.rglob("*"), key=lambda p: "data" not in p.parts):
            tar.add(path, arcname=f"src/{path.relative_to(src).as_posix()}", recursive=False)
    report = verify_path(tmp_path / "b.tar", keys=[], bag_only=True)
    assert report.ok, report.problems
    (src / "data" / "y.txt").write_bytes(b"z")
    bad = verify_path(src, keys=[], bag_only=True)
    assert {p.message.split(":")[0] for p in bad.problems if p.path == "data/y.txt"} == {
        "md5 mismatch",
        "sha1 mismatch",
        "sha512 mismatch",
    }


def test_bag_only_still_checks_payload(tmp_path: Path, key: SecretKey) -> None:
    bag = make_bag(tmp_path, key)
    (bag / "data/docs/a.txt").write_bytes(b"changed")
    report = verify_path(bag, keys=[], bag_only=True)
    assert paths(report)["data/docs/a.txt"].startswith("sha256 mismatch")
    assert report.signed_by is None


# -- the Library of Congress BagIt conformance suite -------------------------------------

# Skipped: windows-only (paths like C:\ or \\server are plain names on Linux).
KINDS = ("valid", "warning", "invalid", "linux-only")
EXPECTED_CASES = {"valid": 13, "warning": 6, "invalid": 15, "linux-only": 6}


def _conformance() -> list[Path]:
    if not CONFORMANCE.is_dir():
        return []
    return sorted(
        bag
        for version in sorted(CONFORMANCE.iterdir())
        for kind in KINDS
        if (version / kind).is_dir()
        for bag in (version / kind).iterdir()
        if bag.is_dir()
    )


def _case_id(bag: Path) -> str:
    return f"{bag.parent.parent.name}/{bag.parent.name}/{bag.name}"


# The file each invalid (and, on Linux, linux-only) bag of the suite gets wrong.
INVALID = {
    "baginfo-missing-encoding": "bagit.txt",
    "bom-in-bagit.txt": "bagit.txt",
    "corrupt-data-file": "data/bare-filename",
    "corrupt-tag-file": "bag-info.txt",
    "extra-file-in-bag": "data/bar",
    "invalid-version-number": "bagit.txt",
    "missing-baginfo": "bag-info.txt",
    "missing-bagit.txt": "bagit.txt",
    "out-of-scope-file-paths-using-dot-notation": "manifest-md5.txt",
    "out-of-scope-file-paths-using-dot-notation-for-fetch": "fetch.txt",
    "same-filename-listed-twice-with-different-hashes": "data/README",
    "bagit-with-invalid-whitespace": "bagit.txt",
    "notAllManifestsListAllFiles": "data/missingFromManifest.txt",
    "same-filename-listed-twice-with-the-same-hash": "data/README",
    "out-of-scope-file-paths-using-absolute-path": "manifest-md5.txt",
    "out-of-scope-file-paths-using-absolute-path-for-fetch": "fetch.txt",
    "out-of-scope-file-paths-using-shortcut": "manifest-md5.txt",
    "out-of-scope-file-paths-using-shortcut-for-fetch": "fetch.txt",
    "out-of-scope-file-paths-using-shortcut-username": "manifest-md5.txt",
    "out-of-scope-file-paths-using-shortcut-username-for-fetch": "fetch.txt",
}

# What each warning bag is warned about. All six warn: the md5sum '*' marker and
# the './' prefix are read as the bag means them, but said so.
WARNING = {
    "duplicate-file-with-different-case": "different case",
    "made-with-md5sum-tools": "'*'",
    "relative-path": "not written as plain bag-relative paths",
    "same-filename-listed-twice-with-different-normalization": "Unicode normalization",
    "same-filename-listed-twice-with-the-same-hash": "listed twice",
    "special-system-files": "special system file",
}


def test_conformance_suite_is_all_there() -> None:
    # Fails, not skips, without the suite: the test below would quietly run no case.
    assert CONFORMANCE.is_dir(), f"no BagIt conformance suite at {CONFORMANCE}"
    bags = _conformance()
    counts = {kind: sum(b.parent.name == kind for b in bags) for kind in KINDS}
    assert counts == EXPECTED_CASES
    assert len(bags) == 40
    assert {b.name for b in bags if b.parent.name in ("invalid", "linux-only")} == set(INVALID)
    assert {b.name for b in bags if b.parent.name == "warning"} == set(WARNING)


@pytest.mark.parametrize("bag", _conformance(), ids=_case_id)
def test_conformance_suite(bag: Path, tmp_path: Path) -> None:
    kind = bag.parent.name
    report = verify_path(bag, keys=[], bag_only=True)
    if kind in ("invalid", "linux-only"):
        assert not report.ok
        assert INVALID[bag.name] in paths(report), report.problems
        return
    assert report.ok, report.problems
    if kind == "warning":
        assert any(WARNING[bag.name] in w for w in report.warnings), report.warnings
    # The same bag read from a tar as a stream.
    copy = tmp_path / bag.name
    shutil.copytree(bag, copy)
    with tarfile.open(tmp_path / "bag.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(copy, arcname=bag.name)
    from_tar = verify_path(tmp_path / "bag.tar", keys=[], bag_only=True)
    assert from_tar.ok, from_tar.problems
    assert sorted(from_tar.warnings) == sorted(report.warnings)


# -- bag_only: the rules for other makers' bags ------------------------------------------


def plain_bag(
    root: Path,
    files: dict[str, bytes],
    manifest: list[tuple[bytes, str]] | None = None,
    *,
    oxum: str | None = None,
    fetch: str | None = None,
) -> Path:
    """A BagIt 1.0 bag as any tool may make it: `files` on disk, and a sha256 manifest
    listing (content, path) pairs, by default those of `files`."""
    bag = root / "bag"
    (bag / "data").mkdir(parents=True)
    for path, data in files.items():
        (bag / path).parent.mkdir(parents=True, exist_ok=True)
        (bag / path).write_bytes(data)
    entries = [(d, p) for p, d in files.items()] if manifest is None else manifest
    total = sum(len(d) for d in files.values())
    (bag / "bagit.txt").write_text("BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n")
    (bag / "bag-info.txt").write_text(f"Payload-Oxum: {oxum or f'{total}.{len(files)}'}\n")
    (bag / "manifest-sha256.txt").write_text("".join(f"{sha256(d)}  {p}\n" for d, p in entries))
    if fetch is not None:
        (bag / "fetch.txt").write_text(fetch)
    return bag


def holey_bag(root: Path, key: SecretKey, length: str = "15") -> Path:
    """An archived bag, signed, whose data/docs/a.txt is to be fetched from elsewhere."""
    bag = make_bag(root, key)
    assert len(PAYLOAD["data/docs/a.txt"]) == 15
    (bag / "data/docs/a.txt").unlink()
    (bag / "fetch.txt").write_text(f"https://example.org/a.txt {length} data/docs/a.txt\n")
    return bag


def test_holey_bag_is_incomplete_as_a_bag(tmp_path: Path, key: SecretKey) -> None:
    report = verify_path(holey_bag(tmp_path, key), keys=[], bag_only=True)
    # only the file to fetch is wrong: Payload-Oxum counts the 15 bytes fetch.txt announces
    assert paths(report) == {
        "fetch.txt": "holey bag: 1 files listed here are not present, to be fetched "
        "(data/docs/a.txt): the bag is incomplete"
    }
    assert report.files == 2


def test_holey_bag_is_rejected_as_an_archive(tmp_path: Path, key: SecretKey) -> None:
    report = verify_path(holey_bag(tmp_path, key), keys=[key.public_key()])
    problems = paths(report)
    assert problems["fetch.txt"].startswith("the bag lists files to fetch")
    assert problems["data/docs/a.txt"] == f"missing from payload (listed in {MANIFEST})"
    assert "Payload-Oxum" in problems["bag-info.txt"]


def test_holey_bag_payload_oxum(tmp_path: Path, key: SecretKey) -> None:
    wrong = verify_path(holey_bag(tmp_path / "a", key, length="16"), keys=[], bag_only=True)
    assert set(paths(wrong)) == {"fetch.txt", "bag-info.txt"}
    assert paths(wrong)["bag-info.txt"] == (
        f"Payload-Oxum {sum(len(d) for d in PAYLOAD.values())}.3 does not match "
        f"the payload and fetch.txt: {sum(len(d) for d in PAYLOAD.values()) + 1} bytes in 3 files"
    )
    unknown = verify_path(holey_bag(tmp_path / "b", key, length="-"), keys=[], bag_only=True)
    assert set(paths(unknown)) == {"fetch.txt"}
    assert any("Payload-Oxum" in w and "not checked" in w for w in unknown.warnings)


def test_holey_bag_still_checks_what_is_present(tmp_path: Path, key: SecretKey) -> None:
    bag = holey_bag(tmp_path, key)
    (bag / "data/docs/b.bin").write_bytes(b"changed")
    problems = paths(verify_path(bag, keys=[], bag_only=True))
    assert problems["data/docs/b.bin"].startswith("sha256 mismatch")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("https://x.org/a 1 ../x", "line 1: path '../x' is outside the bag"),
        ("https://x.org/a 1 data/../../x", "line 1: path 'data/../../x' is outside the bag"),
        ("https://x.org/a 1 /etc/passwd", "line 1: path '/etc/passwd' is outside the bag"),
        ("https://x.org/a 1 ~/x", "line 1: path '~/x' is outside the bag"),
        ("https://x.org/a - ~root/x", "line 1: path '~root/x' is outside the bag"),
        ("https://x.org/a 1 other/x", "line 1: other/x is not in the payload directory data/"),
        ("https://x.org/a data/x", "line 1: not '<url> <length> <path>'"),
        ("https://x.org/a many data/x", "line 1: not '<url> <length> <path>'"),
    ],
)
def test_fetch_lines_must_name_a_payload_file(tmp_path: Path, line: str, message: str) -> None:
    bag = plain_bag(tmp_path, {"data/a.txt": b"a"}, fetch=line + "\n")
    assert paths(verify_path(bag, keys=[], bag_only=True)) == {"fetch.txt": message}


def test_fetch_lists_a_file_no_manifest_lists(tmp_path: Path) -> None:
    bag = plain_bag(tmp_path, {"data/a.txt": b"a"}, fetch="https://x.org/b 1 data/b.txt\n")
    problems = paths(verify_path(bag, keys=[], bag_only=True))
    assert problems["data/b.txt"] == "listed in fetch.txt but not in manifest-sha256.txt"


def test_same_file_listed_with_different_case(tmp_path: Path) -> None:
    listed = [(b"hello\n", "data/hello.txt"), (b"hello\n", "data/HELLO.txt")]
    bag = plain_bag(tmp_path / "a", {"data/hello.txt": b"hello\n"}, listed)
    report = verify_path(bag, keys=[], bag_only=True)
    assert report.ok, report.problems
    assert any(
        w.startswith("data/HELLO.txt: not present; listed twice with different case")
        and "would collide on a case-insensitive file system" in w
        for w in report.warnings
    ), report.warnings
    # With another checksum it is another file, and it is missing.
    listed = [(b"hello\n", "data/hello.txt"), (b"HELLO\n", "data/HELLO.txt")]
    bag = plain_bag(tmp_path / "b", {"data/hello.txt": b"hello\n"}, listed)
    assert paths(verify_path(bag, keys=[], bag_only=True)) == {
        "data/HELLO.txt": "missing from payload (listed in manifest-sha256.txt)"
    }


def test_same_file_listed_with_different_normalization(tmp_path: Path) -> None:
    nfc, nfd = "data/N\u00fa\u00f1ez", "data/Nu\u0301n\u0303ez"
    bag = plain_bag(tmp_path, {nfd: b""}, [(b"", nfd), (b"", nfc)])
    report = verify_path(bag, keys=[], bag_only=True)
    assert report.ok, report.problems
    assert any(
        w.startswith(f"{nfc}: not present; listed twice with different Unicode normalization")
        for w in report.warnings
    ), report.warnings


def test_special_system_file_listed_but_not_present(tmp_path: Path) -> None:
    listed = [(b"", "data/.DS_Store"), (b"", "data/Thumbs.db")]
    bag = plain_bag(tmp_path / "a", {"data/Thumbs.db": b""}, listed, oxum="0.2")
    report = verify_path(bag, keys=[], bag_only=True)
    assert report.ok, report.problems
    assert any(
        w.startswith("data/.DS_Store: special system file listed but not present")
        for w in report.warnings
    ), report.warnings
    assert any(
        w.startswith("data/Thumbs.db: special system file in the payload") for w in report.warnings
    )
    # The count may leave out the missing special file; the bytes may not.
    bag = plain_bag(tmp_path / "b", {"data/Thumbs.db": b""}, listed, oxum="1.2")
    assert set(paths(verify_path(bag, keys=[], bag_only=True))) == {"bag-info.txt"}
    # Any other missing file is missing.
    listed = [(b"", "data/notes.txt"), (b"", "data/Thumbs.db")]
    bag = plain_bag(tmp_path / "c", {"data/Thumbs.db": b""}, listed, oxum="0.2")
    assert set(paths(verify_path(bag, keys=[], bag_only=True))) == {
        "data/notes.txt",
        "bag-info.txt",
    }


def test_archives_keep_the_strict_rules(tmp_path: Path, key: SecretKey) -> None:
    # What bag_only lets pass is still wrong in an archive of ours.
    payload = {**PAYLOAD, "data/docs/.DS_Store": b""}
    bag = make_bag(tmp_path, key, payload=payload)
    (bag / "data/docs/.DS_Store").unlink()
    assert verify_path(bag, keys=[], bag_only=True).ok
    problems = paths(verify_path(bag, keys=[key.public_key()]))
    assert problems["data/docs/.DS_Store"] == f"missing from payload (listed in {MANIFEST})"
    assert "Payload-Oxum" in problems["bag-info.txt"]


def test_tag_files_past_the_size_limit(
    tmp_path: Path, key: SecretKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    import archived.verify

    bag = make_bag(tmp_path, key)
    (bag / "metadata").mkdir()
    (bag / "metadata" / "big.txt").write_bytes(b"m" * 5000)
    (bag / "tagmanifest-sha512.txt").write_text(
        f"{hashlib.sha512(b'm' * 5000).hexdigest()}  metadata/big.txt\n"
        f"{hashlib.sha512((bag / MANIFEST).read_bytes()).hexdigest()}  {MANIFEST}\n"
    )
    monkeypatch.setattr(archived.verify, "TAG_FILE_LIMIT", 1000)
    report = verify_path(make_tar(bag, tmp_path / "a.tar"), keys=[key.public_key()], bag_only=True)
    assert report.ok, report.problems  # still checked, from digests taken while streaming
    monkeypatch.setattr(archived.verify, "TAG_FILE_LIMIT", 50)
    report = verify_path(bag, keys=[key.public_key()], bag_only=True)
    assert Problem("bag-info.txt", "larger than 50 bytes; not read") in report.problems


# -- the time-stamp token ----------------------------------------------------------------


def test_a_stripped_time_stamp_token_is_noticed(tmp_path: Path, key: SecretKey) -> None:
    """bag-info.txt, under the signature, says a token was made; it must be there."""
    bag = make_bag(tmp_path, key, info_extra="Archived-Timestamp: rfc3161\n")
    problem = only_problem(verify_path(make_tar(bag, tmp_path / "a.tar"), keys=[key.public_key()]))
    assert problem.path == TIMESTAMP
    assert "missing" in problem.message and "Archived-Timestamp" in problem.message
    # without the label, an archive without a token is what an unstamped job makes
    plain = make_bag(tmp_path / "plain", key)
    assert verify_path(plain, keys=[key.public_key()]).ok


def test_a_timestamp_token_that_is_not_one_is_a_problem(tmp_path: Path, key: SecretKey) -> None:
    """Real tokens are checked in test_trust.py against a real TSA; here, a forged one."""
    bag = make_bag(tmp_path, key)
    digest = hashlib.sha256((bag / TAGMANIFEST).read_bytes()).digest()
    # the DER bytes a real token carries for its message imprint, and nothing else
    (bag / TIMESTAMP).write_bytes(b"\x30\x82" + b"\x04\x20" + digest + b"\x00" * 20)
    problem = only_problem(verify_path(bag, keys=[key.public_key()]))
    assert problem.path == TIMESTAMP
    assert "does not verify" in problem.message
