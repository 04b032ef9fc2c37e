"""Fixity audits through the real CLI and daemon: find damage, heal from a good copy."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
from conftest import Root, wait_until

from archived import loader
from archived.audit import Auditor
from archived.store import NewJob, Store, utcnow
from archived.store_sqlite import SqliteStore


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
        lambda: metric(prom, 'archived_audits_total{result="repaired"} 1'),
        10,
        "metrics count the repair",
    )
    assert json.loads(root.cli("jobs", "--json").stdout)[0]["state"] == "completed"


def metric(prom: os.PathLike[str] | str, line: str) -> bool:
    """Whether the metrics textfile holds this sample line (`1` and `1.0` alike)."""
    sample, _, value = line.rpartition(" ")
    try:
        with open(prom, encoding="utf-8") as f:
            lines = [have.rpartition(" ") for have in f.read().splitlines()]
    except FileNotFoundError:
        return False
    return any(name == sample and float(got) == float(value) for name, _, got in lines)


@pytest.mark.slow
def test_an_unreachable_target_is_told_from_damage_and_never_written_into(root: Root) -> None:
    prom = root.path / "m.prom"
    # `create = true`: a repair that did not tell "unmounted" from "missing" would make
    # the mount point and write into it
    root.write_config(
        storage__offsite={"create": True}, metrics={"textfile": str(prom), "interval": "100ms"}
    )
    root.start()
    job_id = completed_job(root)
    offsite = root.targets["offsite"]
    parked = offsite.with_name("parked")
    offsite.rename(parked)  # the offsite disk is unmounted

    result = root.cli("audit", "--all")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "offsite       unreachable" in result.stdout
    assert "offsite       missing" not in result.stdout
    assert "offsite       repaired" not in result.stdout
    assert "2 copies audited, 0 bad, 0 repaired, 1 unreachable" in result.stdout
    assert not offsite.exists()
    job = root.show(job_id)
    assert [a["result"] for a in job["audits"] if a["target"] == "offsite"] == ["unreachable"]
    listed = json.loads(root.cli("jobs", "--json").stdout)[0]
    assert (listed["damaged_copies"], listed["unreachable_copies"]) == (0, 1)
    assert "copies: 1 unreachable" in root.cli("jobs").stdout

    damage(root.archives("primary")[0])  # and now the only reachable copy goes bad
    result = root.cli("audit", "--all")
    assert result.returncode == 1
    assert "primary       damaged" in result.stdout
    assert "primary       unrepaired  no verified copy on any other target" in result.stdout
    assert not offsite.exists()
    listed = json.loads(root.cli("jobs", "--json").stdout)[0]
    assert (listed["damaged_copies"], listed["unreachable_copies"]) == (1, 1)
    assert "copies: 1 damaged, 1 unreachable" in root.cli("jobs").stdout
    for line in (
        'archived_copies{audit="damaged"} 1',
        'archived_copies{audit="unreachable"} 1',
        "archived_damaged_jobs 1",
    ):
        wait_until(lambda line=line: metric(prom, line), 10, f"metrics: {line}")

    parked.rename(offsite)  # mounted again: the damaged copy heals from it
    result = root.cli("audit", "--all")
    assert result.returncode == 0, result.stdout
    assert "primary       repaired" in result.stdout
    listed = json.loads(root.cli("jobs", "--json").stdout)[0]
    assert (listed["damaged_copies"], listed["unreachable_copies"]) == (0, 0)
    assert "copies:" not in root.cli("jobs").stdout
    job = root.show(job_id)
    assert [a["result"] for a in job["audits"] if a["target"] == "offsite"] == [
        "unreachable",
        "ok",
    ]
    for line in ('archived_copies{audit="ok"} 2', "archived_damaged_jobs 0"):
        wait_until(lambda line=line: metric(prom, line), 10, f"metrics: {line}")


@pytest.mark.slow
def test_a_fifo_in_place_of_an_archive_is_damage_not_a_hang(root: Root) -> None:
    root.start()
    job_id = completed_job(root)
    archive = root.archives("primary")[0]
    archive.unlink()
    os.mkfifo(archive)  # nobody will ever write to it: opening it to read would block
    result = root.cli("audit", "--all", timeout=20)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"damaged: {archive} is not a regular file" in result.stdout
    assert "primary       repaired" in result.stdout
    assert archive.is_file()
    assert root.cli("verify", "--key", str(root.public_key), str(archive)).returncode == 0
    copies = {c["target"]: c["audit_result"] for c in root.show(job_id)["copies"]}
    assert copies["primary"] == "repaired"


@pytest.mark.slow
def test_the_daemons_audit_does_not_hang_on_a_fifo(root: Root) -> None:
    root.write_config(audit={"interval": "200ms", "copies_per_round": 2})
    root.start()
    job_id = completed_job(root)
    archive = root.archives("offsite")[0]
    archive.unlink()
    os.mkfifo(archive)

    def repaired() -> bool:
        return any(a["result"] == "repaired" for a in root.show(job_id)["audits"])

    wait_until(repaired, 20, "the daemon's audit to replace the FIFO")
    assert archive.is_file()


@pytest.mark.slow
def test_enabling_audits_by_sighup_takes_effect_at_once_and_cli_audits_count(
    root: Root,
) -> None:
    prom = root.path / "m.prom"
    metrics = {"textfile": str(prom), "interval": "100ms"}
    root.write_config(audit={"interval": "0"}, metrics=metrics)
    daemon = root.start()
    job_id = completed_job(root)
    assert all(c["audited_at"] is None for c in root.show(job_id)["copies"])
    # a long interval: the round that is overdue (never audited) runs now, not in an hour
    root.write_config(audit={"interval": "1h"}, metrics=metrics)
    daemon.send(signal.SIGHUP)
    wait_until(
        lambda: all(c["audited_at"] for c in root.show(job_id)["copies"]),
        10,
        "the daemon's first audit round",
    )
    wait_until(lambda: metric(prom, 'archived_audits_total{result="ok"} 2'), 10, "metrics")
    assert root.cli("audit", "--all").returncode == 0  # a round the daemon did not run
    wait_until(
        lambda: metric(prom, 'archived_audits_total{result="ok"} 4'),
        10,
        "the metrics to count the command line's audits",
    )


# -- the auditor's choices, in-process on a real database and a real target -----------


async def single_copy_jobs(tmp_path: Path, count: int) -> tuple[Store, Auditor, list[Path]]:
    """`count` completed jobs, each with one copy on the only target (nothing to repair
    from): the store, an auditor, and the archives."""
    target = tmp_path / "target"
    target.mkdir()
    config_path = tmp_path / "archived.toml"
    config_path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nspool_dir = "{tmp_path / "spool"}"\n'
        f'[storage.primary]\ndriver = "localdir"\npath = "{target}"\n'
    )
    config = loader.load(config_path)
    store = await SqliteStore.open(tmp_path / "state" / "archived.db", "test")
    archives = []
    for i in range(count):
        job_id, archive_name = f"job{i:04d}", f"kept-job{i:04d}.tar"
        job = NewJob(job_id, "kept", "{}", "-", config.snapshot(), config.digest, None, ())
        await store.insert_job(job, reason="test")
        data = os.urandom(1000 + i)
        archive = target / "kept" / archive_name
        archive.parent.mkdir(exist_ok=True)
        archive.write_bytes(data)
        archives.append(archive)
        # as if it ran: the store has no operation that makes a job completed at once
        async with store.db.transaction() as tx:
            await tx.execute(
                "UPDATE jobs SET archive_name = :name, state = 'completed' WHERE id = :id",
                {"name": archive_name, "id": job_id},
            )
            await tx.run(
                "upsert_copy",
                job_id=job_id,
                target="primary",
                path=str(archive),
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                now=utcnow(),
            )
    return store, Auditor(store, config, tmp_path / "scratch"), archives


async def test_copies_that_could_not_be_repaired_take_at_most_half_a_round(
    tmp_path: Path,
) -> None:
    store, auditor, archives = await single_copy_jobs(tmp_path, 6)
    try:
        for archive in archives[:3]:
            archive.unlink()
        results = await auditor.round()
        assert (
            sorted(r.result for r in results) == ["missing"] * 3 + ["ok"] * 3 + ["unrepaired"] * 3
        )
        healthy = {r.job_id for r in results if r.result == "ok"}
        seen: set[str] = set()
        for _ in range(3):
            chosen = {r.job_id for r in await auditor.round(copies=2)}
            assert len(chosen) == 2
            assert len(chosen - healthy) <= 1, "known-bad copies took the whole round"
            seen |= chosen
        assert healthy <= seen, "a healthy copy was never audited again"
    finally:
        await store.close()


async def test_an_unrepairable_copy_is_recorded_once_not_every_round(tmp_path: Path) -> None:
    store, auditor, (lost, fine) = await single_copy_jobs(tmp_path, 2)
    try:
        good = lost.read_bytes()
        lost.unlink()
        audited = []
        for _ in range(3):
            results = await auditor.round()
            assert sorted(r.result for r in results) == ["missing", "ok", "unrepaired"]
            copy = (await store.copies("job0000"))[0]
            audited.append(copy.audited_at)
        assert audited == sorted(set(audited)), "audited_at moves on every round"
        findings = [a.result for a in await store.audits("job0000")]
        assert findings == ["missing", "unrepaired"]
        assert [a.result for a in await store.audits("job0001")] == ["ok"]

        lost.write_bytes(bytes(len(good)))  # what is wrong changes: that is recorded
        await auditor.round()
        await auditor.round()
        lost.write_bytes(good)  # and so is the copy coming back
        await auditor.round()
        await auditor.round()
        findings = [a.result for a in await store.audits("job0000")]
        assert findings == ["missing", "unrepaired", "damaged", "unrepaired", "ok"]
        assert fine.exists()
    finally:
        await store.close()
