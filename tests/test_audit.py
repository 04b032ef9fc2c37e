"""Fixity audits through the real CLI and daemon: find damage, heal from a good copy."""

from __future__ import annotations

import json
import os

from conftest import Root, wait_until


def completed_job(root: Root, name: str = "kept") -> str:
    (job_id,) = root.submit(root.job_file(name))
    assert root.wait_state(job_id, "completed", "failed")["state"] == "completed"
    return job_id


def damage(path: os.PathLike[str] | str, offset: int = 2000) -> bytes:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open(path, "rb") as f:
        return f.read()


def test_audit_finds_a_damaged_copy_and_repairs_it_from_the_other(root: Root) -> None:
    root.start()
    job_id = completed_job(root)
    good = root.archives("offsite")[0].read_bytes()
    damaged = root.archives("primary")[0]
    damage(damaged)
    result = root.cli("audit", job_id)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "primary       damaged" in result.stdout
    assert "primary       repaired" in result.stdout
    assert "2 copies audited, 1 bad, 1 repaired" in result.stdout
    assert damaged.read_bytes() == good
    assert root.cli("verify", "--key", str(root.public_key), str(damaged)).returncode == 0
    job = root.show(job_id)
    assert [a["result"] for a in job["audits"] if a["target"] == "primary"] == [
        "damaged",
        "repaired",
    ]
    assert {c["target"]: c["audit_result"] for c in job["copies"]} == {
        "primary": "repaired",
        "offsite": "ok",
    }
    assert "audit findings" in root.cli("show", job_id).stdout


def test_audit_repairs_a_missing_copy(root: Root) -> None:
    root.start()
    job_id = completed_job(root)
    missing = root.archives("offsite")[0]
    missing.unlink()
    result = root.cli("audit", "--all")
    assert result.returncode == 0, result.stdout
    assert "offsite       missing" in result.stdout
    assert missing.exists()
    assert root.cli("verify", "--key", str(root.public_key), str(missing)).returncode == 0
    assert root.show(job_id)["state"] == "completed"


def test_with_every_copy_damaged_audit_reports_and_changes_nothing(root: Root) -> None:
    root.start()
    job_id = completed_job(root)
    before = {t: damage(root.archives(t)[0], 1000 + i) for i, t in enumerate(sorted(root.targets))}
    result = root.cli("audit", job_id)
    assert result.returncode == 1
    assert result.stdout.count("unrepaired") == 2
    assert {t: root.archives(t)[0].read_bytes() for t in root.targets} == before
    results = [a["result"] for a in root.show(job_id)["audits"]]
    assert sorted(results) == ["damaged", "damaged", "unrepaired", "unrepaired"]


def test_the_daemon_audits_oldest_first_and_heals_on_its_own(root: Root) -> None:
    prom = root.path / "m.prom"
    root.write_config(
        audit={"interval": "300ms", "copies_per_round": 1},
        metrics={"textfile": str(prom), "interval": "200ms"},
    )
    daemon = root.start()
    first = completed_job(root, "first")
    second = completed_job(root, "second")
    wait_until(
        lambda: all(c["audited_at"] for j in (first, second) for c in root.show(j)["copies"]),
        30,
        "every copy audited",
    )
    target = root.archives("primary")
    damaged = next(p for p in target if first in p.name)
    damage(damaged)

    def healed() -> bool:
        return any(a["result"] == "repaired" for a in root.show(first)["audits"])

    wait_until(healed, 30, "the daemon's audit to repair the copy")
    assert root.cli("verify", "--key", str(root.public_key), str(damaged)).returncode == 0
    assert any(
        e.get("event") == "stored copy failed its audit" and e.get("job_id") == first
        for e in daemon.events()
    )
    wait_until(
        lambda: 'archived_audits_total{result="repaired"} 1' in prom.read_text(),
        10,
        "metrics count the repair",
    )
    assert json.loads(root.cli("jobs", "--json").stdout)[0]["state"] == "completed"
