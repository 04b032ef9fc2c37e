"""The signing key and the trusted public keys, as the config names them.

The embedded default makes its key pair on first use; a configured key must exist and
be readable by its owner alone. Under systemd, `LoadCredential=signing.key:...` puts
the key in $CREDENTIALS_DIRECTORY, which then wins over `signing.key`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .config import Config
from .errors import ConfigError
from .minisign import MinisignError, PublicKey, SecretKey, load_secret_key_file, write_key_pair


def public_path(secret: Path) -> Path:
    """Where the public half of a secret key file lives: beside it, `.pub`."""
    return secret.with_suffix(".pub")


CREDENTIAL = "signing.key"


class KeyRing:
    """Loaded secret keys by path; cleared on reload, so a rotated key is picked up."""

    def __init__(self) -> None:
        self._secrets: dict[Path, SecretKey] = {}

    def secret(self, config: Config) -> SecretKey:
        path = signing_key_path(config)
        if path not in self._secrets:
            self._secrets[path] = load_signing_key(config)
        return self._secrets[path]

    def clear(self) -> None:
        self._secrets.clear()


def signing_key_path(config: Config) -> Path:
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / CREDENTIAL).exists():
        return Path(credentials) / CREDENTIAL
    return config.signing.key


def load_signing_key(config: Config) -> SecretKey:
    path = signing_key_path(config)
    if config.embedded and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_key_pair(path, public_path(path))
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"signing.key: {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(
            f"signing.key: {path} is readable by group or others (mode {mode & 0o777:o}); "
            f"chmod 600 it"
        )
    try:
        return load_secret_key_file(path)
    except MinisignError as exc:
        raise ConfigError(f"signing.key: {exc}") from None


def trusted_keys(config: Config) -> list[PublicKey]:
    """Public keys `verify` accepts: the signing key's, then signing.public_keys."""
    keys = []
    with contextlib.suppress(MinisignError):  # a verifying host need not hold the secret key
        keys.append(load_secret_key_file(config.signing.key).public_key())
    with contextlib.suppress(OSError, UnicodeDecodeError, MinisignError):
        keys.append(PublicKey.loads(public_path(config.signing.key).read_text(encoding="utf-8")))
    for path in config.signing.public_keys:
        try:
            keys.append(PublicKey.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, MinisignError) as exc:
            raise ConfigError(f"signing.public_keys: {path}: {exc}") from None
    return keys
