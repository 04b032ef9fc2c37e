#!/usr/bin/env python3
"""Benchmark: `archived verify --bag-only` against `bagit.py --validate`, and its peak memory.

    python bench/verify.py [--quick] [--workdir DIR] [--rounds N] [--keep] [--members N]
                           [--only time,memory]

time    data set A of bench/run.py (2,000 x 256 KiB + 1 x 512 MiB, incompressible), made a
        bag by bagit-python with its default manifests (sha256 and sha512), then checked
        by, alternating in one run:
          bagit.py   bagit.py --validate on the bag directory (the reference)
          dir        archived verify --bag-only on the same directory
          tar        ... on a tar of it, tag files first (manifests before the payload)
          tar-late   ... on GNU tar --sort=name of it (data/ before the manifests: the
                     payload is read once more by member offset, hashed once)
          tgz        ... the same gzip'ed (the compressed stream is read twice)
          zip        ... zip -0 of it
memory  a tar of N empty payload files (default 1,000,000), its manifest after the payload;
        the peak RSS (VmHWM) of a verify of it, against a verify of N/10.

Page caches are not dropped (no root): every input is read once before its timed rounds.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from run import BenchError, DataSet, datasets, find_archived, generate, machine, run, timed

from archived.tarformat import padding, tar_header

PEAK = """
import sys, time
from archived.verify import verify_path
start = time.perf_counter()
report = verify_path(sys.argv[1], keys=[], bag_only=True)
took = time.perf_counter() - start
status = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(report.verdict, int(status.split()[1]), f"{took:.1f}")
"""


def bagit_py() -> str:
    beside = Path(sys.executable).parent / "bagit.py"
    found = str(beside) if beside.exists() else shutil.which("bagit.py")
    if not found:
        raise BenchError("no bagit.py next to this Python interpreter nor on PATH")
    return found


def make_bag(ds: DataSet, work: Path) -> Path:
    """A copy of the data set made a bag by bagit-python (sha256 and sha512), reused if kept."""
    bag = work / "bag"
    if (bag / "tagmanifest-sha256.txt").exists():
        return bag
    shutil.rmtree(bag, ignore_errors=True)
    shutil.copytree(ds.src, bag)
    run([bagit_py(), "--processes", "2", str(bag)])
    return bag


def serializations(bag: Path, work: Path) -> dict[str, Path]:
    """The bag as a tar with the tag files first, as GNU tar sorts it, gzip'ed, and zipped."""
    out = {
        "tar": work / "bag.tar",
        "tar-late": work / "bag-late.tar",
        "tgz": work / "bag.tgz",
        "zip": work / "bag.zip",
    }
    if all(p.exists() for p in out.values()):
        return out
    tags = sorted(p.name for p in bag.iterdir() if p.is_file())
    parent = str(bag.parent)
    run(["tar", "-cf", str(out["tar"]), "-C", parent, *(f"bag/{t}" for t in tags), "bag/data"])
    run(["tar", "--sort=name", "-cf", str(out["tar-late"]), "-C", parent, "bag"])
    run(["bash", "-c", f"gzip -1 -c {out['tar-late']} > {out['tgz']}"])
    run(["zip", "-q", "-0", "-r", str(out["zip"]), "bag"], cwd=parent)
    return out


def empty_members(out: Path, members: int) -> Path:
    """A bag of `members` empty files in a tar, written header by header."""
    if out.exists():
        return out
    empty = hashlib.sha256(b"").hexdigest()
    names = [f"data/d{i // 1000:04d}/f{i:07d}" for i in range(members)]
    tags = {
        "bagit.txt": b"BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n",
        "bag-info.txt": f"Payload-Oxum: 0.{members}\n".encode(),
    }
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb", buffering=1 << 20) as f:
        for name, data in tags.items():
            f.write(tar_header(f"bag/{name}", len(data), 0) + data + padding(len(data)))
        for name in names:
            f.write(tar_header(f"bag/{name}", 0, 0))
        manifest = "".join(f"{empty}  {n}\n" for n in names).encode()
        f.write(tar_header("bag/manifest-sha256.txt", len(manifest), 0))
        f.write(manifest + padding(len(manifest)) + bytes(1024))
    tmp.rename(out)
    return out


def peak(path: Path) -> tuple[int, float]:
    """VmHWM (KiB) and seconds of a verify of `path`, in a fresh interpreter."""
    done = run([sys.executable, "-c", PEAK, str(path)])
    verdict, kib, took = done.stdout.split()
    if verdict != "valid":
        raise BenchError(f"{path}: {verdict}")
    return int(kib), float(took)


def bench_time(ds: DataSet, work: Path, exe: str, rounds: int) -> list[str]:
    generate(ds)
    t0 = time.perf_counter()
    bag = make_bag(ds, work)
    inputs = {"dir": bag, **serializations(bag, work)}
    print(f"  bag and serializations ready in {time.perf_counter() - t0:.1f}s", flush=True)
    commands = {"bagit.py": [bagit_py(), "--validate", str(bag)]}
    commands |= {k: [exe, "verify", "--bag-only", str(p)] for k, p in inputs.items()}
    for p in inputs.values():  # warm the page cache for all alike
        run(["bash", "-c", f"tar -cf - -C {p.parent} {p.name} > /dev/null"])
    times: dict[str, list[float]] = {k: [] for k in commands}
    names = list(commands)
    for r in range(rounds):
        for who in names[r % len(names) :] + names[: r % len(names)]:
            took = timed(commands[who], who)
            times[who].append(took)
            print(f"  round {r + 1}: {who:9} {took:6.2f}s", flush=True)
    base = statistics.median(times["bagit.py"])
    lines = [f"A as a bag ({ds.nbytes / (1 << 30):.2f} GiB, sha256 + sha512); median of {rounds}"]
    lines.append("               median s  x bagit.py   runs")
    for who, runs in times.items():
        median = statistics.median(runs)
        shown = " ".join(f"{t:.2f}" for t in runs)
        lines.append(f"  {who:11} {median:9.2f}  {median / base:9.2f}x   {shown}")
    return lines


def bench_memory(work: Path, members: int) -> list[str]:
    small = empty_members(work / f"empty-{members // 10}.tar", members // 10)
    large = empty_members(work / f"empty-{members}.tar", members)
    lines = ["peak RSS (VmHWM) of a verify of a tar of empty files, manifest after the payload"]
    for path, n in ((small, members // 10), (large, members)):
        kib, took = peak(path)
        lines.append(f"  {n:>9,} members: {kib / 1024:6.1f} MiB in {took:.1f}s")
        print(lines[-1], flush=True)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10x smaller (smoke run)")
    ap.add_argument("--workdir", type=Path, help="default: a fresh temp dir")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the workdir (and reuse it)")
    ap.add_argument("--members", type=int, default=1_000_000)
    ap.add_argument("--only", default="time,memory")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="archived-bench-verify-"))
    work.mkdir(parents=True, exist_ok=True)
    report: list[str] = []
    try:
        exe = find_archived()
        print("\n".join(machine(work, exe)), flush=True)
        if "time" in args.only:
            ds = datasets(args.quick, None)[0]
            ds.root = work / "data" / ds.key
            report += ["", *bench_time(ds, work, exe, args.rounds)]
        if "memory" in args.only:
            members = args.members // (10 if args.quick else 1)
            report += ["", *bench_memory(work, members)]
    except BenchError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n==== summary ====" + "\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
