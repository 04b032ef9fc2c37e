#!/usr/bin/env python3
"""Benchmark: many tiny jobs at once, `archived` against the operator's shell loop.

    python bench/tiny.py [--jobs N] [--rounds N] [--only script,sqlite,pg1,pg2,pg3]

N jobs (default 300), each one 1 KiB file to two localdir targets. Timed, in one run:

  script    a bash loop running bench/run.py's operator script once per job, job after
            job (tar, sha256sum, minisign -S, cp to two targets, sync, sha256sum read-back)
  sqlite    N job files renamed into one daemon's spool at once; until all N are
            `completed` (the default queue: SQLite in the state dir)
  pgK       the same against K daemons (K = 1, 2, 3; own state dirs and spools, the
            jobs spread over their spools) sharing one PostgreSQL database, on a
            cluster this script starts with initdb + pg_ctl on a unix socket (fsync on)

See bench/README.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as common  # (bench/run.py: tools, the machine, the operator's script)

# The operator's script of bench/run.py, once per job, job after job.
LOOP = r"""
set -euo pipefail
n=$1 data=$2 stage=$3 t1=$4 t2=$5 key=$6 script=$7
for ((i = 0; i < n; i++)); do
  j=$(printf 'j%04d' "$i")
  mkdir "$t1/$j" "$t2/$j"
  bash -c "$script" script "$data/$j" "$stage" "$t1/$j" "$t2/$j" "$key" > /dev/null
done
"""


def generate(data: Path, jobs: int) -> None:
    rnd = __import__("random").Random("archived-bench-tiny")
    for i in range(jobs):
        src = data / f"j{i:04d}" / "src"
        src.mkdir(parents=True, exist_ok=True)
        (src / "f.bin").write_bytes(rnd.randbytes(common.KiB))
    common.sync()


class Cluster:
    """A throwaway PostgreSQL cluster on a unix socket, as tests/conftest.py makes one,
    but with fsync on: the queue's commits are flushed, like SQLite's."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        initdb = found[-1] if found else shutil.which("initdb")
        if initdb is None:
            raise common.BenchError("PostgreSQL is not installed (initdb)")
        self.bindir = Path(initdb).parent
        # not under the workdir: the server runs as `postgres` when we are root
        self.base = Path(tempfile.mkdtemp(prefix="archived-bench-pg-"))
        self.run_as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self.data = self.base / "data"
        self.databases = 0
        self.started = False

    def pg(self, *argv: str) -> None:
        common.run([*self.run_as, *argv], timeout=120)

    def start(self) -> None:
        self.pg(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                "archived", "-E", "UTF8")  # fmt: skip
        self.pg(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o",
                f"-k {self.base} -c listen_addresses= -c max_connections=100",
                "-l", str(self.base / "server.log"), "-w", "start")  # fmt: skip
        self.started = True

    def stop(self) -> None:
        if self.started:
            self.pg(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")
        shutil.rmtree(self.base, ignore_errors=True)

    def cpu(self) -> float:
        """User + system seconds of the server so far: the postmaster, its processes
        alive (a daemon's connections), and those ended (counted in the postmaster)."""
        if not self.started:
            return 0.0
        main = (self.data / "postmaster.pid").read_text().split()[0]
        total = 0
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                pid, fields = stat.split("/")[2], Path(stat).read_text().rsplit(")", 1)[1]
            except OSError:  # ended meanwhile
                continue
            f = fields.split()
            if pid == main:
                total += sum(int(x) for x in f[11:15])  # its own, and its ended children's
            elif f[1] == main:
                total += int(f[11]) + int(f[12])
        return total / os.sysconf("SC_CLK_TCK")

    def url(self, database: str) -> str:
        return f"postgresql://archived@/{database}?host={self.base}"

    def new_database(self) -> str:
        import psycopg

        self.databases += 1
        name = f"bench{self.databases}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


class Daemons:
    """K daemons on one queue (K = 1 without a url: SQLite), shared targets and key."""

    def __init__(
        self, exe: str, base: Path, count: int, url: str, allowed: Path, daemon: str = ""
    ) -> None:
        self.exe, self.base, self.url = exe, base, url
        self.t1, self.t2 = base / "t1", base / "t2"
        if base.exists():
            shutil.rmtree(base)
        for d in (self.t1, self.t2):
            d.mkdir(parents=True)
        common.keygen(base / "signing.key", base / "signing.pub")
        self.hosts: list[common.Archived] = []
        self.configs: list[Path] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.watch: Any = None  # the connection that counts the jobs' states (PostgreSQL)
        for k in range(count):
            home = base / f"host{k}"
            for d in ("state", "spool"):
                (home / d).mkdir(parents=True)
            queue = ""
            if url:
                queue = f'[queue]\nurl = {json.dumps(url)}\nhost_id = "host{k}"\n'
            config = home / "config.toml"
            config.write_text(
                "[daemon]\n"
                f"state_dir = {json.dumps(str(home / 'state'))}\n"
                f"spool_dir = {json.dumps(str(home / 'spool'))}\n"
                'poll_interval = "50ms"\n'
                f"{daemon}"
                f"{queue}"
                "[signing]\n"
                f"key = {json.dumps(str(base / 'signing.key'))}\n"
                "[sources]\n"
                f"allowed_roots = [{json.dumps(str(allowed))}]\n"
                '[storage.t1]\ndriver = "localdir"\n'
                f"path = {json.dumps(str(self.t1))}\n"
                '[storage.t2]\ndriver = "localdir"\n'
                f"path = {json.dumps(str(self.t2))}\n"
            )
            self.configs.append(config)

    def start(self) -> None:
        for config in self.configs:
            common.run([self.exe, "check-config", "--config", str(config)])
            log = open(config.parent / "daemon.log", "ab")  # noqa: SIM115
            self.procs.append(
                subprocess.Popen(
                    [self.exe, "run", "--config", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            )
            log.close()
        for config, proc in zip(self.configs, self.procs, strict=True):
            log = config.parent / "daemon.log"
            deadline = time.monotonic() + 60
            while not any(common._event(line) == "ready" for line in _lines(log)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise common.BenchError(f"daemon not ready; log:\n{_tail(log)}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cpu(self) -> float:
        """User + system seconds the daemons used so far."""
        total = 0
        for proc in self.procs:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def alive(self) -> None:
        for config, proc in zip(self.configs, self.procs, strict=True):
            if proc.poll() is not None:
                log = config.parent / "daemon.log"
                raise common.BenchError(f"a daemon exited {proc.returncode}:\n{_tail(log)}")

    def states(self) -> dict[str, int]:
        sql = "SELECT state, count(*) FROM jobs GROUP BY state"
        if self.url:
            # one connection kept for the run: a new one for each look is a new server
            # process each time (a few ms of CPU that the daemons would miss)
            if self.watch is None:
                import psycopg

                self.watch = psycopg.connect(self.url, autocommit=True)
            return dict(self.watch.execute(sql).fetchall())
        db = self.configs[0].parent / "state" / "archived.db"
        if not db.exists():
            return {}
        with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=1) as conn:
            return dict(conn.execute(sql).fetchall())

    def drop(self, data: Path, names: list[str], tag: str) -> float:
        """Write every job file into a spool's tmp/, then rename them all into the
        spools' incoming/ (spread evenly); return the time of the first rename."""
        staged = []
        for i, name in enumerate(names):
            spool = self.configs[i % len(self.configs)].parent / "spool"
            (spool / "tmp").mkdir(exist_ok=True)
            (spool / "incoming").mkdir(exist_ok=True)
            tmp = spool / "tmp" / f"{tag}-{name}.toml"
            tmp.write_text(
                f'name = "{tag}-{name}"\nstorage = ["t1", "t2"]\n[[activities]]\n'
                f'name = "src"\ndriver = "files"\n'
                f"path = {json.dumps(str(data / name / 'src'))}\n"
            )
            staged.append((tmp, spool / "incoming" / tmp.name))
        t0 = time.perf_counter()
        for tmp, dest in staged:
            os.rename(tmp, dest)
        return t0

    def wait_all(self, total: int, t0: float, timeout: float = 1800) -> float:
        while True:
            states = self.states()
            done = states.get("completed", 0)
            if done >= total:
                return time.perf_counter() - t0
            bad = {s: n for s, n in states.items() if s in ("failed", "error", "failure")}
            if bad:
                raise common.BenchError(f"jobs ended badly: {states}")
            if time.perf_counter() - t0 > timeout:
                raise common.BenchError(f"not done after {timeout}s: {states}")
            self.alive()
            time.sleep(0.02)

    def check_copies(self, jobs: int) -> None:
        for t in (self.t1, self.t2):
            tars = [p for p in t.rglob("*.tar")]
            if len(tars) < jobs:
                raise common.BenchError(f"{t}: {len(tars)} archives, expected {jobs}")


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def _tail(path: Path, n: int = 30) -> str:
    return "\n".join(_lines(path)[-n:])


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def time_script(work: Path, data: Path, jobs: int, key: Path, rnd: int) -> tuple[float, float]:
    """Wall seconds, and CPU seconds of every process the loop ran."""
    here = work / "script" / f"r{rnd}"  # kept until the end: see time_daemons
    stage, t1, t2 = here / "stage", here / "t1", here / "t2"
    common.empty(stage, t1, t2)
    common.sync()
    argv = ["bash", "-c", LOOP, "loop", str(jobs), str(data), str(stage), str(t1), str(t2)]
    cpu = children_cpu()
    dt = common.timed([*argv, str(key), common.SCRIPT], "script")
    cpu = children_cpu() - cpu
    if len(list(t1.glob("*/x.tar"))) != jobs or len(list(t2.glob("*/x.tar"))) != jobs:
        raise common.BenchError("script: archives missing")
    return dt, cpu


def time_daemons(
    exe: str,
    work: Path,
    data: Path,
    jobs: int,
    count: int,
    url: str,
    rnd: int,
    name: str,
    cluster: Cluster | None = None,
) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds of the daemons, and of the PostgreSQL server."""
    # Each contender's files stay until the whole run ends: removing thousands of them
    # just before the next contender starts made it pay for them (an ext4 without a
    # journal skips every inode freed in the last half minute when it makes a file)
    fleet = Daemons(exe, work / "daemons" / f"{name}-r{rnd}", count, url, data)
    try:
        fleet.start()
        names = [f"j{i:04d}" for i in range(jobs)]
        # a warm-up job, so that the first imports and the schema are not timed
        t0 = fleet.drop(data, names[:1], "warmup")
        fleet.wait_all(1, t0)
        before = fleet.states().get("completed", 0)
        common.empty(fleet.t1, fleet.t2)
        common.sync()
        cpu, server = fleet.cpu(), cluster.cpu() if cluster else 0.0
        t0 = fleet.drop(data, names, f"r{rnd}")
        dt = fleet.wait_all(before + jobs, t0)
        cpu, server = fleet.cpu() - cpu, (cluster.cpu() - server if cluster else 0.0)
        fleet.check_copies(jobs)
        return dt, cpu, server
    finally:
        fleet.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=300, help="jobs per run (300)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per contender (3)")
    ap.add_argument("--only", default="script,sqlite,pg1,pg2,pg3", help="contenders to run")
    ap.add_argument("--workdir", type=Path, help="default: a fresh temp dir, removed after")
    args = ap.parse_args()
    wanted = args.only.split(",")
    work = Path(tempfile.mkdtemp(prefix="archived-bench-tiny-", dir=args.workdir))
    cluster: Cluster | None = None
    failed = None
    times: dict[str, list[float]] = {w: [] for w in wanted}
    cpus: dict[str, list[float]] = {w: [] for w in wanted}
    servers: dict[str, list[float]] = {w: [] for w in wanted}
    try:
        common.need_tools()
        exe = common.find_archived()
        print("\n".join(common.machine(work, exe)), flush=True)
        data = work / "data"
        generate(data, args.jobs)
        key = work / "operator.key"
        common.keygen(key, work / "operator.pub")
        if any(w.startswith("pg") for w in wanted):
            cluster = Cluster()
            cluster.start()
        for rnd in range(args.rounds):
            k = rnd % len(wanted)
            for who in wanted[k:] + wanted[:k]:  # the order rotates per round
                server = 0.0
                if who == "script":
                    dt, cpu = time_script(work, data, args.jobs, key, rnd)
                elif who == "sqlite":
                    dt, cpu, _ = time_daemons(exe, work, data, args.jobs, 1, "", rnd, who)
                else:
                    assert cluster is not None
                    url = cluster.new_database()
                    count = int(who[2:])
                    dt, cpu, server = time_daemons(
                        exe, work, data, args.jobs, count, url, rnd, who, cluster
                    )
                times[who].append(dt)
                cpus[who].append(cpu)
                servers[who].append(server)
                print(
                    f"  round {rnd + 1}/{args.rounds}  {who:<7}{dt:8.2f}s  cpu {cpu:6.2f}s "
                    f"server {server:5.2f}s load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    except common.BenchError as exc:
        failed = str(exc)
    except KeyboardInterrupt:
        failed = "interrupted"
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        print(f"\nBENCHMARK FAILED: {failed}", file=sys.stderr, flush=True)
        return 1
    med = {w: statistics.median(v) for w, v in times.items()}
    print(f"\n==== {args.jobs} tiny jobs (1 x 1 KiB, two localdir targets); median of "
          f"{args.rounds} ====")  # fmt: skip
    print(f"  {'':<9}{'median s':>9}{'jobs/s':>9}{'x script':>10}{'cpu ms/job':>12}"
          f"{'server':>8}   runs")  # fmt: skip
    per_job = {w: statistics.median(v) / args.jobs * 1000 for w, v in cpus.items()}
    server = {w: statistics.median(v) / args.jobs * 1000 for w, v in servers.items()}
    for w, v in times.items():
        ratio = f"{med[w] / med['script']:9.2f}x" if "script" in med else ""
        runs = " ".join(f"{x:.2f}" for x in v)
        cost = f"{server[w]:8.1f}" if w.startswith("pg") else " " * 8
        print(f"  {w:<9}{med[w]:9.2f}{args.jobs / med[w]:9.1f}{ratio:>10}{per_job[w]:12.1f}"
              f"{cost}   {runs}")  # fmt: skip
    if "pg1" in med and "pg3" in med:
        # pg3 at most: every CPU of the machine busy all along, at pg3's CPU a job
        # (daemons' and server's); against pg1's measured rate
        cores = os.cpu_count() or 1
        ceiling = cores / (per_job["pg3"] + server["pg3"]) * 1000 / (args.jobs / med["pg1"])
        print(f"  pg3/pg1 throughput  {med['pg1'] / med['pg3']:.2f}x  (with every CPU busy "
              f"at pg3's CPU a job: at most {ceiling:.2f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
