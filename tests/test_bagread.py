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
import subprocess
import sys
import tarfile
import tempfile
import zipfile
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


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bag.7z", b"7z\xbc\xaf\x27\x1c\x00\x04" + bytes(600)),
        ("bag.tar.zst", b"\x28\xb5\x2f\xfd" + bytes(600)),
        ("notes.txt", b"just some text, long enough to be read as a header\n" * 20),
        ("bag.tar.gz", gzip.compress(b"gzip, but of text and not of a tar\n" * 40)),
        ("empty.tar", b""),
    ],
)
def test_what_is_not_a_bag_serialization_says_so(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    report = check(path)
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
