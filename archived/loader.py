"""Loading the config: find the file, parse it, check it against the drivers and the
job file schema.

`config` is the schema alone; this module sits above it, the drivers and `jobfile`,
so that checking a storage target's options or a schedule's job template needs no
import back into `config`.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .config import Config, SourcesConfig, StorageConfig, error_lines
from .drivers import DriverNotInstalled, storage_driver
from .errors import ConfigError, JobFileError
from .jobfile import NAME_PATTERN, parse_job


def data_home() -> Path:
    """Where the embedded default keeps everything."""
    if explicit := os.environ.get("ARCHIVED_HOME"):
        return Path(explicit).absolute()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "archived"


def embedded_default() -> Config:
    home = data_home()
    raw = {
        "daemon": {"state_dir": str(home / "state"), "spool_dir": str(home / "spool")},
        "signing": {"key": str(home / "signing.key")},
        "sources": {"allowed_roots": [str(home / "sources")]},
        "storage": {"local": {"driver": "localdir", "path": str(home / "archive"), "create": True}},
    }
    return _build(raw, base=home, source=None, embedded=True)


# Where an installation keeps its config (`archived init`, the systemd unit).
SYSTEM_CONFIG = Path("/etc/archived/archived.toml")


def config_path(cli_path: str | None, system: Path | None = SYSTEM_CONFIG) -> Path | None:
    """The config to use: `--config`, else $ARCHIVED_CONFIG, else the installation's at
    `system` if there is one (so the commands an operator runs on the host see what the
    service sees), else None: the embedded default."""
    explicit = cli_path or os.environ.get("ARCHIVED_CONFIG")
    if explicit:
        return Path(explicit)
    return system if system is not None and system.exists() else None


def load(path: Path | None) -> Config:
    """The config at `path`, or the embedded default when there is none."""
    if path is None:
        return embedded_default()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return build(raw, source=path)


def build(raw: Mapping[str, Any], *, source: Path) -> Config:
    """The config a file at `source` holding `raw` (its parsed TOML) stands for."""
    return _build(raw, base=source.absolute().parent, source=source, embedded=False)


def _build(raw: Mapping[str, Any], *, base: Path, source: Path | None, embedded: bool) -> Config:
    where = str(source) if source else "embedded default"
    try:
        config = Config.model_validate({**raw, "source": source, "embedded": embedded})
    except ValidationError as exc:
        raise ConfigError(*(f"{where}: {line}" for line in error_lines(exc))) from None
    config = _absolute(config, base)
    problems = [*_target_problems(config), *_schedule_problems(config)]
    if problems:
        raise ConfigError(*(f"{where}: {line}" for line in problems))
    return config


def _schedule_problems(config: Config) -> list[str]:
    problems = []
    for name, schedule in config.schedules.items():
        try:
            parse_job(json.dumps(schedule.job, default=str).encode(), "template.json", config)
        except JobFileError as exc:
            problems.append(f"schedules.{name}.job: {exc}")
    return problems


def _absolute(config: Config, base: Path) -> Config:
    def fix(p: Path) -> Path:
        return p if p.is_absolute() else (base / p)

    daemon = config.daemon.model_copy(
        update={
            "state_dir": fix(config.daemon.state_dir),
            "spool_dir": fix(config.daemon.spool_dir),
        }
    )
    signing = config.signing.model_copy(
        update={
            "key": fix(config.signing.key),
            "public_keys": [fix(p) for p in config.signing.public_keys],
            "tsa_ca": fix(config.signing.tsa_ca) if config.signing.tsa_ca else None,
        }
    )
    sources = SourcesConfig(allowed_roots=[fix(p) for p in config.sources.allowed_roots])
    metrics = config.metrics.model_copy(
        update={"textfile": fix(config.metrics.textfile) if config.metrics.textfile else None}
    )
    storage = {}
    for name, section in config.storage.items():
        extra = dict(section.model_extra or {})
        if isinstance(extra.get("path"), str):
            extra["path"] = str(fix(Path(extra["path"])))
        storage[name] = StorageConfig(driver=section.driver, **extra)
    return config.model_copy(
        update={
            "daemon": daemon,
            "signing": signing,
            "sources": sources,
            "storage": storage,
            "metrics": metrics,
        }
    )


def _target_problems(config: Config) -> list[str]:
    if not config.storage:
        return ["storage: at least one [storage.NAME] target is needed"]
    problems = []
    for name, section in config.storage.items():
        if not re.match(NAME_PATTERN, name) or set(name) == {"."}:
            problems.append(
                f'storage."{name}": a target name is 1 to 100 of A-Z a-z 0-9 . _ - '
                "and not only dots (job files name it)"
            )
            continue
        try:
            storage_driver(section.driver).options(config.storage_options(name))
        except KeyError:
            problems.append(f"storage.{name}.driver: unknown storage driver {section.driver!r}")
        except DriverNotInstalled as exc:
            problems.append(f"storage.{name}.driver: the {section.driver} driver {exc}")
        except ValidationError as exc:
            problems += [f"storage.{name}.{line}" for line in error_lines(exc)]
    return problems
