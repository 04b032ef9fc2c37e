#!/usr/bin/env python3
"""Benchmark: `archived submit --wait` against the shell script an operator would write.

    python bench/run.py [--quick] [--workdir DIR] [--rounds N] [--keep] [--files N]

Times, alternating in one run and on the same generated data:

  script    tar -cf; sha256sum manifest of every file; minisign -S of the manifest;
            cp of tar + manifest + signature to two targets; sync; sha256sum of both
            copies (one `bash -c` script)
  floor     tar -cf - src | tee t1/x.tar > t2/x.tar; sync      (the I/O floor)
  archived  archived submit --wait of the same source to two localdir targets, the
            daemon already running (one daemon per data set, so VmHWM is per set)

Page caches are not dropped (that would need root): the sources are read once before
the timed rounds, so caches are warm for all three alike. Targets are emptied and
`sync` is run before every timed command. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# -- tools -----------------------------------------------------------------------------


class BenchError(Exception):
    """Something failed: the numbers would be meaningless. Printed, exit 1."""


def find_archived() -> str:
    beside = Path(sys.executable).parent / "archived"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("archived")
    if not found:
        raise BenchError("no `archived` next to this Python interpreter nor on PATH")
    return found


def need_tools() -> None:
    missing = [
        t
        for t in ("minisign", "tar", "sha256sum", "tee", "sync", "bash", "find", "xargs", "cp")
        if not shutil.which(t)
    ]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)}")


def run(
    argv: list[str], *, check: bool = True, timeout: float | None = None, **kw
) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise BenchError(
            f"{' '.join(argv)!r} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-2000:]}"
        )
    return p


def sync() -> None:
    run(["sync"])


def keygen(secret: Path, public: Path) -> None:
    for p in (secret, public):
        p.unlink(missing_ok=True)
    run(["minisign", "-G", "-W", "-p", str(public), "-s", str(secret)])
    secret.chmod(0o600)


def first_line(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True)
        return ((p.stdout or p.stderr).strip().splitlines() or ["?"])[0]
    except OSError:
        return "?"


# -- machine -----------------------------------------------------------------------------


def machine(workdir: Path, archived: str) -> list[str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / MiB:.1f} GiB"
    except OSError:
        pass
    df = run(["df", "-hT", str(workdir)], check=False).stdout.strip().splitlines()
    fs = "?"
    if len(df) >= 2:
        parts = df[-1].split()
        fs = f"{parts[1]} ({parts[0]}, size {parts[2]}, avail {parts[4]})"
    return [
        f"date:      {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%SZ')}",
        f"machine:   nproc {first_line(['nproc'])} ({cpu}), memory {mem}",
        f"kernel:    {platform.system()} {platform.release()} {platform.machine()}",
        f"workdir:   {workdir} on {fs}",
        f"python:    {platform.python_version()} ({sys.executable})",
        f"archived:  {archived} ({first_line([archived, '--version'])})",
        f"tools:     {first_line(['tar', '--version'])}; {first_line(['minisign', '-v'])}; "
        f"{first_line(['sha256sum', '--version'])}",
    ]


# -- data sets ---------------------------------------------------------------------------


@dataclass
class DataSet:
    key: str
    label: str
    files: list[tuple[str, int]]  # (relative path, size)
    only_archived: bool = False
    root: Path = field(default=Path())

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def nbytes(self) -> int:
        return sum(s for _, s in self.files)


def small_files(n: int, size: int = KiB, per_dir: int = 1000) -> list[tuple[str, int]]:
    return [(f"d{i // per_dir:04d}/f{i % per_dir:04d}.bin", size) for i in range(n)]


def datasets(quick: bool, extra_files: int | None) -> list[DataSet]:
    scale = 10 if quick else 1
    n_mixed, big = 2000 // scale, 512 * MiB // scale
    mixed = [(f"part{i % 4}/f{i:05d}.bin", 256 * KiB) for i in range(n_mixed)]
    mixed.append(("big/big.bin", big))
    n_small = 20000 // scale
    sets = [
        DataSet(
            "A",
            f"mixed ~{(n_mixed * 256 * KiB + big) / GiB:.2f} GiB: "
            f"{n_mixed:,} x 256 KiB in 4 dirs + 1 x {big / MiB:.1f} MiB",
            mixed,
        ),
        DataSet("B", f"{n_small:,} x 1 KiB in dirs of 1,000", small_files(n_small)),
    ]
    if extra_files:
        sets.append(
            DataSet(
                "F",
                f"{extra_files:,} x 1 KiB in dirs of 1,000 (archived only)",
                small_files(extra_files),
                only_archived=True,
            )
        )
    return sets


def generate(ds: DataSet) -> None:
    """Deterministic incompressible content; reused if a kept workdir already has it."""
    marker = ds.root / ".complete"
    spec = json.dumps(
        {
            "files": len(ds.files),
            "bytes": ds.nbytes,
            "label": ds.label,
            "first": ds.files[0],
            "last": ds.files[-1],
        }
    )
    if marker.exists() and marker.read_text() == spec:
        print(f"  data set {ds.key}: reusing {ds.src}", flush=True)
        return
    if ds.root.exists():
        shutil.rmtree(ds.root)
    t0 = time.perf_counter()
    rnd = random.Random(f"archived-bench-{ds.key}")
    made: set[str] = set()
    for rel, size in ds.files:
        path = ds.src / rel
        if path.parent.as_posix() not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent.as_posix())
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 8 * MiB)
                f.write(rnd.randbytes(n))
                left -= n
    sync()
    marker.write_text(spec)
    print(
        f"  data set {ds.key}: generated {len(ds.files):,} files, {ds.nbytes / MiB:.1f} MiB "
        f"in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )


def warm(ds: DataSet) -> None:
    """Read the whole source once (through tar, like two of the three contenders)."""
    run(["bash", "-c", "set -o pipefail; tar -cf - src | cat > /dev/null"], cwd=ds.root)


# -- the contenders ------------------------------------------------------------------------

SCRIPT = r"""
set -euo pipefail
cd "$1"                       # the data set's folder; the source is ./src
stage=$2 t1=$3 t2=$4 key=$5
tar -cf "$stage/x.tar" src
find src -type f -print0 | xargs -0 sha256sum > "$stage/manifest.sha256"
minisign -S -s "$key" -m "$stage/manifest.sha256"
cp "$stage/x.tar" "$stage/manifest.sha256" "$stage/manifest.sha256.minisig" "$t1/"
cp "$stage/x.tar" "$stage/manifest.sha256" "$stage/manifest.sha256.minisig" "$t2/"
sync
sums=$(sha256sum "$t1/x.tar" "$t2/x.tar")
echo "$sums"
[ "$(cut -d' ' -f1 <<<"$sums" | sort -u | wc -l)" = 1 ] || { echo "copies differ" >&2; exit 1; }
rm -f "$stage/x.tar" "$stage/manifest.sha256" "$stage/manifest.sha256.minisig"
"""

FLOOR = r"""
set -euo pipefail
cd "$1"
tar -cf - src | tee "$2/x.tar" > "$3/x.tar"
sync
"""


def empty(*dirs: Path) -> None:
    for d in dirs:
        if d.exists():
            for entry in d.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        d.mkdir(parents=True, exist_ok=True)


def timed(argv: list[str], who: str) -> float:
    """Seconds `argv` took; BenchError if it failed."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise BenchError(f"{who} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return dt


def check_tar_copies(paths: list[Path], ds: DataSet, what: str) -> None:
    sizes = []
    for p in paths:
        if not p.is_file():
            raise BenchError(f"{what}: copy missing: {p}")
        sizes.append(p.stat().st_size)
    if len(set(sizes)) != 1 or sizes[0] < ds.nbytes:
        raise BenchError(f"{what}: copies have sizes {sizes}, payload is {ds.nbytes} bytes")


@dataclass
class Result:
    seconds: float
    detail: dict = field(default_factory=dict)


class Script:
    name = "script"

    def __init__(self, base: Path, ds: DataSet, key: Path) -> None:
        self.ds, self.key = ds, key
        self.stage, self.t1, self.t2 = base / "stage", base / "t1", base / "t2"

    def prepare(self) -> None:
        empty(self.stage, self.t1, self.t2)
        sync()

    def run(self) -> Result:
        argv = [
            "bash",
            "-c",
            SCRIPT,
            "script",
            str(self.ds.root),
            str(self.stage),
            str(self.t1),
            str(self.t2),
            str(self.key),
        ]
        dt = timed(argv, "script")
        check_tar_copies([self.t1 / "x.tar", self.t2 / "x.tar"], self.ds, "script")
        for t in (self.t1, self.t2):
            for name in ("manifest.sha256", "manifest.sha256.minisig"):
                if not (t / name).is_file():
                    raise BenchError(f"script: {t / name} missing")
        return Result(dt)


class Floor:
    name = "floor"

    def __init__(self, base: Path, ds: DataSet) -> None:
        self.ds = ds
        self.t1, self.t2 = base / "t1", base / "t2"

    def prepare(self) -> None:
        empty(self.t1, self.t2)
        sync()

    def run(self) -> Result:
        argv = ["bash", "-c", FLOOR, "floor", str(self.ds.root), str(self.t1), str(self.t2)]
        dt = timed(argv, "floor")
        check_tar_copies([self.t1 / "x.tar", self.t2 / "x.tar"], self.ds, "floor")
        return Result(dt)


def parse_ts(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


class Archived:
    """One daemon per data set, its own state, spool, key and two localdir targets."""

    name = "archived"

    def __init__(
        self, exe: str, base: Path, ds: DataSet, warmup_src: Path, allowed_root: Path
    ) -> None:
        self.exe, self.base, self.ds = exe, base, ds
        self.t1, self.t2 = base / "t1", base / "t2"
        self.config = base / "config.toml"
        self.job = base / "job.toml"
        self.warmup_job = base / "warmup.toml"
        self.log = base / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.verified = False
        if base.exists():
            shutil.rmtree(base)
        for d in (base / "state", base / "spool", self.t1, self.t2):
            d.mkdir(parents=True)
        keygen(base / "signing.key", base / "signing.pub")
        self.config.write_text(
            "[daemon]\n"
            f"state_dir = {json.dumps(str(base / 'state'))}\n"
            f"spool_dir = {json.dumps(str(base / 'spool'))}\n"
            'poll_interval = "50ms"\n'
            "[signing]\n"
            f"key = {json.dumps(str(base / 'signing.key'))}\n"
            "[sources]\n"
            f"allowed_roots = [{json.dumps(str(allowed_root))}]\n"
            '[storage.t1]\ndriver = "localdir"\n'
            f"path = {json.dumps(str(self.t1))}\n"
            '[storage.t2]\ndriver = "localdir"\n'
            f"path = {json.dumps(str(self.t2))}\n"
        )
        for path, name, src in (
            (self.job, "bench", ds.src),
            (self.warmup_job, "warmup", warmup_src),
        ):
            path.write_text(
                f'name = "{name}"\nstorage = ["t1", "t2"]\n'
                f'[[activities]]\nname = "src"\ndriver = "files"\npath = {json.dumps(str(src))}\n'
            )

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([self.exe, args[0], "--config", str(self.config), *args[1:]], check=check)

    # daemon lifecycle
    def start(self) -> None:
        self.cli("check-config")
        logf = open(self.log, "ab")  # noqa: SIM115 (the daemon writes it while it runs)
        self.proc = subprocess.Popen(
            [self.exe, "run", "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
        )
        logf.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.alive()
            if any(_event(line) == "ready" for line in self._log_lines()):
                return
            time.sleep(0.05)
        raise BenchError(f"daemon not ready after 60s; log:\n{self.log_tail()}")

    def alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise BenchError(f"the daemon is not running (exit {code}); log:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def status(self, field_name: str) -> int:
        """A kB figure from /proc/<pid>/status, in bytes."""
        self.alive()
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * KiB
        raise BenchError(f"no {field_name} in /proc/{self.proc.pid}/status")

    def _log_lines(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self._log_lines()[-n:])

    # the timed command
    def prepare(self) -> None:
        empty(self.t1, self.t2)
        sync()

    def warmup(self) -> None:
        self.submit(self.warmup_job, label="warm-up job")
        empty(self.t1, self.t2)
        sync()

    def run(self) -> Result:
        return self.submit(self.job)

    def submit(self, job: Path, label: str = "archived") -> Result:
        self.alive()
        argv = [
            self.exe,
            "submit",
            "--config",
            str(self.config),
            "--wait",
            "--timeout",
            "2h",
            str(job),
        ]
        wall0 = time.time()
        t0 = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        wall1 = time.time()
        job_id = p.stdout.strip().splitlines()[0] if p.stdout.strip() else None
        if p.returncode != 0 or not job_id:
            why = p.stderr.strip()
            if job_id:
                shown = self.cli("show", job_id, "--json", check=False).stdout
                with contextlib.suppress(ValueError):
                    why += f"; job error: {json.loads(shown).get('error')}"
            raise BenchError(
                f"{label}: submit --wait exited {p.returncode}: {why}\n"
                f"daemon log:\n{self.log_tail()}"
            )
        show = json.loads(self.cli("show", job_id, "--json").stdout)
        if show["state"] != "completed":
            raise BenchError(f"{label}: job {job_id} is {show['state']}: {show.get('error')}")
        copies = {c["target"]: c for c in show["copies"]}
        if set(copies) != {"t1", "t2"}:
            raise BenchError(f"{label}: job {job_id} has copies on {sorted(copies)}, not t1, t2")
        for c in copies.values():
            path = Path(c["path"])
            if not path.is_file() or path.stat().st_size != c["size"]:
                raise BenchError(f"{label}: copy {path} missing or not {c['size']} bytes")
        if label == "archived":
            if copies["t1"]["sha256"] != copies["t2"]["sha256"]:
                raise BenchError(f"{label}: the two copies of job {job_id} differ")
            if show["archive"]["size"] < self.ds.nbytes:
                raise BenchError(f"{label}: archive smaller than the payload")
            if not self.verified:  # once per data set, untimed: the archive is valid
                v = self.cli("verify", copies["t1"]["path"], check=False)
                if v.returncode != 0:
                    raise BenchError(
                        f"archived verify {copies['t1']['path']} failed: "
                        f"{(v.stdout + v.stderr).strip()[-2000:]}"
                    )
                self.verified = True
        return Result(dt, {"job": job_id, "show": show, "wall0": wall0, "wall1": wall1})

    # where the time went
    def phases(self, r: Result) -> list[tuple[str, float]]:
        show, job_id = r.detail["show"], r.detail["job"]
        hist = {h["state"]: parse_ts(h["at"]) for h in show["history"]}
        events: dict[str, float] = {}
        for line in self._log_lines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("job_id") != job_id:
                continue
            ev = rec.get("event")
            key = {
                "post-processing step done": f"step:{rec.get('step')}",
                "stored": f"stored:{rec.get('target')}",
                "archive sealed": "sealed",
            }.get(ev)
            if key:
                events[key] = parse_ts(rec["timestamp"])
        out: list[tuple[str, float]] = []

        def span(label: str, a: float | None, b: float | None) -> None:
            if a is not None and b is not None:
                out.append((label, b - a))

        g = hist.get
        span(
            "submit CLI start -> job file picked up (uninitialized)",
            r.detail["wall0"],
            g("uninitialized"),
        )
        span(
            "uninitialized -> queued -> activity_archiving",
            g("uninitialized"),
            g("activity_archiving"),
        )
        span(
            "activity_archiving (walk, read + sha256 into the tar fragment)",
            g("activity_archiving"),
            g("post_processing"),
        )
        pp, st = g("post_processing"), g("store")
        ci, cc, sg = (
            events.get(f"step:{s}") for s in ("check_integrity", "calculate_checksums", "sign")
        )
        if pp and ci and cc and sg and st:
            span("  post_processing: check_integrity", pp, ci)
            span("  post_processing: calculate_checksums", ci, cc)
            span("  post_processing: sign (tag files, signature, head of the tar)", cc, sg)
            span("  post_processing: commit -> store", sg, st)
        span("post_processing (total)", pp, st)
        s1, s2 = events.get("stored:t1"), events.get("stored:t2")
        if st and s1 and s2:
            span("  store: first copy written, fsynced, read back", st, min(s1, s2))
            span("  store: second copy done", min(s1, s2), max(s1, s2))
        span(
            "store (total: copies to t1, t2 + archive sha256, concurrently; verify)",
            st,
            g("cleanup"),
        )
        span("cleanup (remove staging)", g("cleanup"), g("completed"))
        span("completed -> submit --wait returns", g("completed"), r.detail["wall1"])
        span("total (uninitialized -> completed)", g("uninitialized"), g("completed"))
        return out


def _event(line: str) -> str | None:
    try:
        return json.loads(line).get("event")
    except (ValueError, AttributeError):
        return None


# -- the run -------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def bench_set(
    ds: DataSet,
    work: Path,
    archived_exe: str,
    op_key: Path,
    warmup_src: Path,
    rounds: int,
    daemons: list[Archived],
) -> list[str]:
    print(
        f"\n== {ds.key}: {ds.label} ({len(ds.files):,} files, {fmt_bytes(ds.nbytes)}) ==",
        flush=True,
    )
    warm(ds)
    arch = Archived(archived_exe, work / "daemon" / ds.key, ds, warmup_src, work / "data")
    daemons.append(arch)
    arch.start()
    arch.warmup()
    idle_hwm = arch.status("VmHWM")
    if ds.only_archived:
        contenders: list = [arch]
        rounds = 1
    else:
        contenders = [
            Script(work / "script" / ds.key, ds, op_key),
            Floor(work / "floor" / ds.key, ds),
            arch,
        ]
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    arch_results: list[Result] = []
    for rnd in range(rounds):
        k = rnd % len(contenders)
        order = contenders[-k:] + contenders[:-k] if k else contenders
        for c in order:
            c.prepare()
            r = c.run()
            times[c.name].append(r.seconds)
            if c is arch:
                arch_results.append(r)
            print(f"  round {rnd + 1}/{rounds}  {c.name:<8} {r.seconds:8.2f}s", flush=True)
    for c in contenders:
        c.prepare()  # leave no copies behind
    peak, rss = arch.status("VmHWM"), arch.status("VmRSS")
    arch.stop()

    med = {name: statistics.median(v) for name, v in times.items()}
    lines = [
        f"{ds.key}: {ds.label} ({len(ds.files):,} files, {fmt_bytes(ds.nbytes)}); "
        f"median of {rounds}, caches warm for all alike",
        f"  {'':<10}{'median s':>10}   runs",
    ]
    for name, v in times.items():
        lines.append(f"  {name:<10}{med[name]:>10.2f}   " + " ".join(f"{x:.2f}" for x in v))
    if "script" in med:
        lines.append(f"  archived/script  {med['archived'] / med['script']:.2f}x")
        lines.append(f"  archived/floor   {med['archived'] / med['floor']:.2f}x")
    lines.append(
        f"  daemon peak RSS (VmHWM) {fmt_bytes(peak)} (after warm-up job "
        f"{fmt_bytes(idle_hwm)}; VmRSS at end {fmt_bytes(rss)})"
    )
    # the phase breakdown of the archived run closest to the median
    r = min(arch_results, key=lambda x: abs(x.seconds - med["archived"]))
    lines.append(
        f"  phases of archived job {r.detail['job']} ({r.seconds:.2f}s wall, "
        "from `archived show --json` history and the daemon log):"
    )
    for label, secs in arch.phases(r):
        lines.append(f"    {label:<62}{secs:>8.3f}s")
    print("\n".join(lines), flush=True)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="data sets 10x smaller (smoke run)")
    ap.add_argument(
        "--workdir",
        type=Path,
        help="where data, targets and daemon state go (default: a fresh temp dir)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per contender (3)")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the workdir (and reuse its generated data next time)",
    )
    ap.add_argument(
        "--files",
        type=int,
        metavar="N",
        help="also an 'N x 1 KiB' data set, archived only, for peak RSS",
    )
    ap.add_argument(
        "--only",
        metavar="SETS",
        help="run only these data sets, e.g. 'A' or 'A,B' (default: all)",
    )
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    created = args.workdir is None or not args.workdir.exists()
    if args.workdir is None:
        work = Path(tempfile.mkdtemp(prefix="archived-bench-"))
    else:
        work = args.workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    ours = [work / d for d in ("data", "keys", "script", "floor", "daemon")]
    daemons: list[Archived] = []
    failed: str | None = None
    report: list[str] = []
    try:
        need_tools()
        exe = find_archived()
        head = machine(work, exe)
        print("\n".join(head), flush=True)
        print(
            "caches:    page cache NOT dropped (no root); every source is read once before "
            "its timed rounds, so caches are warm for script, floor and archived alike; "
            "targets emptied + sync before every timed command",
            flush=True,
        )
        sets = datasets(args.quick, args.files)
        if args.only:
            sets = [ds for ds in sets if ds.key in args.only.upper().split(",")]
        for ds in sets:
            ds.root = work / "data" / ds.key
        (work / "keys").mkdir(exist_ok=True)
        op_key = work / "keys" / "operator.key"
        keygen(op_key, work / "keys" / "operator.pub")
        warmup_src = work / "data" / "warmup" / "src"
        warmup_src.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            (warmup_src / f"w{i}.txt").write_text(f"warm-up file {i}\n")
        for ds in sets:  # each set generated right before its rounds, not all up front,
            print(f"\ngenerating data set {ds.key}", flush=True)  # so a big set's writeback
            generate(ds)  # cannot slow down the rounds of an earlier one
            report += ["", *bench_set(ds, work, exe, op_key, warmup_src, args.rounds, daemons)]
    except BenchError as exc:
        failed = str(exc)
    except KeyboardInterrupt:
        failed = "interrupted"
    finally:
        for d in daemons:
            d.stop()
        if not args.keep:
            if created:
                shutil.rmtree(work, ignore_errors=True)
            else:
                for d in ours:
                    shutil.rmtree(d, ignore_errors=True)
    if failed:
        print(f"\nBENCHMARK FAILED: {failed}", file=sys.stderr, flush=True)
        return 1
    print("\n==== summary ====" + "\n".join(report))
    if args.keep:
        print(f"\nworkdir kept: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
