"""Programs the daemon starts (a `command` activity, the failure hook) stop at once, with
everything they started: on `archived cancel`, at `job_timeout`, at `hooks.timeout`, on
SIGTERM after `shutdown_grace`, and on a second signal.

Each program is a real shell that starts a real `sleep 3600` in the background, writes
both process ids to a file, and waits; the "stubborn" ones ignore SIGTERM, so only the
SIGKILL that follows the grace stops them. Their timeouts are hours long: the old code
waited for the program's own timeout before killing it.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Root, wait_until

pytestmark = pytest.mark.slow  # the acceptance layer: the daemon and the CLI as processes

HOURS = "2h"


def program(pids: Path, *, stubborn: bool = False) -> list[str]:
    """A shell that starts a grandchild, writes both pids to `pids`, and waits."""
    trap = "trap '' TERM; " if stubborn else ""
    script = f"{trap}sleep 3600 & echo $! >> {pids}; echo $$ >> {pids}; wait"
    return ["/bin/sh", "-c", script]


def started(pids: Path) -> list[int]:
    """The program's and its grandchild's pids, once it has written both."""

    def both() -> list[int] | None:
        lines = pids.read_text().split() if pids.exists() else []
        return [int(p) for p in lines] if len(lines) == 2 else None

    return wait_until(both, 30, f"pids in {pids}")  # type: ignore[no-any-return]


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting for its reaper is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def configure(
    root: Root, *, hook: dict[str, Any] | None = None, **daemon: str
) -> tuple[Path, Path]:
    """`daemon` settings, the stubborn command, and a failure hook if `hook` says how
    ({"stubborn": ..., "timeout": ...}). Returns where the command and the hook write
    their pids."""
    pids, hook_pids = root.path / "command.pids", root.path / "hook.pids"
    tables: dict[str, dict[str, Any]] = {
        "daemon": daemon,
        "commands__stubborn": {"argv": program(pids, stubborn=True), "timeout": HOURS},
    }
    if hook is not None:
        tables["hooks"] = {
            "on_failure": program(hook_pids, stubborn=hook["stubborn"]),
            "timeout": hook["timeout"],
        }
    root.write_config(**tables)
    return pids, hook_pids


def command_job(root: Root, name: str) -> Path:
    activity = {"name": "dump", "driver": "command", "command": "stubborn"}
    return root.job_file(name, activities=[activity])


def test_cancel_stops_a_command_and_all_it_started_at_once(root: Root) -> None:
    pids, _ = configure(root)
    root.start()
    (job_id,) = root.submit(command_job(root, "canceled"))
    children = started(pids)

    began = time.monotonic()
    assert root.cli("cancel", job_id).returncode == 0
    job = root.wait_state(job_id, "failed", "completed", timeout=40)
    assert time.monotonic() - began < 40
    assert job["state"] == "failed" and "canceled" in job["error"], job
    assert not [pid for pid in children if running(pid)], "a program outlived its cancel"


def test_job_timeout_stops_a_command_and_hooks_timeout_stops_the_hook(root: Root) -> None:
    pids, hook_pids = configure(root, job_timeout="2s", hook={"stubborn": False, "timeout": "2s"})
    root.start()
    (job_id,) = root.submit(command_job(root, "too-slow"))
    children = started(pids)

    job = root.wait_state(job_id, "failed", "completed", timeout=40)
    assert job["state"] == "failed" and job["error"].startswith("timeout"), job
    hook = [e for e in job["events"] if e["kind"] == "failure_hook"]
    assert [e["detail"]["result"] for e in hook] == ["timed out"], hook
    children += started(hook_pids)
    assert not [pid for pid in children if running(pid)], "a program outlived its timeout"


def test_sigterm_stops_commands_and_hooks_after_the_grace(root: Root) -> None:
    hook = {"stubborn": True, "timeout": HOURS}
    pids, hook_pids = configure(root, shutdown_grace="1s", hook=hook)
    daemon = root.start()
    root.submit(command_job(root, "running-a-command"))
    missing = {"name": "a", "driver": "files", "path": str(root.sources / "missing")}
    (failing,) = root.submit(root.job_file("running-its-hook", activities=[missing]))
    children = started(pids) + started(hook_pids)
    assert root.show(failing)["state"] == "error_handling"

    began = time.monotonic()
    assert daemon.stop(signal.SIGTERM, timeout=40) == 0
    assert time.monotonic() - began < 40
    assert not [pid for pid in children if running(pid)], "a program outlived the daemon"
    assert root.show(failing)["state"] == "error_handling"  # its hook runs again at the start


def test_a_second_signal_exits_at_once_non_zero_and_leaves_no_program(root: Root) -> None:
    pids, _ = configure(root, shutdown_grace="1h")
    daemon = root.start()
    root.submit(command_job(root, "abandoned"))
    children = started(pids)
    daemon.send(signal.SIGTERM)
    wait_until(
        lambda: any(e.get("event") == "stopping: no new work" for e in daemon.events()),
        20,
        "the first signal taken",
    )
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit(timeout=20) == 128 + signal.SIGTERM
    assert not [pid for pid in children if running(pid)], "a program outlived the daemon"
