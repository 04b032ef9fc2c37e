"""`archived init`: an installation from nothing that the daemon runs on; never overwrites."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest
from conftest import Root, run_cli

from archived.loader import config_path


def tree(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every path below `folder` with its mode and (for a file) its bytes."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
        for p in sorted(folder.rglob("*"))
    }


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
def test_init_makes_an_installation_the_daemon_runs_on_and_a_second_run_changes_nothing(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "archived"
    result = run_cli("init", "--dir", str(folder))
    assert result.returncode == 0, result.stderr
    assert f"ok: {folder / 'archived.toml'}" in result.stdout
    assert "next:" in result.stdout and "submit --wait" in result.stdout
    config = tomllib.loads((folder / "archived.toml").read_text())
    assert config["storage"]["primary"] == {
        "driver": "localdir",
        "path": str(folder / "archive"),
        "require_marker": True,
    }
    assert (folder / "archive" / ".archived-target").is_file()
    assert mode(folder / "signing.key") == 0o600
    assert mode(folder / "archived.toml") == 0o640
    assert mode(folder / "state") == 0o750
    assert mode(folder / "spool" / "incoming") == 0o2770
    assert mode(folder / "spool" / "active") == 0o750

    before = tree(folder)
    again = run_cli("init", "--dir", str(folder))
    assert again.returncode == 78
    assert "exists: init never overwrites" in again.stderr
    assert tree(folder) == before

    assert run_cli("check-config", config=folder / "archived.toml").returncode == 0
    (folder / "sources" / "report.txt").write_text("first\n")
    root = Root(
        folder,
        folder / "archived.toml",
        folder / "sources",
        {"primary": folder / "archive"},
        folder / "signing.key",
        folder / "signing.pub",
    )
    try:
        root.start()
        job = root.job_file(
            "first",
            activities=[{"name": "files", "driver": "files", "path": str(folder / "sources")}],
        )
        (job_id,) = root.submit(job, wait=True)
        assert root.show(job_id)["state"] == "completed"
        (archive,) = root.archives("primary")
        assert (
            root.cli("verify", "--key", str(folder / "signing.pub"), str(archive)).returncode == 0
        )
    finally:
        for daemon in root.daemons:
            daemon.stop()


@pytest.mark.slow
def test_init_refuses_before_writing_anything_and_keeps_an_existing_key(tmp_path: Path) -> None:
    folder = tmp_path / "archived"
    disk = tmp_path / "offsite"
    result = run_cli("init", "--dir", str(folder), "--target", f"offsite={disk}")
    assert result.returncode == 78
    assert f"storage.offsite: {disk} is not a directory: mount the disk" in result.stderr
    assert not folder.exists()  # no trace

    keygen = run_cli("keygen", "--secret", str(folder / "signing.key"))
    assert keygen.returncode == 0, keygen.stderr
    key = (folder / "signing.key").read_bytes()
    disk.mkdir()
    result = run_cli(
        "init",
        "--dir",
        str(folder),
        "--target",
        "primary=" + str(folder / "archive"),
        "--target",
        f"offsite={disk}",
    )
    assert result.returncode == 0, result.stderr
    assert f"kept the existing key pair {folder / 'signing.key'}" in result.stdout
    assert (folder / "signing.key").read_bytes() == key
    assert f"storage.offsite: marked {disk}" in result.stdout
    config = tomllib.loads((folder / "archived.toml").read_text())
    assert {name: t["require_marker"] for name, t in config["storage"].items()} == {
        "primary": True,
        "offsite": True,
    }


def test_commands_use_the_installations_config_when_none_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ARCHIVED_CONFIG", raising=False)
    system = tmp_path / "etc" / "archived.toml"
    assert config_path(None, system) is None  # no installation: the embedded default
    system.parent.mkdir()
    system.write_text("")
    assert config_path(None, system) == system
    assert config_path("named.toml", system) == Path("named.toml")
    monkeypatch.setenv("ARCHIVED_CONFIG", "from-env.toml")
    assert config_path(None, system) == Path("from-env.toml")
