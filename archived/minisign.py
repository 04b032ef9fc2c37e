"""Minisign keys and signatures, readable and writable by the `minisign` tool.

Only what the daemon needs: unencrypted secret keys (a daemon cannot prompt for a
password), prehashed ("ED") signatures, and verification of both prehashed and
legacy ("Ed") signatures. The cryptography is `cryptography`'s Ed25519 and
`hashlib.blake2b`; this module only lays the bytes out.

Formats (all integers little-endian, every blob base64 on one line after a comment line):

* public key: ``"Ed" | key_id[8] | pk[32]``
* secret key: ``"Ed" | kdf_alg[2] | "B2" | kdf_salt[32] | kdf_opslimit[8] |
  kdf_memlimit[8] | key_id[8] | seed[32] | pk[32] | chk[32]`` where ``chk`` is
  BLAKE2b-256 of ``"Ed" | key_id | seed | pk``; kdf_alg is two zero bytes when
  the key is not encrypted, ``"Sc"`` (scrypt) when it is.
* signature file: untrusted comment line, ``base64("ED" | key_id | sig[64])``,
  ``"trusted comment: " + text``, ``base64(global_sig[64])`` where ``sig`` signs
  BLAKE2b-512(message) ("Ed": the message itself) and ``global_sig`` signs
  ``sig | text``.

The key id shown to people is the 8 key-id bytes read as a little-endian uint64 and
printed in upper-case hex without zero padding, as minisign's ``%lX`` prints it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .fileio import write_atomic

__all__ = [
    "MinisignError",
    "PublicKey",
    "SecretKey",
    "load_secret_key_file",
    "verify",
    "write_key_pair",
]

SIG_ALG = b"Ed"  # key algorithm, and the legacy (not prehashed) signature algorithm
SIG_ALG_HASHED = b"ED"  # signature over BLAKE2b-512 of the message
KDF_NONE = b"\x00\x00"
KDF_SCRYPT = b"Sc"
CHK_ALG = b"B2"

KEY_ID_LEN = 8
PK_LEN = 32
SEED_LEN = 32
SIG_LEN = 64
CHK_LEN = 32
SALT_LEN = 32

PUBLIC_KEY_LEN = 2 + KEY_ID_LEN + PK_LEN  # 42
SECRET_KEY_LEN = 2 + 2 + 2 + SALT_LEN + 8 + 8 + KEY_ID_LEN + SEED_LEN + PK_LEN + CHK_LEN  # 158
SIGNATURE_LEN = 2 + KEY_ID_LEN + SIG_LEN  # 74

UNTRUSTED_PREFIX = "untrusted comment: "
TRUSTED_PREFIX = "trusted comment: "
PUBLIC_KEY_COMMENT = "minisign public key "
SECRET_KEY_COMMENT = "minisign unencrypted secret key"
DEFAULT_SIGNATURE_COMMENT = "signature from archived secret key"

# minisign reads comment lines with fgets() into fixed buffers (COMMENTMAXBYTES = 1024,
# TRUSTEDCOMMENTMAXBYTES = 8192, both counting the prefix, newline and NUL) and refuses
# a longer line, so we refuse to write one. Limits checked against minisign 0.11.
MAX_UNTRUSTED_LINE = 1024 - 1
MAX_TRUSTED_LINE = 8192 - 1

MAX_SECRET_KEY_FILE = 64 * 1024


class MinisignError(Exception):
    """A key or signature cannot be parsed, loaded, written or verified."""


def _b64decode(text: str, what: str, length: int) -> bytes:
    try:
        data = base64.b64decode(text.strip().encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise MinisignError(f"{what}: invalid base64") from None
    if len(data) != length:
        raise MinisignError(f"{what}: decodes to {len(data)} bytes, expected {length}")
    return data


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _lines(text: str) -> list[str]:
    """The lines of a minisign file: split on LF only (a trusted comment may hold any
    other character), CR stripped, trailing blank lines dropped."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _key_id_hex(key_id: bytes) -> str:
    return f"{int.from_bytes(key_id, 'little'):X}"


def _check_comment(comment: str, what: str, max_line: int, prefix: str) -> bytes:
    for bad, name in (("\n", "newline"), ("\r", "carriage return"), ("\x00", "NUL")):
        if bad in comment:
            raise ValueError(f"{what} must be a single line (it contains a {name})")
    encoded = comment.encode("utf-8")
    if len(prefix) + len(encoded) + 1 > max_line:
        raise ValueError(
            f"{what} is too long for minisign: {len(encoded)} bytes, at most "
            f"{max_line - len(prefix) - 1}"
        )
    return encoded


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _secret_checksum(key_id: bytes, seed: bytes, pk: bytes) -> bytes:
    return hashlib.blake2b(SIG_ALG + key_id + seed + pk, digest_size=CHK_LEN).digest()


def _check_key_id(key_id: object) -> None:
    if not isinstance(key_id, bytes) or len(key_id) != KEY_ID_LEN:
        raise ValueError(f"key_id must be {KEY_ID_LEN} bytes")


@dataclass(frozen=True)
class PublicKey:
    key_id: bytes
    key: Ed25519PublicKey

    def __post_init__(self) -> None:
        _check_key_id(self.key_id)

    @property
    def key_id_hex(self) -> str:
        """The key id as minisign prints it (little-endian uint64, upper-case hex)."""
        return _key_id_hex(self.key_id)

    def to_base64(self) -> str:
        """The bare base64 line, as `minisign -P` takes it."""
        return _b64encode(SIG_ALG + self.key_id + _raw_public(self.key))

    def dumps(self) -> str:
        return f"{UNTRUSTED_PREFIX}{PUBLIC_KEY_COMMENT}{self.key_id_hex}\n{self.to_base64()}\n"

    @classmethod
    def loads(cls, text: str) -> PublicKey:
        """Parse a `.pub` file's text, or a bare base64 public key line."""
        lines = [line for line in _lines(text) if line.strip()]
        if lines and lines[0].startswith("untrusted comment:"):
            lines = lines[1:]
        if len(lines) != 1:
            raise MinisignError(
                "not a minisign public key: expected an 'untrusted comment:' line and "
                "one base64 line, or a single base64 line"
            )
        data = _b64decode(lines[0], "public key", PUBLIC_KEY_LEN)
        if data[:2] != SIG_ALG:
            raise MinisignError(f"public key: unsupported signature algorithm {data[:2]!r}")
        key_id, raw = data[2 : 2 + KEY_ID_LEN], data[2 + KEY_ID_LEN :]
        try:
            key = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError as exc:
            raise MinisignError(f"public key: invalid Ed25519 key ({exc})") from None
        return cls(key_id=key_id, key=key)


@dataclass(frozen=True)
class SecretKey:
    key_id: bytes
    key: Ed25519PrivateKey

    def __post_init__(self) -> None:
        _check_key_id(self.key_id)

    def __repr__(self) -> str:
        return f"SecretKey(key_id_hex={_key_id_hex(self.key_id)!r})"

    @classmethod
    def generate(cls) -> SecretKey:
        return cls(key_id=secrets.token_bytes(KEY_ID_LEN), key=Ed25519PrivateKey.generate())

    def public_key(self) -> PublicKey:
        return PublicKey(key_id=self.key_id, key=self.key.public_key())

    def dumps(self) -> str:
        """The key as an unencrypted minisign secret key file (`minisign -G -W` layout).

        Unlike minisign 0.11, which leaves the checksum of an unencrypted key zeroed,
        this writes the real BLAKE2b-256 checksum; minisign accepts either.
        """
        seed = self.key.private_bytes_raw()
        pk = _raw_public(self.key.public_key())
        blob = b"".join(
            (
                SIG_ALG,
                KDF_NONE,
                CHK_ALG,
                bytes(SALT_LEN),
                bytes(8),
                bytes(8),  # no KDF: salt, opslimit, memlimit zero
                self.key_id,
                seed,
                pk,
                _secret_checksum(self.key_id, seed, pk),
            )
        )
        return f"{UNTRUSTED_PREFIX}{SECRET_KEY_COMMENT}\n{_b64encode(blob)}\n"

    @classmethod
    def loads(cls, text: str) -> SecretKey:
        lines = _lines(text)
        if len(lines) != 2 or not lines[0].startswith("untrusted comment:"):
            raise MinisignError(
                "not a minisign secret key: expected an 'untrusted comment:' line "
                "followed by one base64 line"
            )
        data = _b64decode(lines[1], "secret key", SECRET_KEY_LEN)
        sig_alg, kdf_alg, chk_alg = data[0:2], data[2:4], data[4:6]
        if sig_alg != SIG_ALG:
            raise MinisignError(f"secret key: unsupported signature algorithm {sig_alg!r}")
        if kdf_alg == KDF_SCRYPT:
            raise MinisignError(
                "secret key is encrypted with a password (scrypt); archived cannot prompt "
                "for one - use an unencrypted key (`minisign -G -W`, or remove the "
                "password with `minisign -C -W -s FILE`)"
            )
        if kdf_alg != KDF_NONE:
            raise MinisignError(f"secret key: unsupported key derivation function {kdf_alg!r}")
        if chk_alg != CHK_ALG:
            raise MinisignError(f"secret key: unsupported checksum function {chk_alg!r}")
        offset = 6 + SALT_LEN + 8 + 8
        key_id = data[offset : offset + KEY_ID_LEN]
        offset += KEY_ID_LEN
        seed = data[offset : offset + SEED_LEN]
        offset += SEED_LEN
        pk = data[offset : offset + PK_LEN]
        offset += PK_LEN
        chk = data[offset : offset + CHK_LEN]
        # minisign 0.11 writes an all-zero checksum for unencrypted keys (`-G -W`);
        # anything else must be the real checksum.
        if chk != bytes(CHK_LEN) and not hmac.compare_digest(
            chk, _secret_checksum(key_id, seed, pk)
        ):
            raise MinisignError("secret key: checksum mismatch (the key file is corrupted)")
        key = Ed25519PrivateKey.from_private_bytes(seed)
        if not hmac.compare_digest(_raw_public(key.public_key()), pk):
            raise MinisignError(
                "secret key: embedded public key does not match the secret seed "
                "(the key file is corrupted)"
            )
        return cls(key_id=key_id, key=key)

    def sign(
        self,
        message: bytes,
        *,
        trusted_comment: str,
        untrusted_comment: str = DEFAULT_SIGNATURE_COMMENT,
    ) -> str:
        """A prehashed ("ED") minisign signature of `message`, as `.minisig` file text."""
        trusted = _check_comment(
            trusted_comment, "trusted comment", MAX_TRUSTED_LINE, TRUSTED_PREFIX
        )
        _check_comment(untrusted_comment, "untrusted comment", MAX_UNTRUSTED_LINE, UNTRUSTED_PREFIX)
        digest = hashlib.blake2b(message, digest_size=64).digest()
        signature = self.key.sign(digest)
        global_signature = self.key.sign(signature + trusted)
        return (
            f"{UNTRUSTED_PREFIX}{untrusted_comment}\n"
            f"{_b64encode(SIG_ALG_HASHED + self.key_id + signature)}\n"
            f"{TRUSTED_PREFIX}{trusted_comment}\n"
            f"{_b64encode(global_signature)}\n"
        )


def verify(public_key: PublicKey, message: bytes, signature_text: str) -> str:
    """Return the trusted comment if the signature (and its global signature over the
    trusted comment) is valid for this key; raise MinisignError otherwise.
    Accepts both "ED" (prehashed) and legacy "Ed" signatures."""
    lines = _lines(signature_text)
    if len(lines) != 4:
        raise MinisignError(f"not a minisign signature: expected 4 lines, found {len(lines)}")
    if not lines[0].startswith(UNTRUSTED_PREFIX):
        raise MinisignError(
            f"not a minisign signature: first line must start with {UNTRUSTED_PREFIX!r}"
        )
    if not lines[2].startswith(TRUSTED_PREFIX):
        raise MinisignError(
            f"not a minisign signature: third line must start with {TRUSTED_PREFIX!r}"
        )
    blob = _b64decode(lines[1], "signature", SIGNATURE_LEN)
    trusted_comment = lines[2][len(TRUSTED_PREFIX) :]
    global_signature = _b64decode(lines[3], "trusted comment signature", SIG_LEN)
    alg, key_id, signature = blob[:2], blob[2 : 2 + KEY_ID_LEN], blob[2 + KEY_ID_LEN :]
    if alg == SIG_ALG_HASHED:
        signed = hashlib.blake2b(message, digest_size=64).digest()
    elif alg == SIG_ALG:
        signed = message
    else:
        raise MinisignError(f"unsupported signature algorithm {alg!r}")
    if key_id != public_key.key_id:
        raise MinisignError(
            f"signature was made by key id {_key_id_hex(key_id)}, "
            f"not by the public key's id {public_key.key_id_hex}"
        )
    try:
        public_key.key.verify(signature, signed)
    except InvalidSignature:
        raise MinisignError(
            f"signature verification failed (key id {public_key.key_id_hex}): "
            "the data does not match the signature"
        ) from None
    try:
        public_key.key.verify(global_signature, signature + trusted_comment.encode("utf-8"))
    except InvalidSignature:
        raise MinisignError(
            f"trusted comment signature verification failed (key id "
            f"{public_key.key_id_hex}): the trusted comment was altered"
        ) from None
    return trusted_comment


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _write_new_file(path: Path, text: str, mode: int, what: str) -> None:
    """Create `path` holding `text` with `mode`, atomically, never replacing a file."""
    try:
        write_atomic(path, text.encode("utf-8"), mode, exclusive=True)
    except FileExistsError:
        raise MinisignError(f"refusing to overwrite existing {what} {path}") from None
    except OSError as exc:
        raise MinisignError(f"cannot create {what} {path}: {_describe(exc)}") from None


def write_key_pair(secret_path: Path, public_path: Path) -> PublicKey:
    """Generate a key pair and write it: the secret key unencrypted with mode 0o600, the
    public key with mode 0o644. Refuses (MinisignError) if either file exists."""
    secret_path, public_path = Path(secret_path), Path(public_path)
    if secret_path.absolute() == public_path.absolute():
        raise MinisignError(f"secret and public key paths are the same: {secret_path}")
    for path, what in ((secret_path, "secret key file"), (public_path, "public key file")):
        if path.exists() or path.is_symlink():
            raise MinisignError(f"refusing to overwrite existing {what} {path}")
    secret = SecretKey.generate()
    public = secret.public_key()
    _write_new_file(secret_path, secret.dumps(), 0o600, "secret key file")
    try:
        _write_new_file(public_path, public.dumps(), 0o644, "public key file")
    except BaseException:
        # Without its public half the new secret key is useless; do not leave it behind.
        with contextlib.suppress(OSError):
            os.unlink(secret_path)
        raise
    return public


def load_secret_key_file(path: Path) -> SecretKey:
    """Load an unencrypted minisign secret key file; every problem is a MinisignError
    naming the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SECRET_KEY_FILE + 1)
    except FileNotFoundError:
        raise MinisignError(f"secret key file {path} does not exist") from None
    except PermissionError:
        raise MinisignError(f"secret key file {path} is not readable: permission denied") from None
    except IsADirectoryError:
        raise MinisignError(f"secret key file {path} is a directory") from None
    except OSError as exc:
        raise MinisignError(f"cannot read secret key file {path}: {_describe(exc)}") from None
    if len(data) > MAX_SECRET_KEY_FILE:
        raise MinisignError(f"secret key file {path} is too large to be a minisign key")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MinisignError(f"secret key file {path} is not a minisign key (not text)") from None
    try:
        return SecretKey.loads(text)
    except MinisignError as exc:
        raise MinisignError(f"secret key file {path}: {exc}") from None
