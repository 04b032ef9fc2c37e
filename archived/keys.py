"""The signing key and the trusted public keys, as the config names them.

The embedded default makes its key pair on first use; a configured key must exist.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from .config import Config
from .errors import ConfigError
from .minisign import MinisignError, PublicKey, SecretKey, load_secret_key_file, write_key_pair


def public_path(secret: Path) -> Path:
    """Where the public half of a secret key file lives: beside it, `.pub`."""
    return secret.with_suffix(".pub")


class KeyRing:
    def __init__(self) -> None:
        self._secrets: dict[Path, SecretKey] = {}

    def secret(self, config: Config) -> SecretKey:
        path = config.signing.key
        if path not in self._secrets:
            self._secrets[path] = load_signing_key(config)
        return self._secrets[path]


def load_signing_key(config: Config) -> SecretKey:
    path = config.signing.key
    if config.embedded and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_key_pair(path, public_path(path))
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
