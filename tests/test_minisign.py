"""archived.minisign against the real `minisign` binary, in both directions.

Every key, signature and file is made in tmp_path; nothing is mocked. The binary must
be installed: these tests fail, rather than skip, without it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from archived.minisign import (
    MinisignError,
    PublicKey,
    SecretKey,
    _write_new_file,  # the atomic no-overwrite primitive
    load_secret_key_file,
    verify,
    write_key_pair,
)

MINISIGN = "minisign"
TIMEOUT = 120  # an encrypted key costs minisign a 1 GiB scrypt run

MESSAGE = b"BagIt-Version: 0.97\nTag-File-Character-Encoding: UTF-8\n\x00\xff binary too\n"
TRUSTED = "archived job 42 bag demo-42\ttimestamp 20240101T000000Z \u00e9\u00e8"


def minisign(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run minisign and require success; the failure message carries its output."""
    try:
        return subprocess.run(
            [MINISIGN, *map(str, args)],
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=True,
        )
    except subprocess.CalledProcessError as exc:
        pytest.fail(
            f"minisign {' '.join(map(str, args))} failed ({exc.returncode}):\n"
            f"{exc.stdout}{exc.stderr}"
        )


def minisign_fails(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run minisign and require it to reject what it is given (exit status 1 or 2)."""
    proc = subprocess.run(
        [MINISIGN, *map(str, args)],
        input="",
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode in (1, 2), (
        f"minisign {' '.join(map(str, args))} unexpectedly exited {proc.returncode}:\n"
        f"{proc.stdout}{proc.stderr}"
    )
    return proc


def raw(key: PublicKey) -> bytes:
    return key.key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def b64_line(text: str, index: int = 1) -> bytearray:
    return bytearray(base64.b64decode(text.split("\n")[index]))


def replace_line(text: str, index: int, line: str) -> str:
    lines = text.split("\n")
    lines[index] = line
    return "\n".join(lines)


@dataclass
class Pair:
    secret: Path
    public: Path


@pytest.fixture
def message_file(tmp_path: Path) -> Path:
    path = tmp_path / "tagmanifest-sha256.txt"
    path.write_bytes(MESSAGE)
    return path


@pytest.fixture
def binary_pair(tmp_path: Path) -> Pair:
    """An unencrypted key pair made by `minisign -G -W`."""
    pair = Pair(tmp_path / "bin.key", tmp_path / "bin.pub")
    minisign("-G", "-W", "-p", pair.public, "-s", pair.secret)
    return pair


@pytest.fixture
def our_pair(tmp_path: Path) -> Pair:
    """A key pair made by write_key_pair."""
    pair = Pair(tmp_path / "ours" / "archived.key", tmp_path / "ours" / "archived.pub")
    pair.secret.parent.mkdir()
    write_key_pair(pair.secret, pair.public)
    return pair


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# --- keys made by minisign, used by us ---------------------------------------------------


def test_binary_key_pair_loads(binary_pair: Pair) -> None:
    pub_text = binary_pair.public.read_text()
    secret = SecretKey.loads(binary_pair.secret.read_text())
    public = PublicKey.loads(pub_text)

    assert secret.key_id == public.key_id
    assert raw(secret.public_key()) == raw(public)
    # Our rendering of the public key, comment line and key id included, is minisign's.
    assert public.dumps() == pub_text
    assert secret.public_key().dumps() == pub_text
    assert pub_text.split("\n")[0] == f"untrusted comment: minisign public key {public.key_id_hex}"
    # A bare base64 line, as `minisign -P` takes it, gives the same key.
    bare = PublicKey.loads(pub_text.split("\n")[1])
    assert (bare.key_id, raw(bare)) == (public.key_id, raw(public))
    assert load_secret_key_file(binary_pair.secret).key_id == public.key_id


def test_our_signature_verifies_with_minisign(binary_pair: Pair, message_file: Path) -> None:
    secret = SecretKey.loads(binary_pair.secret.read_text())
    signature = secret.sign(MESSAGE, trusted_comment=TRUSTED)
    sig_file = message_file.with_name(message_file.name + ".minisig")
    sig_file.write_text(signature, encoding="utf-8")

    assert signature.split("\n")[2] == f"trusted comment: {TRUSTED}"
    assert b64_line(signature)[:2] == b"ED"  # prehashed, minisign's default
    proc = minisign("-Vm", message_file, "-p", binary_pair.public)
    assert "Signature and comment signature verified" in proc.stdout
    assert f"Trusted comment: {TRUSTED}" in proc.stdout
    # -Q prints just the trusted comment; -P takes the key as a base64 string.
    pub_b64 = binary_pair.public.read_text().split("\n")[1]
    proc = minisign("-Vm", message_file, "-x", sig_file, "-P", pub_b64, "-Q")
    assert proc.stdout == TRUSTED + "\n"
    # And our own verifier agrees.
    assert verify(PublicKey.loads(pub_b64), MESSAGE, signature) == TRUSTED


def test_minisign_signature_verifies_with_us(binary_pair: Pair, message_file: Path) -> None:
    public = PublicKey.loads(binary_pair.public.read_text())
    minisign("-S", "-s", binary_pair.secret, "-m", message_file, "-t", TRUSTED)
    signature = message_file.with_name(message_file.name + ".minisig").read_text()
    assert b64_line(signature)[:2] == b"ED"
    assert verify(public, MESSAGE, signature) == TRUSTED


def test_minisign_default_trusted_comment(binary_pair: Pair, message_file: Path) -> None:
    public = PublicKey.loads(binary_pair.public.read_text())
    minisign("-S", "-s", binary_pair.secret, "-m", message_file)
    signature = message_file.with_name(message_file.name + ".minisig").read_text()
    comment = verify(public, MESSAGE, signature)
    assert comment.startswith("timestamp:")
    assert f"\tfile:{message_file.name}" in comment


def test_minisign_legacy_signature_verifies_with_us(
    binary_pair: Pair, message_file: Path, tmp_path: Path
) -> None:
    public = PublicKey.loads(binary_pair.public.read_text())
    sig_file = tmp_path / "legacy.minisig"
    minisign(
        "-S", "-l", "-s", binary_pair.secret, "-m", message_file, "-x", sig_file, "-t", "legacy"
    )
    signature = sig_file.read_text()
    assert b64_line(signature)[:2] == b"Ed"
    assert verify(public, MESSAGE, signature) == "legacy"
    with pytest.raises(MinisignError, match="verification failed"):
        verify(public, MESSAGE + b"x", signature)


# --- keys made by us, used by minisign ---------------------------------------------------


def test_our_key_pair_signs_with_minisign(our_pair: Pair, message_file: Path) -> None:
    public = PublicKey.loads(our_pair.public.read_text())
    minisign("-S", "-s", our_pair.secret, "-m", message_file, "-t", TRUSTED)
    signature = message_file.with_name(message_file.name + ".minisig").read_text()
    assert verify(public, MESSAGE, signature) == TRUSTED


def test_our_signature_verifies_with_minisign_and_our_pub(
    our_pair: Pair, message_file: Path
) -> None:
    secret = load_secret_key_file(our_pair.secret)
    message_file.with_name(message_file.name + ".minisig").write_text(
        secret.sign(MESSAGE, trusted_comment=TRUSTED, untrusted_comment="made in a test"),
        encoding="utf-8",
    )
    proc = minisign("-V", "-m", message_file, "-p", our_pair.public)
    assert f"Trusted comment: {TRUSTED}" in proc.stdout


def test_minisign_recreates_our_public_key(our_pair: Pair, tmp_path: Path) -> None:
    """`minisign -R` derives the public key file from our secret key: same bytes."""
    recreated = tmp_path / "recreated.pub"
    minisign("-R", "-s", our_pair.secret, "-p", recreated)
    assert recreated.read_text() == our_pair.public.read_text()


def test_secret_key_round_trip() -> None:
    secret = SecretKey.generate()
    text = secret.dumps()
    again = SecretKey.loads(text)
    assert again.key_id == secret.key_id
    assert again.key.private_bytes_raw() == secret.key.private_bytes_raw()
    assert again.dumps() == text
    blob = b64_line(text)
    assert len(blob) == 158
    assert blob[:6] == b"Ed\x00\x00B2"
    assert blob[6:54] == bytes(48)  # no KDF: salt, opslimit, memlimit all zero
    assert blob[54:62] == secret.key_id
    assert blob[126:] == hashlib.blake2b(b"Ed" + bytes(blob[54:126]), digest_size=32).digest()
    assert secret.key.private_bytes_raw().hex() not in repr(secret).lower()
    pub = secret.public_key()
    assert PublicKey.loads(pub.dumps()).key_id_hex == pub.key_id_hex


# --- negative cases ----------------------------------------------------------------------


def test_flipped_message_byte(binary_pair: Pair, message_file: Path, tmp_path: Path) -> None:
    secret = SecretKey.loads(binary_pair.secret.read_text())
    public = PublicKey.loads(binary_pair.public.read_text())
    ours = secret.sign(MESSAGE, trusted_comment=TRUSTED)
    theirs_file = tmp_path / "theirs.minisig"
    minisign("-S", "-s", binary_pair.secret, "-m", message_file, "-x", theirs_file)
    theirs = theirs_file.read_text()

    flipped = bytearray(MESSAGE)
    flipped[7] ^= 0x01
    for signature in (ours, theirs):
        with pytest.raises(MinisignError, match="signature verification failed"):
            verify(public, bytes(flipped), signature)

    # minisign agrees that our signature does not cover the altered file.
    message_file.write_bytes(bytes(flipped))
    ours_file = tmp_path / "ours.minisig"
    ours_file.write_text(ours, encoding="utf-8")
    proc = minisign_fails("-Vm", message_file, "-x", ours_file, "-p", binary_pair.public)
    assert "Signature verification failed" in proc.stderr


def test_flipped_signature_byte(binary_pair: Pair) -> None:
    secret = SecretKey.loads(binary_pair.secret.read_text())
    signature = secret.sign(MESSAGE, trusted_comment=TRUSTED)
    blob = b64_line(signature)
    blob[40] ^= 0x80
    bad = replace_line(signature, 1, base64.b64encode(bytes(blob)).decode())
    with pytest.raises(MinisignError, match="signature verification failed"):
        verify(secret.public_key(), MESSAGE, bad)


def test_signature_by_another_key(
    binary_pair: Pair, our_pair: Pair, message_file: Path, tmp_path: Path
) -> None:
    binary_public = PublicKey.loads(binary_pair.public.read_text())
    our_public = PublicKey.loads(our_pair.public.read_text())
    assert binary_public.key_id != our_public.key_id

    signature = load_secret_key_file(our_pair.secret).sign(MESSAGE, trusted_comment=TRUSTED)
    with pytest.raises(MinisignError) as excinfo:
        verify(binary_public, MESSAGE, signature)
    message = str(excinfo.value)
    assert "key id" in message
    assert our_public.key_id_hex in message
    assert binary_public.key_id_hex in message

    # The key ids we print are the ones minisign prints for the same mismatch.
    sig_file = tmp_path / "other.minisig"
    sig_file.write_text(signature, encoding="utf-8")
    proc = minisign_fails("-Vm", message_file, "-x", sig_file, "-p", binary_pair.public)
    assert f"is {our_public.key_id_hex}\n" in proc.stderr
    assert f"public key is {binary_public.key_id_hex}\n" in proc.stderr

    # Same key id, different key: the id matches but the signature does not.
    impostor = PublicKey(key_id=our_public.key_id, key=binary_public.key)
    with pytest.raises(MinisignError, match="signature verification failed"):
        verify(impostor, MESSAGE, signature)


def test_tampered_trusted_comment(binary_pair: Pair, message_file: Path, tmp_path: Path) -> None:
    public = PublicKey.loads(binary_pair.public.read_text())
    minisign(
        "-S",
        "-s",
        binary_pair.secret,
        "-m",
        message_file,
        "-x",
        tmp_path / "t.minisig",
        "-t",
        "retain until 2030",
    )
    theirs = (tmp_path / "t.minisig").read_text()
    ours = SecretKey.loads(binary_pair.secret.read_text()).sign(
        MESSAGE, trusted_comment="retain until 2030"
    )
    for signature in (theirs, ours):
        assert verify(public, MESSAGE, signature) == "retain until 2030"
        tampered = replace_line(signature, 2, "trusted comment: retain until 2020")
        with pytest.raises(MinisignError, match="trusted comment"):
            verify(public, MESSAGE, tampered)

    (tmp_path / "t.minisig").write_text(
        replace_line(ours, 2, "trusted comment: retain until 2020"), encoding="utf-8"
    )
    proc = minisign_fails(
        "-Vm", message_file, "-x", tmp_path / "t.minisig", "-p", binary_pair.public
    )
    assert "Comment signature verification failed" in proc.stderr


def test_untrusted_comment_is_not_covered(binary_pair: Pair) -> None:
    secret = SecretKey.loads(binary_pair.secret.read_text())
    signature = secret.sign(MESSAGE, trusted_comment=TRUSTED)
    edited = replace_line(signature, 0, "untrusted comment: anything at all")
    assert verify(secret.public_key(), MESSAGE, edited) == TRUSTED


@pytest.mark.slow  # scrypt at minisign's own cost
def test_encrypted_key_refused(tmp_path: Path) -> None:
    secret, public = tmp_path / "enc.key", tmp_path / "enc.pub"
    minisign("-G", "-p", public, "-s", secret, stdin="pw\npw\n")
    assert b64_line(secret.read_text())[2:4] == b"Sc"
    with pytest.raises(MinisignError, match="encrypted") as excinfo:
        SecretKey.loads(secret.read_text())
    assert "password" in str(excinfo.value)
    with pytest.raises(MinisignError, match="encrypted") as excinfo:
        load_secret_key_file(secret)
    assert str(secret) in str(excinfo.value)
    # The public half of an encrypted pair is just a public key.
    assert PublicKey.loads(public.read_text()).dumps() == public.read_text()


def test_corrupted_checksum_refused(tmp_path: Path) -> None:
    text = SecretKey.generate().dumps()
    blob = b64_line(text)
    blob[-1] ^= 0x01
    bad = replace_line(text, 1, base64.b64encode(bytes(blob)).decode())
    with pytest.raises(MinisignError, match="checksum"):
        SecretKey.loads(bad)
    path = tmp_path / "bad.key"
    path.write_text(bad)
    with pytest.raises(MinisignError, match="checksum"):
        load_secret_key_file(path)


def test_binary_key_with_wrong_checksum_refused(binary_pair: Pair) -> None:
    """minisign 0.11 may leave an unencrypted key's checksum zeroed, which we accept; a
    checksum that is neither zero nor right is corruption."""
    text = binary_pair.secret.read_text()
    blob = b64_line(text)
    blob[126:] = bytes(range(1, 33))
    with pytest.raises(MinisignError, match="checksum"):
        SecretKey.loads(replace_line(text, 1, base64.b64encode(bytes(blob)).decode()))


def test_corrupted_seed_refused(binary_pair: Pair) -> None:
    text = binary_pair.secret.read_text()
    for index in (62, 100):  # in the seed, in the embedded public key
        blob = b64_line(text)
        blob[index] ^= 0x01
        # Recompute the checksum, so the seed/public-key check is what catches it.
        blob[126:] = hashlib.blake2b(b"Ed" + bytes(blob[54:126]), digest_size=32).digest()
        with pytest.raises(MinisignError, match="does not match"):
            SecretKey.loads(replace_line(text, 1, base64.b64encode(bytes(blob)).decode()))


def test_write_key_pair_refuses_to_overwrite(our_pair: Pair, tmp_path: Path) -> None:
    secret_before = our_pair.secret.read_bytes()
    public_before = our_pair.public.read_bytes()
    with pytest.raises(MinisignError, match="refusing to overwrite"):
        write_key_pair(our_pair.secret, our_pair.public)
    with pytest.raises(MinisignError, match="refusing to overwrite"):
        write_key_pair(our_pair.secret, tmp_path / "fresh.pub")
    assert not (tmp_path / "fresh.pub").exists()

    # An existing public key file also stops it, before any secret key is written.
    fresh_secret = tmp_path / "fresh.key"
    with pytest.raises(MinisignError, match="refusing to overwrite"):
        write_key_pair(fresh_secret, our_pair.public)
    assert not fresh_secret.exists()

    assert our_pair.secret.read_bytes() == secret_before
    assert our_pair.public.read_bytes() == public_before
    assert sorted(p.name for p in our_pair.secret.parent.iterdir()) == [
        "archived.key",
        "archived.pub",
    ]


def test_no_overwrite_even_when_the_file_appears_late(tmp_path: Path) -> None:
    """The final step links rather than renames, so a file that appears after the
    up-front existence check (another keygen racing us) is still never replaced."""
    target = tmp_path / "raced.key"
    target.write_text("someone else's key\n")
    with pytest.raises(MinisignError, match="refusing to overwrite"):
        _write_new_file(target, "ours\n", 0o600, "secret key file")
    assert target.read_text() == "someone else's key\n"
    assert [p.name for p in tmp_path.iterdir()] == ["raced.key"]  # temp file removed


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o000])
def test_key_file_modes(tmp_path: Path, umask: None, mask: int) -> None:
    os.umask(mask)
    secret, public = tmp_path / "k.key", tmp_path / "k.pub"
    key = write_key_pair(secret, public)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key", "k.pub"]  # no temp left
    assert load_secret_key_file(secret).public_key().dumps() == key.dumps() == public.read_text()


def test_write_key_pair_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(MinisignError, match="cannot create secret key file"):
        write_key_pair(tmp_path / "nope" / "k.key", tmp_path / "nope" / "k.pub")


def test_load_secret_key_file_errors(tmp_path: Path, binary_pair: Pair) -> None:
    with pytest.raises(MinisignError, match="does not exist"):
        load_secret_key_file(tmp_path / "missing.key")
    with pytest.raises(MinisignError, match="is a directory"):
        load_secret_key_file(tmp_path)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"\xff\xfe not text")
    with pytest.raises(MinisignError, match="not text"):
        load_secret_key_file(garbage)
    garbage.write_text("untrusted comment: x\nnot base64 at all!\n")
    with pytest.raises(MinisignError, match="invalid base64"):
        load_secret_key_file(garbage)
    # A public key is not a secret key.
    with pytest.raises(MinisignError, match="expected 158"):
        load_secret_key_file(binary_pair.public)
    garbage.write_text("")
    with pytest.raises(MinisignError, match="not a minisign secret key"):
        load_secret_key_file(garbage)
    if os.geteuid() != 0:  # root reads anything
        unreadable = tmp_path / "unreadable.key"
        unreadable.write_text(binary_pair.secret.read_text())
        unreadable.chmod(0)
        with pytest.raises(MinisignError, match="not readable"):
            load_secret_key_file(unreadable)


def test_malformed_public_keys(binary_pair: Pair) -> None:
    text = binary_pair.public.read_text()
    for bad, match in [
        ("", "not a minisign public key"),
        ("untrusted comment: x\n", "not a minisign public key"),
        ("untrusted comment: x\nAAAA\n", "expected 42"),
        ("untrusted comment: x\n@@@@\n", "invalid base64"),
        (replace_line(text, 1, base64.b64encode(b"Xx" + bytes(40)).decode()), "algorithm"),
    ]:
        with pytest.raises(MinisignError, match=match):
            PublicKey.loads(bad)


def test_malformed_signatures(binary_pair: Pair) -> None:
    secret = SecretKey.loads(binary_pair.secret.read_text())
    public = secret.public_key()
    signature = secret.sign(MESSAGE, trusted_comment=TRUSTED)
    blob = b64_line(signature)
    blob[:2] = b"XX"
    for bad, match in [
        ("", "expected 4 lines"),
        ("\n".join(signature.split("\n")[:3]), "expected 4 lines"),
        (replace_line(signature, 0, "comment: x"), "untrusted comment"),
        (replace_line(signature, 2, "trusted: x"), "trusted comment"),
        (replace_line(signature, 1, base64.b64encode(bytes(blob)).decode()), "algorithm"),
        (replace_line(signature, 3, "AAAA"), "expected 64"),
    ]:
        with pytest.raises(MinisignError, match=match):
            verify(public, MESSAGE, bad)
    # CRLF line endings, as an editor might leave them, are still the same signature.
    assert verify(public, MESSAGE, signature.replace("\n", "\r\n")) == TRUSTED


@pytest.mark.parametrize("comment", ["two\nlines", "carriage\rreturn", "nul\x00byte"])
def test_comments_must_be_one_line(comment: str) -> None:
    secret = SecretKey.generate()
    with pytest.raises(ValueError, match="single line"):
        secret.sign(MESSAGE, trusted_comment=comment)
    with pytest.raises(ValueError, match="single line"):
        secret.sign(MESSAGE, trusted_comment="ok", untrusted_comment=comment)


def test_comment_length_limits(binary_pair: Pair, message_file: Path) -> None:
    """The longest comments we write are ones minisign still reads; one byte more is
    refused rather than written."""
    secret = SecretKey.loads(binary_pair.secret.read_text())
    longest = "t" * (8191 - len("trusted comment: ") - 1)
    signature = secret.sign(
        MESSAGE,
        trusted_comment=longest,
        untrusted_comment="u" * (1023 - len("untrusted comment: ") - 1),
    )
    message_file.with_name(message_file.name + ".minisig").write_text(signature)
    proc = minisign("-Vm", message_file, "-p", binary_pair.public, "-Q")
    assert proc.stdout == longest + "\n"
    with pytest.raises(ValueError, match="too long"):
        secret.sign(MESSAGE, trusted_comment=longest + "t")
    with pytest.raises(ValueError, match="too long"):
        secret.sign(MESSAGE, trusted_comment="x", untrusted_comment="u" * 1004)
