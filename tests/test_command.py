"""Activity driver `command` with real programs, through the daemon in process; and a
real pg_dump (slow)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Root

# a sleep no other process on the machine runs: the orphan check below looks for exactly it
HANG = f"60.{os.getpid()}"


def command_job(root: Root, name: str, command: str, **extra: object) -> Path:
    return root.job_file(
        name, activities=[{"name": "dump", "driver": "command", "command": command, **extra}]
    )


def member_bytes(archive: Path, suffix: str) -> bytes:
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
        f = tar.extractfile(member)
        assert f is not None
        return f.read()


@pytest.fixture
def commands(root: Root, monkeypatch: pytest.MonkeyPatch) -> Root:
    flag = root.path / "flaky.flag"
    root.write_config(
        retry={"max_attempts": 2, "backoff": "50ms", "backoff_max": "100ms"},
        commands__dump={
            "argv": ["/bin/sh", "-c", "printf 'row1\\nrow2\\n'; echo note >&2", "dump"],
            "allowed_args": ["--table=*"],
        },
        commands__args={
            "argv": ["/bin/sh", "-c", 'printf "%s\\n" "$@"', "args"],
            "allowed_args": ["--table=*"],
        },
        commands__fail={"argv": ["/bin/sh", "-c", "echo 'FATAL: no such database' >&2; exit 3"]},
        commands__flaky={
            "argv": [
                "/bin/sh",
                "-c",
                f"if [ -e {flag} ]; then echo fine; else touch {flag}; "
                "echo 'try later' >&2; exit 75; fi",
            ],
            "transient_exit_codes": [75],
        },
        commands__hang={"argv": ["/bin/sh", "-c", f"sleep {HANG}"], "timeout": "1s"},
        commands__silent={"argv": ["/bin/true"]},
        commands__big={"argv": ["/bin/sh", "-c", "head -c 50000000 /dev/urandom"]},
        commands__env={
            "argv": ["/bin/sh", "-c", 'echo "$GREETING ${SECRET:-unset}"'],
            "env": {"GREETING": "hello"},
        },
    )
    monkeypatch.setenv("SECRET", "from-the-daemons-environment")
    return root


async def run_job(root: Root, job: Path) -> dict[str, Any]:
    """The job through the daemon (in process), as `show` has it then."""
    (job_id,) = root.drop(job)
    await root.run_until_idle()
    return await root.details(job_id)


async def test_stdout_becomes_the_artifact_and_stderr_the_event_log(commands: Root) -> None:
    job = await run_job(commands, command_job(commands, "dumped", "dump", output="grades.txt"))
    assert job["state"] == "completed", job
    archive = commands.archives("primary")[0]
    assert member_bytes(archive, "/data/dump/grades.txt") == b"row1\nrow2\n"
    events = member_bytes(archive, "/archived-events.jsonl").decode()
    assert "stderr" in events and "note" in events
    assert await commands.command("verify", "--key", str(commands.public_key), str(archive)) == 0


async def test_allowed_args_are_passed_and_others_refused(
    commands: Root, capsys: pytest.CaptureFixture[str]
) -> None:
    job = await run_job(commands, command_job(commands, "withargs", "args", args=["--table=exams"]))
    assert job["state"] == "completed", job
    archive = commands.archives("primary")[0]
    assert member_bytes(archive, "/data/dump/args.out") == b"--table=exams\n"
    capsys.readouterr()
    evil = command_job(commands, "evil", "args", args=["; rm -rf /"])
    assert await commands.command("submit", str(evil)) == 2
    assert "is not allowed for command 'args'" in capsys.readouterr().err
    assert await commands.command("submit", str(command_job(commands, "nope", "rm"))) == 2
    assert "unknown command 'rm'" in capsys.readouterr().err


async def test_a_clean_environment_plus_the_configured_env(commands: Root) -> None:
    job = await run_job(commands, command_job(commands, "env", "env"))
    assert job["state"] == "completed", job
    out = member_bytes(commands.archives("primary")[0], "/data/dump/env.out")
    assert out == b"hello unset\n"  # the daemon's own SECRET does not leak in


async def test_a_failing_command_fails_the_job_with_its_message(commands: Root) -> None:
    job = await run_job(commands, command_job(commands, "failing", "fail"))
    assert job["state"] == "failed"
    assert "exited with 3: FATAL: no such database" in job["error"]
    assert [h["state"] for h in job["history"]].count("recoverable_error") == 0
    assert commands.all_target_files() == []


async def test_a_transient_exit_code_is_retried(commands: Root) -> None:
    job = await run_job(commands, command_job(commands, "flaky", "flaky"))
    assert job["state"] == "completed", job
    assert [h["state"] for h in job["history"]].count("recoverable_error") == 1
    assert member_bytes(commands.archives("primary")[0], "/data/dump/flaky.out") == b"fine\n"


async def test_a_hanging_command_is_killed_at_its_timeout(commands: Root) -> None:
    job = await run_job(commands, command_job(commands, "hanging", "hang"))
    assert job["state"] == "failed"
    assert "timed out after 1s" in job["error"]
    assert [h["state"] for h in job["history"]].count("recoverable_error") == 1
    orphans = subprocess.run(["pgrep", "-fx", f"sleep {HANG}"], capture_output=True, text=True)
    assert orphans.stdout.strip() == ""


async def test_a_command_that_prints_nothing_is_an_error(commands: Root) -> None:
    job = await run_job(commands, command_job(commands, "silent", "silent"))
    assert job["state"] == "failed"
    assert "printed nothing" in job["error"]


async def test_large_output_is_streamed_and_hashed(commands: Root) -> None:
    job = await run_job(commands, command_job(commands, "big", "big", output="random.bin"))
    assert job["state"] == "completed", job
    archive = commands.archives("primary")[0]
    data = member_bytes(archive, "/data/dump/random.bin")
    assert len(data) == 50_000_000
    manifest = member_bytes(archive, "/manifest-sha256.txt").decode()
    assert f"{hashlib.sha256(data).hexdigest()}  data/dump/random.bin" in manifest


# -- a real pg_dump of a throwaway PostgreSQL cluster ---------------------------------------


@pytest.fixture
def postgres() -> Iterator[tuple[str, int]]:
    initdb = shutil.which("initdb") or next(
        (str(p) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None
    )
    if not initdb or os.geteuid() != 0 or shutil.which("pg_dump") is None:
        pytest.skip("needs PostgreSQL's initdb and pg_dump, and root to run them as postgres")
    bindir = Path(os.path.realpath(initdb)).parent
    base = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
    base.chmod(0o755)
    shutil.chown(base, "postgres", "postgres")
    data, sock, port = base / "data", str(base), 54329

    def as_pg(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )

    as_pg(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    as_pg(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-w",
        "-o",
        f"-k {sock} -p {port} -c listen_addresses=''",
        "-l",
        str(base / "log"),
        "start",
    )
    try:
        as_pg("psql", "-h", sock, "-p", str(port), "-U", "postgres", "-c", "CREATE DATABASE exams")
        as_pg(
            "psql",
            "-h",
            sock,
            "-p",
            str(port),
            "-U",
            "postgres",
            "-d",
            "exams",
            "-c",
            "CREATE TABLE grades (student text, grade int); "
            "INSERT INTO grades VALUES ('ada', 1), ('alan', 2);",
        )
        yield sock, port
    finally:
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_pg_dump_of_a_real_database(root: Root, postgres: tuple[str, int]) -> None:
    sock, port = postgres
    root.write_config(
        commands__pgdump={
            "argv": [
                "pg_dump",
                "-h",
                sock,
                "-p",
                str(port),
                "-U",
                "postgres",
                "--format=custom",
                "exams",
            ],
            "timeout": "2m",
        }
    )
    root.start()
    (job_id,) = root.submit(command_job(root, "exams", "pgdump", output="exams.dump"))
    job = root.wait_state(job_id, "completed", "failed", timeout=120)
    assert job["state"] == "completed", job
    dump = root.path / "exams.dump"
    dump.write_bytes(member_bytes(root.archives("primary")[0], "/data/dump/exams.dump"))
    listing = subprocess.run(
        ["pg_restore", "--list", str(dump)], capture_output=True, text=True, timeout=60, check=True
    )
    assert "TABLE DATA public grades" in listing.stdout
