"""Fixtures for the two layers of tests, on a temporary root.

- In process (the default, fast): `await root.run_until_idle()` runs the daemon in the
  test's event loop until nothing is left to do; `root.drop()` puts job files into its
  spool; `await root.details()` reads a job as `archived show --json` does; assert on
  log events with `structlog.testing.capture_logs()`; the `fake_activity` fixture
  registers an activity driver whose outcome the test decides.
- Acceptance, marked `slow`: the real daemon and CLI as subprocesses (`root.start()`,
  `root.cli()`), for what only a process shows: signals, exit codes, systemd, crashes.
  `wait_state` polls the database read-only. A test not marked `slow` that spawns
  either fails at once (see `pytest_runtest_protocol`), so the layers stay apart.

Nothing here sleeps to synchronise: `wait_until` polls a condition with a deadline.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from archived import loader
from archived.config import Config
from archived.daemon import Daemon as InProcessDaemon
from archived.spool import Spool
from archived.states import State
from archived.store import StateReader, StoreUnavailable
from archived.store_open import open_state_reader, open_store

MINISIGN = "minisign"


def wait_until(condition: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(delay)  # polling interval, not synchronisation
        delay = min(delay * 1.5, 0.25)


def run_cli(
    *args: str,
    config: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = False,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "archived", *args]
    if config is not None:
        cmd += ["--config", str(config)]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def minisign_keypair(directory: Path, name: str = "archived") -> tuple[Path, Path]:
    secret, public = directory / f"{name}.key", directory / f"{name}.pub"
    subprocess.run(
        [MINISIGN, "-G", "-W", "-p", str(public), "-s", str(secret)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return secret, public


def toml_value(value: Any) -> str:
    """Enough TOML for test configs: strings, numbers, booleans, lists, inline tables."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


@dataclass
class Root:
    """A temporary installation: config, sources, two targets, a minisign key pair."""

    path: Path
    config: Path
    sources: Path
    targets: dict[str, Path]
    secret_key: Path
    public_key: Path
    daemons: list[Daemon] = field(default_factory=list)
    queue: dict[str, Any] = field(default_factory=dict)  # [queue]: PostgreSQL, when set

    @property
    def state_dir(self) -> Path:
        return self.path / "state"

    @property
    def spool(self) -> Path:
        return self.path / "spool"

    def write_config(self, **overrides: dict[str, Any]) -> None:
        """The config file; `overrides` merge into its tables, e.g. retry={"max_attempts": 3}."""
        tables: dict[str, dict[str, Any]] = {
            "daemon": {
                "state_dir": str(self.state_dir),
                "spool_dir": str(self.spool),
                "poll_interval": "100ms",
                "shutdown_grace": "10s",
            },
            "retry": {"backoff": "100ms", "backoff_max": "500ms"},
            "signing": {"key": str(self.secret_key)},
            "sources": {"allowed_roots": [str(self.sources)]},
        }
        for name, path in self.targets.items():
            tables[f"storage.{name}"] = {"driver": "localdir", "path": str(path)}
        if self.queue:
            tables["queue"] = dict(self.queue)
        for name, values in overrides.items():
            tables.setdefault(name.replace("__", "."), {}).update(values)
        self.config.write_text(
            "".join(
                f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
                for name, values in tables.items()
            )
        )

    def host(self, name: str) -> Root:
        """Another daemon's installation on this (PostgreSQL) queue, `name` its host_id:
        its own state and spool directories, the same sources, targets and keys."""
        path = self.path / name
        path.mkdir()
        other = Root(
            path,
            path / "archived.toml",
            self.sources,
            self.targets,
            self.secret_key,
            self.public_key,
            daemons=self.daemons,
            queue={**self.queue, "host_id": name},
        )
        other.write_config()
        return other

    def cli(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, config=self.config, **kw)

    def start(
        self, env: dict[str, str] | None = None, wait_ready: bool = True, umask: int = -1
    ) -> Daemon:
        """The daemon; `umask` as a unit's UMask= (-1: this process's)."""
        daemon = Daemon(self, env or {}, umask)
        daemon.start(wait_ready)
        self.daemons.append(daemon)
        return daemon

    def job_file(self, name: str = "job", **fields: Any) -> Path:
        """A job file (JSON) with `fields`; activities default to one over sources/a."""
        body = {"name": name, **fields}
        body.setdefault(
            "activities", [{"name": "a", "driver": "files", "path": str(self.sources / "a")}]
        )
        path = self.path / f"{name}-{len(list(self.path.glob('*.json')))}.json"
        path.write_text(json.dumps(body))
        return path

    def submit(self, *files: Path, wait: bool = False) -> list[str]:
        args = ["submit", *(["--wait"] if wait else []), *map(str, files)]
        result = self.cli(*args, timeout=120)
        if result.returncode != 0 and not wait:
            raise AssertionError(result.stderr)
        return result.stdout.split()

    def load_config(self) -> Config:
        return loader.load(self.config)

    # -- in process --------------------------------------------------------------------

    async def run_until_idle(self, timeout: float = 60) -> InProcessDaemon:
        """The daemon, in this event loop, until nothing is left to do; it is returned
        for its metrics and state."""
        daemon = InProcessDaemon(self.load_config())
        with anyio.fail_after(timeout):
            await daemon.run_until_idle()
        return daemon

    def drop(self, *files: Path) -> list[str]:
        """Job files into the spool as `archived submit` puts them, unchecked (the
        daemon's own checks are what a test of a bad job file is about); their ids."""
        spool = Spool(self.load_config().daemon.spool_dir)
        spool.create()
        return [
            spool.submit(f.read_bytes(), ".toml" if f.suffix == ".toml" else ".json") for f in files
        ]

    async def details(self, job_id: str) -> dict[str, Any]:
        """The job as `archived show --json` prints it."""
        from archived.actions import job_details

        store = await open_store(self.load_config(), create=False)
        found = await job_details(store, job_id) if store is not None else None
        if store is not None:
            await store.close()
        if found is None:
            raise AssertionError(f"no job {job_id!r}")
        return json.loads(json.dumps(found))  # type: ignore[no-any-return]

    def main(self, *args: str) -> int:
        """`archived ARGS --config ...` through the CLI's `main`, in this process: its
        exit code; its output goes to `capsys`."""
        from archived.cli import main

        return main([*args, "--config", str(self.config)])

    async def command(self, *args: str) -> int:
        """`main` from async code: in a worker thread (it runs an event loop of its own)."""
        return await anyio.to_thread.run_sync(self.main, *args)

    async def wait_for(self, job_id: str, *states: str, timeout: float = 30) -> dict[str, Any]:
        """The job, once in one of `states`: while `run_until_idle` runs in a task group.
        Polled read-only, as `wait_state` does (opening the store would race the
        daemon's first migration)."""
        reader = open_state_reader(self.load_config())
        try:
            with anyio.fail_after(timeout):
                while not in_state(reader, job_id, states):  # quick, read-only
                    await anyio.sleep(0.02)  # polling interval, not synchronisation
        finally:
            reader.close()
        return await self.details(job_id)

    async def jobs(self) -> list[dict[str, Any]]:
        """The jobs as `archived jobs --json` lists them."""
        store = await open_store(self.load_config(), create=False)
        if store is None:
            return []
        try:
            return json.loads(json.dumps([j.to_json() for j in await store.jobs(None)]))  # type: ignore[no-any-return]
        finally:
            await store.close()

    # -- from outside ------------------------------------------------------------------

    def show(self, job_id: str, timeout: float = 30) -> dict[str, Any]:
        """The job as `archived show --json` prints it, once the daemon has taken it
        from the spool (a test asks right after submitting it)."""
        return self.wait_state(job_id, *State, timeout=timeout)

    def wait_state(self, job_id: str, *states: str, timeout: float = 60) -> dict[str, Any]:
        """Polls the queue read-only (SQLite `mode=ro`; one PostgreSQL connection) until
        the job is in one of `states`; then the job as `show` has it."""
        reader = open_state_reader(self.load_config())

        def reached() -> dict[str, Any] | None:
            if not in_state(reader, job_id, states):
                return None
            job = anyio.run(self.details, job_id)
            return job if job["state"] in states else None  # it may have moved on

        try:
            return wait_until(reached, timeout, f"job {job_id} in {states}")  # type: ignore[no-any-return]
        finally:
            reader.close()

    def archives(self, target: str) -> list[Path]:
        return sorted(self.targets[target].rglob("*.tar"))

    def staging_leftovers(self) -> list[Path]:
        """What staging holds besides `end.tar`, which every archive shares."""
        staging = self.state_dir / "staging"
        found = sorted(staging.iterdir()) if staging.exists() else []
        return [p for p in found if p.name != "end.tar"]

    def all_target_files(self) -> list[Path]:
        return sorted(p for t in self.targets.values() for p in t.rglob("*") if p.is_file())


def in_state(reader: StateReader, job_id: str, states: tuple[str, ...]) -> bool:
    try:
        found = reader.peek([job_id]).get(job_id)
    except StoreUnavailable:
        return False
    return found is not None and found[0].state in states


class Daemon:
    def __init__(self, root: Root, env: dict[str, str], umask: int = -1) -> None:
        self.root = root
        self.env = env
        self.umask = umask
        self.log_path = root.path / f"daemon-{len(root.daemons)}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> None:
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        env.update(self.env)
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "archived", "run", "--config", str(self.root.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            umask=self.umask,
        )
        if wait_ready:
            wait_until(
                lambda: (
                    self.proc is not None
                    and (
                        self.proc.poll() is not None
                        or any(e.get("event") == "ready" for e in self.events())
                    )
                ),
                30,
                "daemon ready",
            )
            assert self.proc.poll() is None, f"daemon exited early:\n{self.log_text()}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return lines

    def send(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._log.close()
        return code


@pytest.fixture
def root(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Root]:
    """A fresh installation; its queue in SQLite, or in PostgreSQL when the test is
    parametrized with `both_backends` (or `root` set to "postgres" indirectly)."""
    keys = tmp_path / "keys"
    keys.mkdir()
    secret, public = minisign_keypair(keys)
    sources = tmp_path / "sources"
    (sources / "a" / "sub").mkdir(parents=True)
    (sources / "a" / "hello.txt").write_text("hello\n")
    (sources / "a" / "sub" / "data.bin").write_bytes(os.urandom(300_000))
    targets = {"primary": tmp_path / "t1", "offsite": tmp_path / "t2"}
    for t in targets.values():
        t.mkdir()
    r = Root(tmp_path, tmp_path / "archived.toml", sources, targets, secret, public)
    if getattr(request, "param", "sqlite") == "postgres":
        r.queue = {"url": request.getfixturevalue("pg_url"), "lease": "2s"}
    r.write_config()
    yield r
    for daemon in r.daemons:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()


# -- the layers: a test that is not marked slow spawns neither the daemon nor the CLI ---


def spawns_archived(args: Any) -> bool:
    """Whether a command line runs archived: `python -m archived...` or the script."""
    if isinstance(args, str | bytes | os.PathLike):
        args = [args]
    words = [os.fsdecode(a) for a in args]
    if len(words) == 1:
        words = words[0].split()  # a shell line, or one program
    if not words:
        return False
    after_m = [b for a, b in itertools.pairwise(words) if a == "-m"]
    return Path(words[0]).name == "archived" or any(
        m == "archived" or m.startswith("archived.") for m in after_m
    )


class _FastLayerPopen(subprocess.Popen):  # type: ignore[type-arg]
    def __init__(self, args: Any, *rest: Any, **kw: Any) -> None:
        if spawns_archived(args):
            pytest.fail(
                f"this test is not marked slow but spawns archived: {args!r}; run it in "
                "process (root.run_until_idle) or mark it @pytest.mark.slow",
                pytrace=False,
            )
        super().__init__(args, *rest, **kw)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    if item.get_closest_marker("slow") is not None:
        return (yield)
    real = subprocess.Popen
    subprocess.Popen = _FastLayerPopen  # type: ignore[misc]
    try:
        return (yield)
    finally:
        subprocess.Popen = real  # type: ignore[misc]


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """A test that configures logging (the CLI's `run`, in process) leaves it as found:
    loggers cached by that config would escape `capture_logs` in the next test."""
    yield
    structlog.reset_defaults()


class Failpoints:
    """ARCHIVED_FAILPOINTS for the daemon in this process; and `at(name, fn)`: call `fn`
    once when the job reaches that failpoint (what a test does to staging meanwhile)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from archived import failpoints

        self._module, self._monkeypatch = failpoints, monkeypatch
        self._calls: dict[str, Callable[[], Any]] = {}
        reach = failpoints.reach

        async def reach_and_call(name: str) -> None:
            if (fn := self._calls.pop(name, None)) is not None:
                await anyio.to_thread.run_sync(fn)
            await reach(name)

        monkeypatch.setattr(failpoints, "reach", reach_and_call)

    def set(self, spec: str) -> None:
        self._monkeypatch.setattr(self._module, "_points", self._module.parse(spec))

    def at(self, name: str, fn: Callable[[], Any]) -> None:
        self._calls[name] = fn


@pytest.fixture
def failpoints(monkeypatch: pytest.MonkeyPatch) -> Failpoints:
    return Failpoints(monkeypatch)


# -- a fake activity driver, registered through an entry point as a plugin's is ---------

FAKE_DIST = """\
Metadata-Version: 2.1
Name: archived-fake-activity
Version: 1
"""


@pytest.fixture
def fake_activity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[type]:
    """The activity driver `fake` (fake_driver.py), found through the entry point group
    `archived.activity_drivers` of an installed distribution, as a plugin driver is.
    Its `runs` count calls by activity name, for this test."""
    import fake_driver

    from archived import drivers

    site = tmp_path / "site"
    dist = site / "archived_fake_activity-1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(FAKE_DIST)
    (dist / "entry_points.txt").write_text(
        "[archived.activity_drivers]\nfake = fake_driver:FakeActivity\n"
    )
    monkeypatch.syspath_prepend(str(site))
    drivers._plugins.cache_clear()
    fake_driver.FakeActivity.runs.clear()
    yield fake_driver.FakeActivity
    drivers._plugins.cache_clear()


def tar_members(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        return tar.getnames()


@pytest.fixture
def small_fs(root: Root) -> Iterator[Callable[..., Path]]:
    """`small_fs(path, size="64k")` mounts a tmpfs of that size at `path`: a file system
    that fills up, which `remount(path, size)` grows. Skips where mounting is not allowed."""
    mounts: list[Path] = []

    def mount(path: Path, size: str = "64k") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            timeout=10,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounts.append(path)
        return path

    yield mount
    for daemon in root.daemons:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()
    for path in reversed(mounts):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def remount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, timeout=10)


# -- PostgreSQL: one cluster for the session, a fresh database per test -------------------

both_backends = pytest.mark.parametrize("root", ["sqlite", "postgres"], indirect=True)


def postgres_bin() -> Path:
    """Debian keeps the server's programs under /usr/lib/postgresql/<major>/bin."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = found[-1] if found else shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL is not installed (initdb): run scripts/bootstrap")
    return Path(initdb).parent


@dataclass
class PgCluster:
    socket_dir: Path
    databases: int = 0

    def url(self, database: str) -> str:
        return f"postgresql://archived@/{database}?host={self.socket_dir}"

    def new_database(self) -> str:
        import psycopg

        self.databases += 1
        name = f"test{self.databases}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """initdb and pg_ctl in a temporary directory, on a unix socket only. initdb refuses
    to run as root: then the `postgres` user runs the server, in a directory it owns
    (pytest's own temporary directories are root's alone)."""
    bindir = postgres_bin()
    base = Path(tempfile.mkdtemp(prefix="archived-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    data, log = base / "data", base / "server.log"

    def pg(*argv: str) -> None:
        subprocess.run([*run_as, *argv], check=True, capture_output=True, timeout=60)

    pg(
        str(bindir / "initdb"),
        "-D",
        str(data),
        "-A",
        "trust",
        "-U",
        "archived",
        "--no-sync",
        "-E",
        "UTF8",
    )
    pg(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        f"-k {base} -c listen_addresses= -c fsync=off -c max_connections=200",
        "-l",
        str(log),
        "-w",
        "start",
    )
    try:
        yield PgCluster(base)
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A libpq URI of a fresh, empty database."""
    return pg_cluster.new_database()
