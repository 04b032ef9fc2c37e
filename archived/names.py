"""Names one file system tells apart and another does not.

Two payload names equal after Unicode normalization (NFC and NFD), or differing only in
case, are two files in a tar and on Linux, but one on a case-insensitive or normalizing
file system (macOS, Windows), and bsdtar keeps only one of them when it extracts.
`Collisions` finds them among any number of names with flat memory: the names go to a
table in a temporary SQLite file, which SQLite groups on disk.
"""

from __future__ import annotations

import sqlite3
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

# SQLite's page cache per temporary database; what does not fit waits in its file.
CACHE_KIB = 1024


def temporary_db(path: Path | None = None, *, memory: bool = False) -> sqlite3.Connection:
    """A private SQLite database in a temporary file, deleted when it is closed (at
    `path`, if given: the caller deletes it), or all in memory (`memory`: for a few
    names, where a file would cost more than the names).

    Nothing in it must survive a crash, so it keeps no journal and never syncs.
    """
    if path is not None:
        path.unlink(missing_ok=True)  # from an earlier try
    where = ":memory:" if memory else str(path or "")
    db = sqlite3.connect(where, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("PRAGMA synchronous = OFF")
    db.execute("PRAGMA temp_store = FILE")
    db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    return db


def fold(path: str) -> str:
    """`path` as a case-insensitive, normalizing file system compares it."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", path).casefold())


class Collisions:
    """Names that would collide on extraction, from any number of names.

    `add()` them, then read `groups()`; `alike()` gives the names that collide with one
    name. Uses `db` (a `temporary_db()`) if given, else a database of its own: in
    memory with `memory`, else in a file (at `path` if given).
    """

    def __init__(
        self,
        db: sqlite3.Connection | None = None,
        *,
        path: Path | None = None,
        memory: bool = False,
    ) -> None:
        self.owned, self.path = db is None, None if memory else path
        self.db = temporary_db(self.path, memory=memory) if db is None else db
        # `fold` is NULL where it equals the name (most names): half the file.
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS names (path TEXT PRIMARY KEY, fold TEXT) WITHOUT ROWID"
        )
        self.indexed = False

    def close(self) -> None:
        if self.owned:
            self.db.close()
            if self.path is not None:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> Collisions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, paths: Iterable[str]) -> None:
        rows = ((p, f if (f := fold(p)) != p else None) for p in paths)
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR IGNORE INTO names VALUES (?, ?)", rows)
        self.db.execute("COMMIT")

    def _index(self) -> None:
        if not self.indexed:
            self.db.execute("CREATE INDEX names_fold ON names (coalesce(fold, path))")
            self.indexed = True

    def groups(self) -> Iterator[list[str]]:
        """Each set of two or more names that collide, sorted, in the order of their
        folded form."""
        self._index()
        rows = self.db.execute(
            "SELECT group_concat(path, char(0)) FROM names GROUP BY coalesce(fold, path)"
            " HAVING count(*) > 1 ORDER BY coalesce(fold, path)"
        )
        for (paths,) in rows:
            yield sorted(paths.split("\0"))

    def alike(self, path: str) -> list[str]:
        """The names added that collide with `path` (and are not `path`)."""
        self._index()
        rows = self.db.execute(
            "SELECT path FROM names WHERE coalesce(fold, path) = ? AND path != ?",
            (fold(path), path),
        )
        return sorted(p for (p,) in rows)


def collision_warning(paths: list[str]) -> str:
    return (
        f"{', '.join(map(repr, paths))}: names differ only in case or Unicode "
        "normalization; would collide on a case-insensitive file system"
    )
