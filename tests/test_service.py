"""Running as a service: sd_notify, watchdog, SIGHUP reload, metrics, the unit file."""

from __future__ import annotations

import fcntl
import os
import pty
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Root, minisign_keypair, run_cli, wait_until
from prometheus_client.parser import text_string_to_metric_families

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "archived.service"


class NotifySocket:
    """A real datagram socket bound where the daemon's NOTIFY_SOCKET points."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="nfy", dir="/tmp")  # sun_path is short
        self.path = os.path.join(self.dir, "s")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return self.messages
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def wait_for(
        self, key: str, value: str | None = None, after: int = 0, timeout: float = 30
    ) -> int:
        """Index of the first message at or after `after` that has KEY(=VALUE)."""

        def found() -> int | None:
            for i, message in enumerate(self.drain()[after:], after):
                if key in message and (value is None or message[key] == value):
                    return i + 1  # so 0 never reads as "not found"
            return None

        return wait_until(found, timeout, f"notify {key}={value}") - 1  # type: ignore[no-any-return]

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


@pytest.mark.slow
def test_notify_sequence_start_reload_rejected_reload_stop(
    root: Root, notify: NotifySocket
) -> None:
    daemon = root.start(env={"NOTIFY_SOCKET": notify.path})
    ready = notify.wait_for("READY", "1")
    assert "processing" in notify.messages[ready]["STATUS"]
    assert not any("RELOADING" in m or "STOPPING" in m for m in notify.messages[:ready])

    daemon.send(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", "1", after=ready + 1)
    usec = int(notify.messages[reloading]["MONOTONIC_USEC"])
    assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 30_000_000
    ready2 = notify.wait_for("READY", "1", after=reloading + 1)
    assert "last reload: ok" in notify.messages[ready2]["STATUS"]

    good = root.config.read_text()
    root.config.write_text(good + "\n[daemon.oops]\n")
    daemon.send(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", "1", after=ready2 + 1)
    ready3 = notify.wait_for("READY", "1", after=reloading + 1)
    assert "rejected" in notify.messages[ready3]["STATUS"]
    assert any(e.get("event", "").startswith("reload rejected") for e in daemon.events())

    assert daemon.stop(signal.SIGTERM) == 0
    stopping = notify.wait_for("STOPPING", "1", after=ready3 + 1)
    assert stopping > ready3


@pytest.mark.slow
def test_watchdog_pings_while_alive(root: Root, notify: NotifySocket) -> None:
    root.start(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"})
    first = notify.wait_for("WATCHDOG", "1")
    second = notify.wait_for("WATCHDOG", "1", after=first + 1)
    third = notify.wait_for("WATCHDOG", "1", after=second + 1, timeout=2)
    assert first < second < third


@pytest.mark.slow
def test_watchdog_stops_when_the_loop_is_stopped(root: Root, notify: NotifySocket) -> None:
    daemon = root.start(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"})
    notify.wait_for("WATCHDOG", "1")
    daemon.send(signal.SIGSTOP)  # a hung process: no pings may come
    try:
        notify.drain()
        count = len(notify.messages)
        time.sleep(1.0)  # the interval under test: several watchdog periods
        assert len(notify.drain()) == count
    finally:
        daemon.send(signal.SIGCONT)
    notify.wait_for("WATCHDOG", "1", after=count)


@pytest.mark.slow
def test_no_notify_socket_means_no_messages(root: Root) -> None:
    daemon = root.start()
    (job_id,) = root.submit(root.job_file("quiet"))
    assert root.wait_state(job_id, "completed")["state"] == "completed"
    assert daemon.stop() == 0


@pytest.mark.slow
def test_reload_with_a_new_target_applies_to_new_jobs_only(
    root: Root, notify: NotifySocket
) -> None:
    daemon = root.start(
        env={"NOTIFY_SOCKET": notify.path, "ARCHIVED_FAILPOINTS": "activity_archiving=delay:3"}
    )
    ready = notify.wait_for("READY", "1")
    (old_id,) = root.submit(root.job_file("before"))
    root.wait_state(old_id, "activity_archiving")
    third = root.path / "t3"
    third.mkdir()
    root.targets["third"] = third
    root.write_config()
    daemon.send(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", "1", after=ready + 1)
    notify.wait_for("READY", "1", after=reloading + 1)
    (new_id,) = root.submit(root.job_file("after"))
    old = root.wait_state(old_id, "completed", "failed")
    new = root.wait_state(new_id, "completed", "failed")
    assert sorted(c["target"] for c in old["copies"]) == ["offsite", "primary"]
    assert sorted(c["target"] for c in new["copies"]) == ["offsite", "primary", "third"]
    assert len(list(third.rglob("*.tar"))) == 1


@pytest.mark.slow
def test_a_broken_config_on_reload_keeps_the_old_one(root: Root, notify: NotifySocket) -> None:
    daemon = root.start(env={"NOTIFY_SOCKET": notify.path})
    ready = notify.wait_for("READY", "1")
    good = root.path / "good.toml"
    shutil.copy(root.config, good)
    root.config.write_text(root.config.read_text().replace("[sources]", "[sauces]"))
    assert root.cli("check-config").returncode == 78
    daemon.send(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", "1", after=ready + 1)
    back = notify.wait_for("READY", "1", after=reloading + 1)
    assert "sauces: unknown key" in notify.messages[back]["STATUS"]
    # a job dropped into the spool still runs, on the old config
    job = root.job_file("still-works")
    shutil.copy(job, root.spool / "tmp" / "cron.json")
    os.rename(root.spool / "tmp" / "cron.json", root.spool / "incoming" / "cron.json")

    def completed() -> bool:
        listed = run_cli("jobs", "--json", config=good)
        return '"completed"' in listed.stdout

    wait_until(completed, 30, "job on the old config")
    assert daemon.proc is not None and daemon.proc.poll() is None


@pytest.mark.slow
def test_a_reload_to_an_unusable_target_is_rejected(root: Root, notify: NotifySocket) -> None:
    daemon = root.start(env={"NOTIFY_SOCKET": notify.path})
    ready = notify.wait_for("READY", "1")
    root.targets["gone"] = root.path / "a-file"  # a missing one may be an unmounted disk
    root.targets["gone"].write_text("not a directory\n")
    root.write_config()
    daemon.send(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", "1", after=ready + 1)
    back = notify.wait_for("READY", "1", after=reloading + 1)
    assert "rejected" in notify.messages[back]["STATUS"]
    assert "storage.gone" in notify.messages[back]["STATUS"]
    del root.targets["gone"]
    root.write_config()
    (job_id,) = root.submit(root.job_file("unaffected"))
    job = root.wait_state(job_id, "completed")
    assert sorted(c["target"] for c in job["copies"]) == ["offsite", "primary"]


@pytest.mark.slow
def test_metrics_textfile_parses(root: Root) -> None:
    prom = root.path / "archived.prom"
    yearly = {  # appears now, fires next New Year: no job in this test
        "cron": "0 0 1 1 *",
        "job": {
            "name": "y",
            "activities": [{"name": "a", "driver": "files", "path": str(root.sources)}],
        },
    }
    root.write_config(
        metrics={"textfile": str(prom), "interval": "200ms"}, schedules__yearly=yearly
    )
    root.start(env={"ARCHIVED_FAILPOINTS": "store=transient:1"}, umask=0o027)  # as the unit
    (job_id,) = root.submit(root.job_file("measured"))
    root.wait_state(job_id, "completed")

    def sample(name: str, **labels: str) -> float | None:
        if not prom.exists():
            return None
        for family in text_string_to_metric_families(prom.read_text()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return None

    wait_until(lambda: sample("archived_jobs", state="completed") == 1, 10, "metrics")
    assert sample("archived_retries_total") == 1
    assert sample("archived_failures_total") == 0
    assert sample("archived_transitions_total", state="completed") == 1
    for entered_once in ("uninitialized", "queued", "activity_archiving", "post_processing"):
        assert sample("archived_transitions_total", state=entered_once) == 1, entered_once
    assert sample("archived_bytes_archived_total") == 300_006
    assert (sample("archived_phase_duration_seconds_count", state="store") or 0) >= 2
    assert not list(root.path.glob(".archived.prom*"))  # written by rename, no leftovers
    assert prom.stat().st_mode & 0o777 == 0o644  # node_exporter runs as another user
    # what the alert rules in contrib/prometheus need
    assert sample("archived_queue_depth") == 0
    assert sample("archived_queue_oldest_seconds") == 0
    assert sample("archived_schedule_period_seconds", schedule="yearly") == 366 * 86400
    first_seen = sample("archived_schedule_first_seen_timestamp_seconds", schedule="yearly")
    assert first_seen is not None and abs(time.time() - first_seen) < 120
    assert sample("archived_schedule_last_success_timestamp_seconds", schedule="yearly") is None
    written = sample("archived_metrics_written_timestamp_seconds")
    assert written is not None and abs(time.time() - written) < 60


@pytest.mark.slow
def test_a_group_readable_signing_key_is_refused(root: Root) -> None:
    root.secret_key.chmod(0o640)
    result = root.cli("check-config")
    assert result.returncode == 78
    assert "readable by group or others" in result.stderr
    run = root.cli("run", timeout=30)
    assert run.returncode == 78


@pytest.mark.slow
def test_the_signing_key_comes_from_credentials_directory(root: Root, tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    secret, public = minisign_keypair(tmp_path, "cred")
    shutil.copy(secret, creds / "signing.key")
    (creds / "signing.key").chmod(0o400)
    root.start(env={"CREDENTIALS_DIRECTORY": str(creds)})
    (job_id,) = root.submit(root.job_file("credentialed"))
    root.wait_state(job_id, "completed")
    archive = root.archives("primary")[0]
    assert root.cli("verify", "--key", str(public), str(archive)).returncode == 0
    assert root.cli("verify", "--key", str(root.public_key), str(archive)).returncode == 1


def _unit_for_verify(tmp_path: Path) -> Path:
    """The unit with its binary paths pointing at what exists on this machine."""
    exe = shutil.which("archived") or str(Path(sys.executable).parent / "archived")
    unit = tmp_path / "archived.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/archived", exe))
    return unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_file_verifies_and_is_hardened(tmp_path: Path) -> None:
    unit = _unit_for_verify(tmp_path)
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert security.returncode == 0, security.stdout[-2000:]
    exposure = float(
        security.stdout.split("Overall exposure level for archived.service:")[1].split()[0]
    )
    assert exposure <= 2.0
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "RestartPreventExitStatus=78",
        "ExecReload=/usr/bin/archived check-config",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LoadCredential=signing.key:",
        "Restart=on-failure",
    ):
        assert line in text


class OnTerminal:
    """`archived submit --wait` with its stderr on a terminal (a pty), read as it goes."""

    def __init__(self, root: Root, job_file: Path) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
        argv = ["submit", "--wait", "--config", str(root.config), str(job_file)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "archived", *argv], stdout=subprocess.PIPE, stderr=slave
        )
        os.close(slave)
        assert self.proc.stdout is not None
        self.job_id = self.proc.stdout.readline().decode().strip()
        self.master, self.seen = master, b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: the other side is closed
                return
            if not data:
                return
            self.seen += data

    def finish(self) -> tuple[int, str, str]:
        code = self.proc.wait(60)
        self.reader.join(10)
        os.close(self.master)
        assert self.proc.stdout is not None
        return code, self.proc.stdout.read().decode(), self.seen.decode()


@pytest.mark.slow
def test_operator_view_of_a_running_and_a_finished_job(root: Root) -> None:
    root.start(env={"ARCHIVED_FAILPOINTS": "activity_task=delay:5,store=delay:3"})
    waiting = OnTerminal(root, root.job_file("watched"))
    job_id = waiting.job_id
    root.wait_state(job_id, "activity_archiving")

    def running_view() -> str | None:
        out = root.cli("show", job_id).stdout
        return out if "executing" in out and "so far" in out else None

    out = wait_until(running_view, 10, "progress of the running task")
    assert "state    activity_archiving for" in out
    assert "activity  a" in out
    assert "  0 of 2 files, 0 B of 293.0 KiB (0%) so far" in out  # totals known at once
    assert "  progress activity_archiving  0 of 2 files, 0 B of 293.0 KiB (0%), 0 B/s, 0:0" in out
    listing = root.cli("jobs").stdout.splitlines()
    assert listing[0].split() == ["ID", "STATE", "AGE", "UPDATED", "NAME"]
    assert listing[1].split()[:2] == [job_id, "activity_archiving"]
    root.wait_state(job_id, "store")  # sealed, its sha256 not yet known
    storing = root.cli("show", job_id).stdout
    assert "archive  watched-" in storing and "None" not in storing, storing
    root.wait_state(job_id, "completed")
    done = root.cli("show", job_id).stdout
    assert "2 files, 300006 bytes" in done
    assert "copies" in done and "primary" in done
    assert "progress" not in done

    code, stdout, screen = waiting.finish()
    assert (code, stdout) == (0, "")
    # one line for the job, redrawn in place (up, clear, the line again) as it moves on
    frames = screen.split("\x1b[1A\r\x1b[J")
    assert all(frame.endswith("\r\n") and frame.count("\n") == 1 for frame in frames)
    assert any(
        frame.startswith(f"{job_id}  activity_archiving  0 of 2 files, 0 B of 293.0 KiB (0%)")
        for frame in frames
    )
    stored = f"{job_id}  store  2 files, 293.0 KiB, stored on 0 of 2 targets, 0:"
    assert any(frame.startswith(stored) for frame in frames)
    assert frames[-1].startswith(f"{job_id}  completed  2 files, 293.0 KiB, 0:")


@pytest.mark.slow
def test_a_second_signal_exits_at_once_and_the_next_start_resumes(root: Root) -> None:
    root.write_config(daemon={"shutdown_grace": "60s"})
    daemon = root.start(env={"ARCHIVED_FAILPOINTS": "activity_task=delay:60"})
    (job_id,) = root.submit(root.job_file("twice"))
    root.wait_state(job_id, "activity_archiving")
    daemon.send(signal.SIGTERM)
    wait_until(
        lambda: any(e.get("event") == "stopping: no new work" for e in daemon.events()),
        10,
        "first signal seen",
    )
    assert daemon.proc is not None and daemon.proc.poll() is None  # still in its grace
    started = time.monotonic()
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit(10) == 128 + signal.SIGTERM  # not 0: work was abandoned
    assert time.monotonic() - started < 5
    root.start()
    assert root.wait_state(job_id, "completed")["state"] == "completed"
