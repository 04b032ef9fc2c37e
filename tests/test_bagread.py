"""Reading bags as they are stored: any member order, any of the serializations we read,
and memory that does not grow with the number of members.

Tars and zips come from GNU tar and Info-ZIP where the order matters, bags from
bagit-python; nothing is extracted to disk to check them.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import bagit  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archived.verify import Report, verify_path

FILES = {
    "a.txt": b"alpha\n",
    "sub/b.bin": bytes(range(256)) * 40,
    "sub/deeper/c.txt": b"",
    "space name.txt": b"spaces\n",
}


def check(path: Path) -> Report:
    return verify_path(path, keys=[], bag_only=True)


def messages(report: Report) -> dict[str, str]:
    return {p.path: p.message for p in report.problems}


def bagit_python_bag(directory: Path, checksums: tuple[str, ...] = ("sha256", "sha512")) -> Path:
    for name, data in FILES.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    bagit.make_bag(str(directory), checksums=list(checksums))
    return directory


def members_of(bag: Path) -> list[str]:
    """Every file and directory of `bag`, as member names under the bag's own name."""
    return [
        f"{bag.name}/{p.relative_to(bag).as_posix()}" for p in sorted(bag.rglob("*")) if p != bag
    ]


def gnu_tar(bag: Path, out: Path, order: list[str], *flags: str) -> Path:
    """`bag` packed by GNU tar with its members in exactly `order`."""
    subprocess.run(
        ["tar", *flags, "--no-recursion", "-cf", str(out), "-C", str(bag.parent), *order],
        check=True,
    )
    return out


# -- any member order --------------------------------------------------------------------


def late_manifest_order(bag: Path) -> list[str]:
    """The declaration and one manifest, then the payload, then the second manifest."""
    names = members_of(bag)
    first = [f"{bag.name}/bagit.txt", f"{bag.name}/manifest-sha256.txt"]
    payload = [n for n in names if n.startswith(f"{bag.name}/data")]
    rest = [n for n in names if n not in first and n not in payload]
    return [f"{bag.name}", *first, *payload, *rest]


@pytest.mark.parametrize("flags", [(), ("-z",)], ids=["tar", "tar.gz"])
def test_a_second_manifest_after_the_payload(tmp_path: Path, flags: tuple[str, ...]) -> None:
    bag = bagit_python_bag(tmp_path / "bag")
    order = late_manifest_order(bag)
    assert order.index(f"{bag.name}/manifest-sha512.txt") > order.index(f"{bag.name}/data/a.txt")
    report = check(gnu_tar(bag, tmp_path / "bag.tar", order, *flags))
    assert report.ok, report.problems
    assert report.files == len(FILES)
    # and both manifests are really checked: a changed file fails both
    (bag / "data/sub/b.bin").write_bytes(b"changed")
    bad = check(gnu_tar(bag, tmp_path / "bad.tar", order, *flags))
    found = [p.message.split(":")[0] for p in bad.problems if p.path == "data/sub/b.bin"]
    assert sorted(found) == ["sha256 mismatch", "sha512 mismatch"]


@pytest.mark.parametrize("flags", [(), ("-z",)], ids=["tar", "tar.gz"])
@pytest.mark.parametrize("late", [False, True], ids=["manifests-first", "a-manifest-last"])
def test_a_hard_link_in_a_tar_is_the_file_it_links_to(
    tmp_path: Path, flags: tuple[str, ...], late: bool
) -> None:
    # GNU tar stores a file linked twice in the bag once, and the other name as a hard
    # link to it; extracted, both are the same regular file, so the bag is valid.
    bag = tmp_path / "bag"
    (bag / "copies").mkdir(parents=True)
    (bag / "a.txt").write_bytes(b"alpha\n")
    (bag / "copies" / "a.txt").write_bytes(b"alpha\n")
    bagit.make_bag(str(bag), checksums=["sha256", "sha512"])
    os.unlink(bag / "data/copies/a.txt")
    os.link(bag / "data/a.txt", bag / "data/copies/a.txt")
    order = late_manifest_order(bag) if late else members_of(bag)
    tar = gnu_tar(bag, tmp_path / "bag.tar", order, *flags)
    with tarfile.open(tar) as t:
        assert t.getmember("bag/data/copies/a.txt").islnk()
    report = check(tar)
    assert report.ok, report.problems
    assert (report.files, report.bytes) == (2, 12)
    # the data it links to, changed, is wrong under both names
    os.unlink(bag / "data/copies/a.txt")
    (bag / "data/a.txt").write_bytes(b"ALPHA\n")
    os.link(bag / "data/a.txt", bag / "data/copies/a.txt")
    bad = check(gnu_tar(bag, tmp_path / "bad.tar", order, *flags))
    assert {p.path for p in bad.problems} == {"data/a.txt", "data/copies/a.txt"}


def test_a_hard_link_to_what_is_not_a_file_of_the_bag_is_refused(tmp_path: Path) -> None:
    bag = bagit_python_bag(tmp_path / "bag")
    out = tmp_path / "bag.tar"
    with tarfile.open(out, "w") as t:
        t.add(bag, "bag")
        for name, target in [("bag/data/x", "/etc/passwd"), ("bag/data/y", "bag/data/later")]:
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.LNKTYPE, target
            t.addfile(link)
    found = messages(check(out))
    assert found["data/x"].startswith("hard link to '/etc/passwd': only regular files")
    assert found["data/y"].startswith("hard link to 'bag/data/later': only regular files")


def test_payload_first_as_gnu_tar_sorts_it(tmp_path: Path) -> None:
    bagit_python_bag(tmp_path / "bag", ("md5", "sha1", "sha512"))
    tar = tmp_path / "bag.tar"
    subprocess.run(["tar", "--sort=name", "-cf", str(tar), "-C", str(tmp_path), "bag"], check=True)
    with tarfile.open(tar) as t:
        names = t.getnames()
    assert names.index("bag/data/a.txt") < names.index("bag/manifest-md5.txt")
    assert check(tar).ok


# -- serializations ----------------------------------------------------------------------


def pack(bag: Path, kind: str, out_dir: Path) -> Path:
    if kind == "zip":
        out = out_dir / f"{bag.name}.zip"
        subprocess.run(["zip", "-q", "-r", str(out), bag.name], cwd=bag.parent, check=True)
        return out
    out = out_dir / f"{bag.name}.{kind}"
    flags = {"tar": "-cf", "tar.gz": "-czf", "tgz": "-czf", "tar.bz2": "-cjf", "tar.xz": "-cJf"}
    subprocess.run(["tar", flags[kind], str(out), "-C", str(bag.parent), bag.name], check=True)
    return out


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tgz", "zip", "tar.bz2", "tar.xz"])
def test_serializations_are_read_without_extracting(tmp_path: Path, kind: str) -> None:
    bag = bagit_python_bag(tmp_path / "src" / "bag")
    packed = pack(bag, kind, tmp_path)
    report = check(packed)
    assert report.ok, report.problems
    assert (report.bag, report.files) == ("bag", len(FILES))
    (bag / "data/a.txt").write_bytes(b"ALPHA\n")
    packed.unlink()
    bad = check(pack(bag, kind, tmp_path))
    found = sorted(p.message.split(":")[0] for p in bad.problems if p.path == "data/a.txt")
    assert found == ["sha256 mismatch", "sha512 mismatch"], bad.problems
    assert sorted(os.listdir(tmp_path)) == sorted(["src", packed.name])  # nothing extracted


@pytest.mark.parametrize("kind", ["tar.gz", "tar.bz2", "tar.xz"])
def test_damage_to_the_compressed_stream_s_own_checks_is_found(tmp_path: Path, kind: str) -> None:
    # The last bytes of each stream check the whole (gzip: CRC-32 and length; bzip2: the
    # stream CRC; xz: the index and footer), past the tar's last block: a byte flipped
    # there is damage to the archive although all it holds still decompresses.
    bag = bagit_python_bag(tmp_path / "src" / "bag")
    whole = pack(bag, kind, tmp_path).read_bytes()
    damaged = tmp_path / f"damaged.{kind}"
    for back in range(1, 9):
        data = bytearray(whole)
        data[-back] ^= 0x80  # bzip2 pads its last byte with low bits
        damaged.write_bytes(bytes(data))
        assert check(damaged).verdict == "invalid", back


def test_a_bag_zipped_from_inside_its_directory_is_one_problem(tmp_path: Path) -> None:
    bag = bagit_python_bag(tmp_path / "bag")
    out = tmp_path / "inside.zip"
    subprocess.run(["zip", "-q", "-r", str(out), "."], cwd=bag, check=True)
    report = check(out)
    (problem,) = report.problems
    assert problem.path == "" and "section 4" in problem.message
    assert report.files == len(FILES)  # and the bag in it was checked


def test_a_zip_member_that_is_a_link_is_refused(tmp_path: Path) -> None:
    bag = bagit_python_bag(tmp_path / "src" / "bag")
    (bag / "data" / "link").symlink_to("/etc/passwd")
    out = tmp_path / "bag.zip"
    subprocess.run(["zip", "-q", "-r", "-y", str(out), "bag"], cwd=bag.parent, check=True)
    report = check(out)
    assert messages(report)["data/link"].startswith("symbolic link to '/etc/passwd'")


def test_a_damaged_zip_member_is_named(tmp_path: Path) -> None:
    bag = bagit_python_bag(tmp_path / "src" / "bag")
    out = pack(bag, "zip", tmp_path)
    with zipfile.ZipFile(out) as z:
        info = z.getinfo("bag/data/sub/b.bin")
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(out.read_bytes())
    data[start + 10] ^= 0xFF
    out.write_bytes(bytes(data))
    report = check(out)
    assert not report.ok
    assert "data/sub/b.bin" in messages(report), report.problems


def test_a_damaged_central_directory_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    bag = bagit_python_bag(tmp_path / "src" / "bag")
    out = pack(bag, "zip", tmp_path)
    data = bytearray(out.read_bytes())
    data[data.find(b"PK\x01\x02")] ^= 0xFF  # the first entry's signature
    out.write_bytes(bytes(data))
    report = check(out)
    assert report.verdict == "invalid"
    assert messages(report)[""].startswith("cannot read the zip: bad central directory")


# A zip written here byte by byte (stored, APPNOTE 6.3 sections 4.3.7, 4.3.12, 4.3.16), for
# what zipfile will not write: names in other encodings, flags, systems, extra fields.
ZipMember = tuple[bytes, bytes, int, int, bytes]  # name as stored, data, flags, system, extra


def write_zip(path: Path, members: list[ZipMember]) -> Path:
    local, central = bytearray(), bytearray()
    for name, data, flags, system, extra in members:
        crc = zlib.crc32(data)
        fields = (20, flags, 0, 0, 0x21, crc, len(data), len(data), len(name), len(extra))
        central += struct.pack("<4sBB", b"PK\x01\x02", 20, system)
        central += struct.pack("<HHHHHLLLHHHHHLL", *fields, 0, 0, 0, 0, len(local))
        central += name + extra
        local += struct.pack("<4sHHHHHLLLHH", b"PK\x03\x04", *fields) + name + extra + data
    end = struct.pack(
        "<4sHHHHLLH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(local), 0
    )
    path.write_bytes(bytes(local + central + end))
    return path


def zip_members(
    bag: Path, name: Callable[[str], bytes], flags: int = 0, system: int = 3
) -> list[ZipMember]:
    """The files of `bag`, each named `name(path under the bag's parent)`."""
    return [
        (name(f"{bag.name}/{p.relative_to(bag).as_posix()}"), p.read_bytes(), flags, system, b"")
        for p in sorted(bag.rglob("*"))
        if p.is_file()
    ]


UNICODE_FILES = {"café.txt": b"caf\xc3\xa9\n", "naïve/Ünïcode.bin": b"\x00\x01"}


def unicode_bag(tmp_path: Path, files: dict[str, bytes] = UNICODE_FILES) -> Path:
    bag = tmp_path / "src" / "bag"
    for name, data in files.items():
        (bag / name).parent.mkdir(parents=True, exist_ok=True)
        (bag / name).write_bytes(data)
    bagit.make_bag(str(bag), checksums=["sha256"])
    return bag


def test_zip_names_in_utf8_without_the_utf8_flag(tmp_path: Path) -> None:
    # Info-ZIP's zip (in a C locale), macOS and most Unix zippers store UTF-8 names
    # without flag bit 11; read as code page 437 they would not match the manifest.
    bag = unicode_bag(tmp_path)
    out = write_zip(tmp_path / "bag.zip", zip_members(bag, str.encode))
    assert zipfile.ZipFile(out).namelist()[-1] != "bag/naïve/Ünïcode.bin"  # zipfile's cp437
    report = check(out)
    assert report.ok, report.problems
    assert report.files == 2


def test_zip_names_in_a_code_page_with_a_unicode_path_extra_field(tmp_path: Path) -> None:
    # Info-ZIP on a Russian Windows: the name in its OEM code page (866, not the 437 that
    # APPNOTE assumes), its UTF-8 in extra field 0x7075 (APPNOTE 4.6.9) with the CRC-32
    # of the name it stands for.
    bag = unicode_bag(tmp_path, {"данные.txt": b"1", "опись/лист.bin": b"2"})
    members = []
    for name, data, flags, system, _ in zip_members(bag, lambda n: n.encode("cp866"), system=0):
        utf8 = name.decode("cp866").encode()
        field = b"\x01" + struct.pack("<L", zlib.crc32(name)) + utf8
        members.append((name, data, flags, system, struct.pack("<HH", 0x7075, len(field)) + field))
    report = check(write_zip(tmp_path / "bag.zip", members))
    assert report.ok, report.problems
    # a name changed after the field was written: the field is stale, the name is read
    (at,) = [i for i, m in enumerate(members) if m[0].endswith(b".bin")]
    name, data, flags, system, extra = members[at]
    members[at] = (name.replace(b".bin", b".BIN"), data, flags, system, extra)
    stale = check(write_zip(tmp_path / "stale.zip", members))
    assert "data/" + "опись/лист.BIN".encode("cp866").decode("cp437") in messages(stale)


def test_zip_names_with_backslashes_from_windows(tmp_path: Path) -> None:
    # .NET Framework 4.5's ZipFile wrote "\" between the parts of a name, though APPNOTE
    # 4.4.17 says "/"; a name made on Windows (FAT, NTFS, VFAT) cannot hold a "\".
    bag = unicode_bag(tmp_path)
    members = zip_members(bag, lambda n: n.replace("/", "\\").encode(), flags=0x800, system=0)
    report = check(write_zip(tmp_path / "bag.zip", members))
    assert report.ok, report.problems
    assert any("'\\'" in w for w in report.warnings), report.warnings
    # from a Unix zipper a "\" is part of a name
    unix = [(n, d, f, 3, x) for n, d, f, _, x in members]
    assert not check(write_zip(tmp_path / "unix.zip", unix)).ok


def test_a_zip_whose_local_header_disagrees_with_its_central_directory(tmp_path: Path) -> None:
    # bsdtar reads the local headers, zipfile the central directory: where they differ
    # the bag is not what every reader sees. Here the tag manifest's local header names
    # another file: left unchecked, the bag would pass without its tag manifest.
    bag = bagit_python_bag(tmp_path / "src" / "bag")
    out = pack(bag, "zip", tmp_path)
    data = bytearray(out.read_bytes())
    name = b"bag/tagmanifest-sha256.txt"
    central = data.index(b"PK\x01\x02")
    at = data.index(name, central)
    data[at + 4] ^= 0x20  # "tagmanifest" in the central directory becomes "Tagmanifest"
    out.write_bytes(bytes(data))
    report = check(out)
    assert report.verdict == "invalid"
    assert (
        "its local header names it 'bag/tagmanifest-sha256.txt'"
        in messages(report)["Tagmanifest-sha256.txt"]
    )


def test_a_zip_whose_end_record_miscounts_its_entries(tmp_path: Path) -> None:
    bag = bagit_python_bag(tmp_path / "src" / "bag")
    out = pack(bag, "zip", tmp_path)
    data = bytearray(out.read_bytes())
    end = data.rindex(b"PK\x05\x06")
    data[end + 10] -= 1  # total entries (and entries on this disk)
    data[end + 8] -= 1
    out.write_bytes(bytes(data))
    assert "end record counts" in messages(check(out))[""]


@pytest.mark.slow  # unzip on every byte: tens of seconds
@pytest.mark.skipif(shutil.which("unzip") is None, reason="needs Info-ZIP's unzip")
def test_any_byte_of_a_zip_damaged_is_found_or_harmless(tmp_path: Path) -> None:
    # What verify calls valid, unzip must extract whole and the same: a damaged byte
    # that changes what unzip sees (a local header, the central directory, the end
    # record, the end of a deflate stream, a CRC-32) must make the bag invalid.
    bag = tmp_path / "src" / "bag"
    (bag / "sub").mkdir(parents=True)
    (bag / "a.txt").write_bytes(b"alpha\n" * 20)
    (bag / "sub" / "empty").write_bytes(b"")
    bagit.make_bag(str(bag), checksums=["sha256"])
    whole = pack(bag, "zip", tmp_path).read_bytes()
    expected = {p.relative_to(bag): p.read_bytes() for p in bag.rglob("*") if p.is_file()}
    damaged, out = tmp_path / "damaged.zip", tmp_path / "out"
    for offset in range(len(whole)):
        data = bytearray(whole)
        data[offset] ^= 0x5A
        damaged.write_bytes(bytes(data))
        if not check(damaged).ok:
            continue
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        done = subprocess.run(["unzip", "-qq", str(damaged)], cwd=out, capture_output=True)
        got = {p.relative_to(out / "bag"): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert (done.returncode, got) == (0, expected), offset


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bag.7z", b"7z\xbc\xaf\x27\x1c\x00\x04" + bytes(600)),
        ("bag.tar.zst", b"\x28\xb5\x2f\xfd" + bytes(600)),
        ("notes.txt", b"just some text, long enough to be read as a header\n" * 20),
        ("bag.tar.gz", gzip.compress(b"gzip, but of text and not of a tar\n" * 40, mtime=0)),
        ("empty.tar", b""),
    ],
)
def test_what_is_not_a_bag_serialization_says_so(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    report = check(path)
    if name in ("bag.7z", "bag.tar.zst"):
        # an archive in a format not read here (Archivematica stores its AIPs in 7-Zip):
        # another tool's bag in it is not known to be wrong, so it is not proven
        assert (report.verdict, report.problems) == ("unverifiable", [])
        (why,) = report.unverifiable
        assert "not a bag serialization I read" in why
        # while an archive of ours, were it one, was replaced
        report = verify_path(path, keys=[])
    assert report.verdict == "invalid"
    (problem,) = report.problems
    assert problem.path == ""
    assert "not a bag serialization I read" in problem.message
    assert "checksum" not in problem.message


# -- any order, any serialization: a property --------------------------------------------


@pytest.fixture(scope="module")
def source_bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bagit-python's bag with two payload manifests, two tag manifests and a fetch.txt
    whose file is present (fetched)."""
    bag = bagit_python_bag(tmp_path_factory.mktemp("prop") / "bag", ("sha256", "sha512"))
    (bag / "fetch.txt").write_text("https://example.org/a.txt 6 data/a.txt\n")
    (bag / "meta").mkdir()
    (bag / "meta" / "notes.txt").write_text("a tag directory\n")
    for algorithm in ("sha256", "sha512"):
        names = [
            p.relative_to(bag).as_posix()
            for p in sorted(bag.rglob("*"))
            if p.is_file() and "data" not in p.parts and not p.name.startswith("tagmanifest")
        ]
        lines = [
            f"{hashlib.new(algorithm, (bag / n).read_bytes()).hexdigest()}  {n}" for n in names
        ]
        (bag / f"tagmanifest-{algorithm}.txt").write_text("\n".join(lines) + "\n")
    assert check(bag).ok
    return bag


def write_serialization(bag: Path, out: Path, order: list[str], kind: str) -> Path:
    """`bag` with its members in `order`, written with tarfile or zipfile."""
    if kind == "zip":
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for name in order:
                z.write(bag.parent / name, name)
        return out
    with tarfile.open(out, "w:gz" if kind == "tar.gz" else "w", format=tarfile.PAX_FORMAT) as t:
        for name in order:
            t.add(bag.parent / name, name, recursive=False)
    return out


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.randoms(use_true_random=False),
    kind=st.sampled_from(["tar", "tar.gz", "zip"]),
    damage=st.booleans(),
)
def test_any_member_order_verifies_the_same(
    source_bag: Path, tmp_path: Path, seed: random.Random, kind: str, damage: bool
) -> None:
    order = members_of(source_bag)
    seed.shuffle(order)
    bag = source_bag
    if damage:
        bag = Path(tempfile.mkdtemp(dir=tmp_path)) / "bag"
        shutil.copytree(source_bag, bag)
        (bag / "data/sub/b.bin").write_bytes(b"x" * len(FILES["sub/b.bin"]))
    out = write_serialization(bag, Path(tempfile.mkdtemp(dir=tmp_path)) / f"x.{kind}", order, kind)
    report = check(out)
    if damage:
        found = sorted(p.message.split(":")[0] for p in report.problems)
        assert found == ["sha256 mismatch", "sha512 mismatch"], report.problems
    else:
        assert report.ok, (order, report.problems)
        assert report.files == len(FILES)


# -- memory ------------------------------------------------------------------------------

# VmHWM, not getrusage's ru_maxrss: that keeps the parent's peak across fork and exec.
PEAK_RSS = """
import sys
from archived.verify import verify_path
report = verify_path(sys.argv[1], keys=[], bag_only=True)
assert report.ok, report.problems[:5]
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1])
"""


def empty_members(members: int) -> tuple[list[str], dict[str, bytes], bytes]:
    """The payload names, tag files and manifest of a bag of `members` empty files."""
    empty = hashlib.sha256(b"").hexdigest()
    names = [f"data/d{i // 1000:04d}/f{i:07d}" for i in range(members)]
    manifest = "".join(f"{empty}  {n}\n" for n in names).encode()
    tags = {
        "bagit.txt": b"BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n",
        "bag-info.txt": f"Payload-Oxum: 0.{members}\n".encode(),
    }
    return names, tags, manifest


def empty_members_zip(out: Path, members: int) -> Path:
    names, tags, manifest = empty_members(members)
    with zipfile.ZipFile(out, "w") as z:
        for name, data in tags.items():
            z.writestr(f"bag/{name}", data)
        for name in names:
            z.writestr(f"bag/{name}", b"")
        z.writestr("bag/manifest-sha256.txt", manifest)
    return out


def empty_members_tar(out: Path, members: int) -> Path:
    """A valid bag of `members` empty payload files, its manifest after the payload."""
    names, tags, manifest = empty_members(members)

    def member(name: str, data: bytes = b"") -> bytes:
        info = tarfile.TarInfo(f"bag/{name}")
        info.size = len(data)
        return info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)

    with open(out, "wb") as f:
        for name, data in tags.items():
            f.write(member(name, data))
        for name in names:
            f.write(member(name))
        f.write(member("manifest-sha256.txt", manifest))
        f.write(bytes(1024))
    return out


def peak_rss_kib(path: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


@pytest.mark.slow  # tens of thousands of members, measured in a process
@pytest.mark.parametrize(
    ("make", "small", "large"),
    [(empty_members_tar, 10_000, 50_000), (empty_members_zip, 5_000, 25_000)],
    ids=["tar", "zip"],
)
def test_peak_memory_is_flat_in_the_number_of_members(
    tmp_path: Path, make: Callable[[Path, int], Path], small: int, large: int
) -> None:
    small_rss = peak_rss_kib(make(tmp_path / "small", small))
    large_rss = peak_rss_kib(make(tmp_path / "large", large))
    grown = large_rss - small_rss
    # Flat: what fills up once (SQLite's page caches, the allocator's arenas: about
    # 2 MiB, reached by 50,000 members) and less than 16 bytes a member. Before the
    # spill to SQLite, 1.7 KiB a member in a tar (174 MB for 100,000), and zipfile's
    # central directory 0.5 KiB a member in a zip. A million: bench/README.md.
    assert grown < 4096 + 16 * (large - small) // 1024, (
        f"peak RSS grew by {grown} KiB ({small_rss} -> {large_rss}) for {large - small} members"
    )
