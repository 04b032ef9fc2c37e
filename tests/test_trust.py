"""Trust anyone can check: time-stamped archives through the real daemon and real TSA."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import Root, minisign_keypair, wait_until
from tsa import Tsa, openssl_verify
from tsa import tsa as tsa_fixture  # noqa: F401  (registers the fixture named "tsa")

pytestmark = pytest.mark.slow  # the acceptance layer: the daemon and the CLI as processes

TSR = "tagmanifest-sha256.txt.tsr"


def with_tsa(root: Root, tsa: Tsa) -> None:
    root.write_config(
        signing={
            "key": str(root.secret_key),
            "tsa_url": tsa.url,
            "tsa_ca": str(tsa.ca_path),
            "tsa_timeout": "5s",
        }
    )


def extract(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / archive.name.removesuffix(".tar")


@pytest.mark.parametrize("mode", ["ok", "chain_reversed"])
def test_a_time_stamped_archive_verifies_with_openssl_and_archived(
    root: Root, tsa: Tsa, tmp_path: Path, mode: str
) -> None:
    """ "chain_reversed": a TSA that embeds its chain, not in DER order (as OpenSSL's does)."""
    with_tsa(root, tsa)
    tsa.mode = mode
    root.start()
    (job_id,) = root.submit(root.job_file("stamped"))
    job = root.wait_state(job_id, "completed", "failed")
    assert job["state"] == "completed", job
    archive = root.archives("primary")[0]
    bag = extract(archive, tmp_path / "x")
    assert (bag / TSR).read_bytes() == tsa.replies[-1]
    untrusted = tsa.tsa_cert_path if mode == "ok" else tsa.pki.intermediate_path
    done = openssl_verify(bag / TSR, bag / "tagmanifest-sha256.txt", tsa.ca_path, untrusted)
    assert done.returncode == 0 and "Verification: OK" in done.stdout, done.stderr
    ok = root.cli("verify", str(archive))  # the configured key and tsa_ca
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "time-stamped 20" in ok.stdout
    untrusted = root.cli("verify", "--tsa-ca", str(tsa.other_ca_path), str(archive))
    assert untrusted.returncode == 1 and TSR in untrusted.stdout
    # the token covers the event log (through the tag manifest); the job records it
    events = root.show(job_id)["events"]
    assert any(e["kind"] == "timestamp" and e["detail"]["tsa"] == tsa.url for e in events)


def test_stripping_the_token_from_a_time_stamped_archive_fails_verify(
    root: Root, tsa: Tsa, tmp_path: Path
) -> None:
    """The token is not under the signature, but bag-info.txt saying it exists is."""
    with_tsa(root, tsa)
    root.start()
    (job_id,) = root.submit(root.job_file("stripped"))
    assert root.wait_state(job_id, "completed", "failed")["state"] == "completed"
    archive = root.archives("primary")[0]
    bag = extract(archive, tmp_path / "x")
    assert "Archived-Timestamp: rfc3161\n" in (bag / "bag-info.txt").read_text()
    stripped = tmp_path / archive.name
    with tarfile.open(archive) as src, tarfile.open(stripped, "w") as out:
        for member in src:
            if not member.name.endswith(TSR):
                out.addfile(member, src.extractfile(member) if member.isreg() else None)
    result = root.cli("verify", str(stripped))
    assert result.returncode == 1, result.stdout
    assert f"{TSR}: missing" in result.stdout and "Archived-Timestamp" in result.stdout
    assert root.cli("verify", str(archive)).returncode == 0


def test_a_tsa_that_is_down_makes_the_job_wait_then_complete(root: Root, tsa: Tsa) -> None:
    with_tsa(root, tsa)
    tsa.stop()
    root.start()
    (job_id,) = root.submit(root.job_file("patient"))
    wait_until(
        lambda: "recoverable_error" in [h["state"] for h in root.show(job_id)["history"]],
        30,
        "a recoverable error while the TSA is down",
    )
    assert root.show(job_id)["state"] != "failed"
    tsa.start()
    job = root.wait_state(job_id, "completed", "failed", timeout=60)
    assert job["state"] == "completed", job
    assert len(root.archives("primary")) == 1


def test_a_reply_from_an_untrusted_tsa_is_refused(root: Root, tsa: Tsa) -> None:
    with_tsa(root, tsa)
    tsa.mode = "untrusted"
    root.start()
    (job_id,) = root.submit(root.job_file("refused"))
    job = root.wait_state(job_id, "failed", "completed")
    assert job["state"] == "failed"
    assert "recoverable_error" not in [h["state"] for h in job["history"]]
    assert root.all_target_files() == []


def test_a_reply_with_a_wrong_nonce_is_refused(root: Root, tsa: Tsa) -> None:
    with_tsa(root, tsa)
    tsa.mode = "wrong_nonce"
    root.start()
    (job_id,) = root.submit(root.job_file("nonce"))
    job = root.wait_state(job_id, "failed", "completed")
    assert job["state"] == "failed"
    assert "nonce" in job["error"].lower() or "imprint" in job["error"].lower()


def test_verify_catches_a_token_for_other_data(root: Root, tsa: Tsa, tmp_path: Path) -> None:
    with_tsa(root, tsa)
    root.start()
    first, second = root.submit(root.job_file("one"), root.job_file("two"))
    for job_id in (first, second):
        root.wait_state(job_id, "completed")
    one, two = (next(p for p in root.archives("primary") if j in p.name) for j in (first, second))
    bag_one = extract(one, tmp_path / "one")
    bag_two = extract(two, tmp_path / "two")
    shutil.copyfile(bag_two / TSR, bag_one / TSR)  # a genuine token, for another manifest
    result = root.cli("verify", str(bag_one))
    assert result.returncode == 1
    assert TSR in result.stdout and "imprint" in result.stdout
    assert "manifest-sha256.txt:" not in result.stdout.replace(TSR, "")


def test_verify_catches_a_signature_by_another_key(root: Root, tmp_path: Path) -> None:
    root.start()
    (job_id,) = root.submit(root.job_file("signed"))
    root.wait_state(job_id, "completed")
    archive = root.archives("primary")[0]
    _, other_public = minisign_keypair(tmp_path, "other")
    result = root.cli("verify", "--key", str(other_public), str(archive))
    assert result.returncode == 1
    assert "tagmanifest-sha256.txt.minisig" in result.stdout
    # and re-signing a changed bag-info.txt with another key does not pass either
    bag = extract(archive, tmp_path / "x")
    info = bag / "bag-info.txt"
    info.write_text(info.read_text().replace("External-Identifier", "X-Identifier"))
    result = root.cli("verify", "--key", str(root.public_key), str(bag))
    assert result.returncode == 1 and "bag-info.txt" in result.stdout
