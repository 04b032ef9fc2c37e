"""The command line outside the daemon: config checks, keygen, usage errors, the demo."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Root, run_cli, wait_until

from archived.cli import main


@pytest.mark.slow
def test_check_config_accepts_a_good_config(root: Root) -> None:
    result = root.cli("check-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok:")


BAD_CONFIGS = {
    "unknown key": ("[daemon]\nstate_dirr = '/x'\n", "daemon.state_dirr: unknown key"),
    "not toml": ("[daemon\n", "not valid TOML"),
    "bad duration": ("[daemon]\npoll_interval = 'soon'\n", "daemon.poll_interval"),
    "wrong type": ("[limits]\nhash_threads = '2'\n", "limits.hash_threads"),
    "zero": ("[retry]\nmax_attempts = 0\n", "retry.max_attempts"),
    "unknown driver": ("[storage.x]\ndriver = 'tape'\n", "unknown storage driver 'tape'"),
    "driver option": (
        "[storage.x]\ndriver = 'localdir'\npath = '/x'\nfoo = 1\n",
        "storage.x.foo: unknown key",
    ),
    "no targets": ("[daemon]\npoll_interval = '1s'\n", "at least one [storage.NAME]"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_check_config_exits_78_with_one_line(tmp_path: Path, case: str) -> None:
    text, expected = BAD_CONFIGS[case]
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = run_cli("check-config", config=config)
    assert result.returncode == 78
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def check_config(root: Root, capsys: pytest.CaptureFixture[str], **overrides: Any) -> list[str]:
    """`archived check-config` in this process (pure config logic: no daemon needed);
    the exit code, then stderr's lines."""
    root.write_config(**overrides)
    code = main(["check-config", "--config", str(root.config)])
    return [str(code), *capsys.readouterr().err.splitlines()]


def refusals(root: Root) -> dict[str, tuple[dict[str, Any], str]]:
    p, t1 = root.path, str(root.targets["primary"])
    for there in (root.targets["primary"] / "inner", root.sources / "archive", root.state_dir):
        there.mkdir(parents=True, exist_ok=True)
    (root.state_dir / "archive").mkdir(exist_ok=True)
    return {
        "same directory": (
            {"storage__offsite": {"path": t1}},
            f"storage.primary: {t1} is the directory of storage.offsite ({t1})",
        ),
        "nested targets": (
            {"storage__offsite": {"path": f"{t1}/inner"}},
            f"storage.offsite: {t1}/inner is inside storage.primary ({t1})",
        ),
        "target in a source root": (
            {"storage__offsite": {"path": str(root.sources / "archive")}},
            "is inside sources.allowed_roots",
        ),
        "target in the state dir": (
            {"storage__offsite": {"path": str(root.state_dir / "archive")}},
            "is inside daemon.state_dir",
        ),
        "spool in a target": (
            {"daemon": {"spool_dir": f"{t1}/spool"}},
            "storage.primary: " + t1 + " contains daemon.spool_dir",
        ),
        "spool is the state dir": (
            {"daemon": {"spool_dir": str(root.state_dir)}},
            "daemon.spool_dir: the same directory as daemon.state_dir",
        ),
        "zero poll interval": (
            {"daemon": {"poll_interval": "0s"}},
            "daemon.poll_interval: Value error, must be between",
        ),
        "absurd job timeout": (
            {"daemon": {"job_timeout": "100000d"}},
            "daemon.job_timeout: Value error, must be between",
        ),
        "zero command timeout": (
            {"commands__dump": {"argv": ["/bin/sh"], "timeout": 0}},
            "commands.dump.timeout: Value error, must be between",
        ),
        "absurd backoff": ({"retry": {"backoff": 1e300}}, "retry.backoff: Value error, must"),
        "backoff_max below backoff": (
            {"retry": {"backoff": "1m", "backoff_max": "10s"}},
            "retry: Value error, backoff_max (10s) is less than backoff (1m)",
        ),
        "zero retention check": (
            {"retention": {"check_interval": "0"}},
            "retention.check_interval: Value error, must be between 10ms and 1d",
        ),
        "command not on PATH": (
            {"commands__dump": {"argv": ["archived-no-such-program"]}},
            "commands.dump.argv: 'archived-no-such-program' is not an executable on PATH",
        ),
        "command not on its own PATH": (
            {"commands__dump": {"argv": ["sh"], "env": {"PATH": str(p / "empty-bin")}}},
            f"commands.dump.argv: 'sh' is not an executable on PATH {p / 'empty-bin'}",
        ),
        "command path not executable": (
            {"commands__dump": {"argv": [str(root.config)]}},
            f"commands.dump.argv: {str(root.config)!r} is not an executable",
        ),
        "hook not there": (
            {"hooks": {"on_failure": [str(p / "notify-me")]}},
            "hooks.on_failure: ",
        ),
        "target name": (
            {'storage__"off site"': {"driver": "localdir", "path": t1}},
            'storage."off site": a target name',
        ),
        "dots only": (
            {'storage__".."': {"driver": "localdir", "path": t1}},
            'storage."..": a target name',
        ),
    }


REFUSALS = [
    "same directory",
    "nested targets",
    "target in a source root",
    "target in the state dir",
    "spool in a target",
    "spool is the state dir",
    "zero poll interval",
    "absurd job timeout",
    "zero command timeout",
    "absurd backoff",
    "backoff_max below backoff",
    "zero retention check",
    "command not on PATH",
    "command not on its own PATH",
    "command path not executable",
    "hook not there",
    "target name",
    "dots only",
]


@pytest.mark.parametrize("case", REFUSALS)
def test_check_config_refuses_a_config_that_cannot_work(
    root: Root, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    overrides, expected = refusals(root)[case]
    code, *lines = check_config(root, capsys, **overrides)
    assert code == "78", lines
    assert len(lines) == 1, lines
    assert expected in lines[0], lines
    assert lines[0].startswith("archived: config error: ")


def test_check_config_names_every_problem_on_its_own_line(
    root: Root, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = refusals(root)
    overrides: dict[str, dict[str, Any]] = {}
    for case in ("nested targets", "spool is the state dir", "command not on PATH"):
        for table, values in cases[case][0].items():
            overrides.setdefault(table, {}).update(values)
    code, *lines = check_config(root, capsys, **overrides)
    assert code == "78"
    assert len(lines) == 3, lines
    for case, line in zip(
        ("nested targets", "spool is the state dir", "command not on PATH"),
        sorted(lines, key=lambda line: ("storage" not in line, "daemon" not in line)),
        strict=True,
    ):
        assert cases[case][1] in line, (case, lines)
    two_schema_errors = check_config(
        root, capsys, daemon={"poll_interval": "0s", "job_timeout": "0s"}
    )
    assert two_schema_errors[0] == "78" and len(two_schema_errors) == 3, two_schema_errors


@pytest.mark.slow
def test_check_config_warns_of_a_missing_target_and_refuses_a_file_or_a_missing_key(
    root: Root,
) -> None:
    root.targets["primary"].rmdir()  # an unmounted disk: jobs wait for it, not a config error
    result = root.cli("check-config")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"archived: warning: storage.primary: {root.targets['primary']}: No such file or "
        "directory (not mounted?); jobs that store there wait for it"
    ]
    root.targets["primary"].write_text("not a directory\n")
    result = root.cli("check-config")
    assert result.returncode == 78 and "is not a directory" in result.stderr
    root.targets["primary"].unlink()
    root.targets["primary"].mkdir()
    root.secret_key.unlink()
    result = root.cli("check-config")
    assert result.returncode == 78 and "signing.key" in result.stderr


@pytest.mark.slow
def test_run_refuses_a_bad_config_with_78(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[nonsense]\n")
    result = run_cli("run", config=config, timeout=30)
    assert result.returncode == 78
    assert "nonsense: unknown key" in result.stderr


@pytest.mark.slow
def test_keygen_makes_a_key_pair_minisign_can_use(tmp_path: Path) -> None:
    secret, public = tmp_path / "k.key", tmp_path / "k.pub"
    result = run_cli("keygen", "--secret", str(secret), "--public", str(public))
    assert result.returncode == 0, result.stderr
    assert secret.stat().st_mode & 0o777 == 0o600
    message = tmp_path / "m.txt"
    message.write_text("sign me\n")
    subprocess.run(
        ["minisign", "-S", "-s", str(secret), "-m", str(message)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    subprocess.run(
        ["minisign", "-V", "-p", str(public), "-m", str(message)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    again = run_cli("keygen", "--secret", str(secret), "--public", str(public))
    assert again.returncode == 1 and "exist" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], ["frobnicate"], ["submit"], ["show"], ["jobs", "--bogus"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert run_cli(*args).returncode == 2


@pytest.mark.slow
def test_show_unknown_job_and_jobs_with_unknown_state(root: Root) -> None:
    result = root.cli("show", "nosuchjob")
    assert result.returncode == 1 and "no job 'nosuchjob'" in result.stderr
    result = root.cli("jobs", "--state", "sleeping")
    assert result.returncode == 2 and "unknown state" in result.stderr
    assert json.loads(root.cli("jobs", "--json", check=True).stdout) == []


@pytest.mark.slow
def test_verify_missing_path_and_bad_key(root: Root, tmp_path: Path) -> None:
    result = root.cli("verify", str(tmp_path / "nope.tar"))
    assert result.returncode == 2 and "no such file" in result.stderr
    bad_key = tmp_path / "bad.pub"
    bad_key.write_text("not a key\n")
    result = root.cli("verify", "--key", str(bad_key), str(root.config))
    assert result.returncode == 2 and "--key" in result.stderr


@pytest.mark.slow
def test_second_daemon_on_the_same_state_dir_refuses(root: Root) -> None:
    first = root.start()
    second = root.cli("run", timeout=30)
    assert second.returncode == 1
    assert "another archived daemon is running" in second.stderr
    assert first.proc is not None and first.proc.poll() is None


@pytest.mark.slow  # scripts/demo runs the daemon and the CLI
@pytest.mark.timeout(300)
def test_demo_script_runs_a_job_through_on_the_embedded_default(tmp_path: Path) -> None:
    """The README's first command, on a fresh data folder."""
    project = Path(__file__).resolve().parent.parent
    env = {**os.environ, "ARCHIVED_HOME": str(tmp_path / "home"), "ARCHIVED_DEMO_EXIT": "1"}
    env.pop("ARCHIVED_CONFIG", None)
    result = subprocess.run(
        [str(project / "scripts" / "demo")], capture_output=True, text=True, env=env, timeout=280
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "state    completed" in result.stdout
    assert "\nok: sample-" in result.stdout
    archives = list((tmp_path / "home" / "archive" / "sample").glob("sample-*.tar"))
    assert len(archives) == 1
    assert (tmp_path / "home" / "signing.key").stat().st_mode & 0o777 == 0o600


# -- global options, before or after the subcommand -------------------------------------


@pytest.fixture
def no_home(tmp_path: Path) -> dict[str, str]:
    """An environment whose embedded default would live in the test's own folder."""
    return {"ARCHIVED_HOME": str(tmp_path / "home"), "ARCHIVED_CONFIG": ""}


@pytest.mark.slow
@pytest.mark.parametrize("where", ["before", "after"])
def test_config_and_debug_work_before_or_after_the_subcommand(
    tmp_path: Path, no_home: dict[str, str], where: str
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[nonsense]\n")
    missing = tmp_path / "missing.toml"
    for config, expected in ((bad, "nonsense: unknown key"), (missing, "cannot read config")):
        options = ["--debug", "--config", str(config)]
        args = [*options, "check-config"] if where == "before" else ["check-config", *options]
        result = run_cli(*args, env=no_home)
        assert result.returncode == 78, (args, result.stdout, result.stderr)
        assert expected in result.stderr and str(config) in result.stderr, result.stderr
        assert "Traceback" in result.stderr, "--debug shows the traceback"
        assert "NoneType: None" not in result.stderr
    assert not (tmp_path / "home").exists(), "the embedded default was used"


@pytest.mark.slow
def test_run_with_config_before_the_subcommand_uses_that_config(
    root: Root, no_home: dict[str, str]
) -> None:
    log = root.path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "archived", "--config", str(root.config), "run"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **no_home},
        )
        try:

            def ready() -> dict[str, Any] | None:
                assert proc.poll() is None, log.read_text()
                for line in log.read_text().splitlines():
                    event = json.loads(line) if line.startswith("{") else {}
                    if event.get("event") == "ready":
                        return event
                return None

            event = wait_until(ready, 30, "daemon ready")
        finally:
            proc.terminate()
            proc.wait(30)
    assert event["state_dir"] == str(root.state_dir), event
    assert not (Path(no_home["ARCHIVED_HOME"])).exists(), "the embedded default was used"


# -- submit --wait never hangs silently ---------------------------------------------------


@pytest.mark.slow
def test_submit_wait_says_when_no_daemon_runs_and_each_state_change(root: Root) -> None:
    stuck = root.job_file("stuck", not_before="2999-01-01T00:00:00Z")  # queued for good
    err = root.path / "wait.err"
    argv = ["submit", "--wait", "--config", str(root.config), str(stuck)]
    with open(err, "wb") as stderr:
        waiting = subprocess.Popen(
            [sys.executable, "-m", "archived", *argv], stdout=subprocess.PIPE, stderr=stderr
        )
    try:
        wait_until(lambda: "no daemon is running" in err.read_text(), 15, "said: no daemon")
        assert waiting.poll() is None
        root.start()

        def said_both() -> bool:
            said = err.read_text()
            return "a daemon is running now" in said and ": queued (not before 2999" in said

        wait_until(said_both, 30, "said: a daemon runs, and the job is queued")
        assert waiting.poll() is None, "it said so while still waiting"
    finally:
        waiting.kill()
        waiting.wait(10)

    # --timeout is honoured, whatever it is; one that is no duration submits nothing
    result = root.cli("submit", "--wait", "--timeout", "soon", str(stuck))
    assert result.returncode == 2 and result.stdout == "", result
    assert "--timeout" in result.stderr
    for timeout in ("0", "1s"):
        began = time.monotonic()
        result = root.cli("submit", "--wait", "--timeout", timeout, str(stuck), timeout=30)
        assert result.returncode == 1, result.stderr
        assert "timed out waiting" in result.stderr
        assert time.monotonic() - began < 20


@pytest.mark.slow
def test_submit_wait_timeout_holds_while_the_database_is_locked(root: Root) -> None:
    daemon = root.start()
    (job_id,) = root.submit(root.job_file("done"))
    root.wait_state(job_id, "completed")
    assert daemon.stop() == 0
    locker = sqlite3.connect(root.state_dir / "archived.db", isolation_level=None)
    try:
        locker.execute("PRAGMA locking_mode = EXCLUSIVE")
        locker.execute("BEGIN EXCLUSIVE")
        locker.execute("DELETE FROM schedule_runs")  # a write: the lock is taken now
        began = time.monotonic()
        result = root.cli("submit", "--wait", "--timeout", "2s", str(root.job_file("late")))
        elapsed = time.monotonic() - began
    finally:
        locker.close()
    assert result.returncode == 1, result.stderr
    assert "timed out waiting" in result.stderr, result.stderr
    assert "database is locked" in result.stderr, "said why it cannot see the job"
    assert elapsed < 9, elapsed  # sqlite's own busy timeout is 10 s


@pytest.mark.slow
@pytest.mark.parametrize("command", [["check-config"], ["jobs"], ["jobs", "--json"]])
def test_a_reader_gone_is_sigpipe_not_an_error(root: Root, command: list[str]) -> None:
    """`archived jobs | head -1`: the shell's convention, exit 141 and nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "archived", "--config", str(root.config), *command],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, "")
