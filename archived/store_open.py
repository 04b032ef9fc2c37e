"""Opening the configured queue store: SQLite in `daemon.state_dir`, or PostgreSQL at
`[queue] url` (the `postgres` extra, imported only then).

Above `store` and its backends, which import `store` for the rows they return.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from .store import SQLITE_FILE, StateReader, Store, StoreUnavailable
from .store_sqlite import SqliteStateReader, SqliteStore

if TYPE_CHECKING:
    from .config import Config


def host_id(config: Config) -> str:
    return config.queue.host_id or f"{socket.gethostname()}:{config.daemon.state_dir}"


async def open_store(config: Config, *, create: bool = True) -> Store | None:
    """The configured queue store, migrated; None when `create` is off and there is no
    queue yet (an SQLite file no daemon made)."""
    if config.queue.url:
        from .store_pg import PgStore  # the `postgres` extra: only imported when used

        return await PgStore.open(config, host_id(config))
    path = config.daemon.state_dir / SQLITE_FILE
    if not create and not path.exists():
        return None
    return await SqliteStore.open(path, host_id(config))


async def move_queue(config: Config) -> dict[str, int]:
    """Copy the SQLite queue of `daemon.state_dir` into the empty PostgreSQL queue of
    `[queue] url`, in one transaction; rows copied, by table. The jobs in flight become
    this host's (its host_id): the daemon started on the new queue resumes them."""
    from .store_pg import PgStore

    path = config.daemon.state_dir / SQLITE_FILE
    if not path.exists():
        raise StoreUnavailable(f"no SQLite queue at {path}")
    source = await SqliteStore.open(path, host_id(config))
    try:
        rows = await source.export()
    finally:
        await source.close()
    target = await PgStore.open(config, host_id(config))
    try:
        return await target.load(rows)
    finally:
        await target.close()


def open_state_reader(config: Config) -> StateReader:
    if config.queue.url:
        from .store_pg import PgStateReader

        return PgStateReader(config.queue.url)
    return SqliteStateReader(config.daemon.state_dir / SQLITE_FILE)
