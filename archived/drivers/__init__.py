"""Driver registries: activity drivers make artifacts, storage drivers keep archives.

Built-in drivers are always there; a third party adds one through the entry point
groups `archived.activity_drivers` and `archived.storage_drivers`. A driver's module is
imported only when it is asked for: the `s3` driver's library (aiobotocore, the extra
`archived[s3]`) only where an s3 target is configured.
"""

from __future__ import annotations

from functools import cache
from importlib import import_module
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from .base import ActivityDriver, StorageDriver

if TYPE_CHECKING:
    from ..config import Config

_BUILTIN_ACTIVITY = {
    "files": "archived.drivers.files:FilesDriver",
    "command": "archived.drivers.command:CommandDriver",
    "sqlite": "archived.drivers.sqlite:SqliteDriver",
}
_BUILTIN_STORAGE = {
    "localdir": "archived.drivers.localdir:LocalDirDriver",
    "s3": "archived.drivers.s3:S3Driver",
}


# built-in drivers whose libraries are an optional extra of the package
_EXTRAS = {"archived.drivers.s3": "s3"}


class DriverNotInstalled(LookupError):
    """A driver whose module needs a library that is not installed."""


def _load(spec: str) -> type:
    module, _, attr = spec.partition(":")
    try:
        return getattr(import_module(module), attr)  # type: ignore[no-any-return]
    except ModuleNotFoundError as exc:
        if module not in _EXTRAS or exc.name == module:
            raise
        raise DriverNotInstalled(
            f"needs {exc.name}, which is not installed: pip install 'archived[{_EXTRAS[module]}]'"
        ) from None


@cache
def _plugins(group: str) -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=group)}


def _find(group: str, builtin: dict[str, str], name: str) -> type:
    # built-ins first: a plugin cannot shadow one, and the scan of every installed
    # package for entry points (tens of ms) is only needed for a name we do not ship
    return _load(builtin[name] if name in builtin else _plugins(group)[name])


def activity_driver(name: str) -> type[ActivityDriver]:
    """The activity driver class called `name`; KeyError if there is none,
    DriverNotInstalled if its library is missing."""
    return _find("archived.activity_drivers", _BUILTIN_ACTIVITY, name)


def storage_driver(name: str) -> type[StorageDriver]:
    """The storage driver class called `name`; KeyError if there is none,
    DriverNotInstalled if its library is missing."""
    return _find("archived.storage_drivers", _BUILTIN_STORAGE, name)


def open_storage(config: Config, target: str) -> StorageDriver:
    """The storage driver for `target` as `config` defines it."""
    driver_cls = storage_driver(config.storage[target].driver)
    return driver_cls(target, driver_cls.options(config.storage_options(target)))
