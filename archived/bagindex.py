"""Where `verify` keeps a bag's payload files and manifest lines: SQLite in a temporary
file, so that memory stays flat in the number of members (a bag of a million files is
checked in well under 150 MB), and the queries that hold them against each other.

Only this module holds SQL for it. Paths are bag-relative; digests are bytes, keyed by
`Algorithm.key` (one name for each algorithm however a manifest spells it).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from .names import Collisions, temporary_db

BATCH = 4096

SCHEMA = """
CREATE TABLE member (                 -- what data/ holds
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    form TEXT,                        -- its NFC form, where that differs
    size INTEGER NOT NULL,
    loc INTEGER,                      -- where the source finds it again (tar: data offset)
    regular INTEGER NOT NULL,         -- 0: present, but not a regular file (reported)
    sparse INTEGER NOT NULL,
    hashed TEXT NOT NULL,             -- the algorithm keys its digests are known for
    link INTEGER,                     -- a tar's hard link: the member whose data it has
    dup INTEGER NOT NULL DEFAULT 0    -- further members by that name (reported)
);
CREATE TABLE digest (
    member INTEGER NOT NULL, algorithm TEXT NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (member, algorithm)
) WITHOUT ROWID;
CREATE TABLE manifest (id INTEGER PRIMARY KEY, name TEXT NOT NULL, algorithm TEXT, tag INTEGER);
CREATE TABLE entry (                  -- a manifest's lines for payload files
    manifest INTEGER NOT NULL,
    path TEXT NOT NULL,               -- decoded and normalized
    raw TEXT,                         -- as written, where that differs
    form TEXT,                        -- NFC form of path, where that differs
    value BLOB NOT NULL,
    member INTEGER,                   -- the member it names, once resolved
    how TEXT,                         -- NULL: by its path; 'raw', 'form': by the other
    dup INTEGER NOT NULL DEFAULT 0,   -- further lines for the path, with the same digest
    conflict INTEGER NOT NULL DEFAULT 0,  -- ... with another digest
    PRIMARY KEY (manifest, path)
) WITHOUT ROWID;
CREATE TABLE fetch (path TEXT PRIMARY KEY, length INTEGER, dup INTEGER NOT NULL DEFAULT 0)
    WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Rehash:
    """A payload file to read again, and the algorithms (keys) it still needs."""

    id: int
    path: str
    loc: int | None
    size: int
    sparse: bool
    algorithms: frozenset[str]


def _nfc(path: str) -> str | None:
    form = unicodedata.normalize("NFC", path)
    return form if form != path else None


class PayloadIndex:
    def __init__(self) -> None:
        self.db = temporary_db()
        self.db.executescript(SCHEMA)
        self.names = Collisions(self.db)
        self._members: list[tuple[object, ...]] = []
        self._digests: list[tuple[int, str, bytes]] = []
        self._next_id = 0
        # The algorithm keys every payload file was hashed with as it was read.
        self.hashed_by_all: frozenset[str] | None = None

    def close(self) -> None:
        self.db.close()

    # -- members -----------------------------------------------------------------------

    def add(
        self,
        path: str,
        *,
        size: int = 0,
        loc: int | None = None,
        regular: bool = True,
        sparse: bool = False,
        digests: Mapping[str, bytes] | None = None,
        link: int | None = None,
    ) -> None:
        """A member; a hard link (`link`: the member it links to) has that member's data,
        size and digests."""
        self._next_id += 1
        digests = digests or {}
        keys = frozenset(digests)
        if regular and link is None:
            self.hashed_by_all = keys if self.hashed_by_all is None else self.hashed_by_all & keys
        self._members.append(
            (
                *(self._next_id, path, _nfc(path), size, loc, regular, sparse),
                *(",".join(sorted(keys)), link),
            )
        )
        self._digests += [(self._next_id, k, v) for k, v in digests.items()]
        if len(self._members) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if not self._members:
            return
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT INTO member (id, path, form, size, loc, regular, sparse, hashed, link)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (path) DO UPDATE SET dup = dup + 1",
            self._members,
        )
        # A duplicate's digests stay under its own id, which no member row has.
        self.db.executemany("INSERT INTO digest VALUES (?, ?, ?)", self._digests)
        self.db.execute("COMMIT")
        self.names.add(m[1] for m in self._members if m[5])  # type: ignore[misc]
        self._members.clear()
        self._digests.clear()

    def finish(self) -> None:
        """All members are in: index them for the queries."""
        self.flush()
        self.db.execute("CREATE INDEX member_form ON member (coalesce(form, path))")

    def totals(self) -> tuple[int, int]:
        """(files, bytes) of the regular payload files."""
        files, size = self.db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM member WHERE regular"
        ).fetchone()
        return files, size

    def any(self) -> bool:
        return self.db.execute("SELECT 1 FROM member LIMIT 1").fetchone() is not None

    def paths(self) -> Iterator[str]:
        """The regular payload files' paths."""
        return (p for (p,) in self.db.execute("SELECT path FROM member WHERE regular"))

    def duplicates(self) -> list[str]:
        return [p for (p,) in self.db.execute("SELECT path FROM member WHERE dup ORDER BY path")]

    def linkable(self, path: str) -> tuple[int, int] | None:
        """(id, size) of the regular member at `path` a hard link has the data of (that of
        the member it links to in turn), if there is one."""
        self.flush()
        row = self.db.execute(
            "SELECT coalesce(link, id), size FROM member WHERE path = ? AND regular", (path,)
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def share_linked(self) -> None:
        """Give each hard link the digests of the member whose data it has."""
        self.db.execute("BEGIN")
        self.db.execute(
            "INSERT OR REPLACE INTO digest SELECT m.id, d.algorithm, d.value"
            " FROM member AS m JOIN digest AS d ON d.member = m.link"
        )
        self.db.execute("COMMIT")

    def lookup(self, path: str) -> tuple[int, bool] | None:
        """(id, regular) of the member at `path`, if there is one."""
        row = self.db.execute("SELECT id, regular FROM member WHERE path = ?", (path,)).fetchone()
        return None if row is None else (row[0], bool(row[1]))

    def digest(self, member: int, algorithm: str) -> bytes | None:
        row = self.db.execute(
            "SELECT value FROM digest WHERE member = ? AND algorithm = ?", (member, algorithm)
        ).fetchone()
        return None if row is None else bytes(row[0])

    # -- manifests ---------------------------------------------------------------------

    def add_manifest(self, name: str, algorithm: str | None, *, tag: bool) -> int:
        """A manifest, its algorithm's key (None: one we cannot compute); returns its id."""
        cursor = self.db.execute(
            "INSERT INTO manifest (name, algorithm, tag) VALUES (?, ?, ?)", (name, algorithm, tag)
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def add_entries(self, manifest: int, entries: Iterable[tuple[str, str, bytes]]) -> None:
        """(path, as written, digest) lines of a manifest, streamed in batches."""
        rows = (
            (manifest, path, raw if raw != path else None, _nfc(path), value)
            for path, raw, value in entries
        )
        insert = (
            "INSERT INTO entry (manifest, path, raw, form, value) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (manifest, path) DO UPDATE SET"
            " dup = dup + (excluded.value = value), conflict = conflict + (excluded.value != value)"
        )
        while batch := [row for _, row in zip(range(BATCH), rows, strict=False)]:
            self.db.execute("BEGIN")
            self.db.executemany(insert, batch)
            self.db.execute("COMMIT")

    def resolve(self) -> None:
        """Match every manifest line to a member: by its path; else, as written (a "%"
        left unencoded); else by Unicode normalization, if the member's own name is not
        listed too."""
        self.db.execute("BEGIN")
        self.db.execute("UPDATE entry SET member = m.id FROM member AS m WHERE m.path = entry.path")
        self.db.execute(
            "UPDATE entry SET member = m.id, how = 'raw' FROM member AS m"
            " WHERE entry.member IS NULL AND entry.raw IS NOT NULL AND m.path = entry.raw"
        )
        self.db.execute(
            "UPDATE entry SET member = m.id, how = 'form' FROM member AS m"
            " WHERE entry.member IS NULL"
            " AND coalesce(m.form, m.path) = coalesce(entry.form, entry.path)"
            " AND NOT EXISTS (SELECT 1 FROM entry AS e"
            "                 WHERE e.manifest = entry.manifest AND e.path = m.path)"
        )
        self.db.execute("CREATE INDEX entry_member ON entry (manifest, member)")
        self.db.execute("COMMIT")

    def to_rehash(self) -> Iterator[Rehash]:
        """Payload files that a manifest with a computable algorithm lists, but that were
        not hashed with it as they were read (the manifest came later), in source order."""
        needed = {
            a
            for (a,) in self.db.execute(
                "SELECT DISTINCT algorithm FROM manifest AS f WHERE algorithm IS NOT NULL"
                " AND EXISTS (SELECT 1 FROM entry WHERE entry.manifest = f.id)"
            )
        }
        if self.hashed_by_all is not None and needed <= self.hashed_by_all:
            return
        # A hard link's data is read where the member it links to is.
        self.db.execute(
            "CREATE TEMP TABLE rehash AS"
            " SELECT m.id, m.path, m.loc, m.size, m.sparse, m.hashed,"
            "        group_concat(DISTINCT f.algorithm) AS wanted"
            " FROM entry AS e JOIN manifest AS f ON f.id = e.manifest"
            " JOIN member AS listed ON listed.id = e.member"
            " JOIN member AS m ON m.id = coalesce(listed.link, listed.id)"
            " WHERE f.algorithm IS NOT NULL AND m.regular"
            " GROUP BY m.id ORDER BY m.loc, m.id"
        )
        for id_, path, loc, size, sparse, hashed, wanted in self.db.execute(
            "SELECT * FROM temp.rehash"
        ):
            missing = frozenset(wanted.split(",")) - frozenset(hashed.split(","))
            if missing:
                yield Rehash(id_, path, loc, size, bool(sparse), missing)
        self.db.execute("DROP TABLE temp.rehash")

    def add_digests(self, rows: Iterable[tuple[int, str, bytes]]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR REPLACE INTO digest VALUES (?, ?, ?)", rows)
        self.db.execute("COMMIT")

    def unresolved(self, manifest: int) -> Iterator[tuple[str, bytes]]:
        """(path, digest) of the lines that name no member."""
        rows = self.db.execute(
            "SELECT path, value FROM entry WHERE manifest = ? AND member IS NULL ORDER BY path",
            (manifest,),
        )
        return ((p, bytes(v)) for p, v in rows)

    def renamed(self, manifest: int) -> Iterator[tuple[str, str, str]]:
        """(how, path as listed, member's path) for lines matched not by their path."""
        return iter(
            self.db.execute(
                "SELECT e.how, coalesce(e.raw, e.path), m.path FROM entry AS e"
                " JOIN member AS m ON m.id = e.member"
                " WHERE e.manifest = ? AND e.how IS NOT NULL ORDER BY e.path",
                (manifest,),
            )
        )

    def repeated(self, manifest: int) -> Iterator[tuple[str, bool]]:
        """(path, with a conflicting digest) of the paths a manifest lists twice."""
        rows = self.db.execute(
            "SELECT path, conflict > 0 FROM entry WHERE manifest = ? AND (dup OR conflict)"
            " ORDER BY path",
            (manifest,),
        )
        return ((p, bool(c)) for p, c in rows)

    def compared(self, manifest: int, algorithm: str) -> Iterator[tuple[str, bytes, bytes | None]]:
        """(member path, listed digest, computed digest or None) where they differ."""
        rows = self.db.execute(
            "SELECT m.path, e.value, d.value FROM entry AS e"
            " JOIN member AS m ON m.id = e.member AND m.regular"
            " LEFT JOIN digest AS d ON d.member = m.id AND d.algorithm = ?"
            " WHERE e.manifest = ? AND (d.value IS NULL OR d.value != e.value)"
            " ORDER BY m.path",
            (algorithm, manifest),
        )
        return ((p, bytes(e), None if d is None else bytes(d)) for p, e, d in rows)

    def unlisted(self, manifests: list[int]) -> Iterator[str]:
        """Regular payload files that none of `manifests` lists."""
        marks = ", ".join("?" * len(manifests))
        rows = self.db.execute(
            "SELECT path FROM member AS m WHERE regular AND NOT EXISTS"
            f" (SELECT 1 FROM entry AS e WHERE e.manifest IN ({marks}) AND e.member = m.id)"
            " ORDER BY path",
            manifests,
        )
        return (p for (p,) in rows)

    def listed(self, manifest: int, path: str) -> bool:
        return (
            self.db.execute(
                "SELECT 1 FROM entry WHERE manifest = ? AND path = ?", (manifest, path)
            ).fetchone()
            is not None
        )

    # -- fetch.txt ---------------------------------------------------------------------

    def add_fetch(self, rows: Iterable[tuple[str, int | None]]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT INTO fetch VALUES (?, ?, 0) ON CONFLICT (path) DO UPDATE SET dup = dup + 1",
            rows,
        )
        self.db.execute("COMMIT")

    def fetch_repeated(self) -> list[str]:
        return [p for (p,) in self.db.execute("SELECT path FROM fetch WHERE dup ORDER BY path")]

    def holes(self) -> list[tuple[str, int | None]]:
        """fetch.txt's files that are not present: (path, length or None)."""
        return list(
            self.db.execute(
                "SELECT f.path, f.length FROM fetch AS f"
                " WHERE NOT EXISTS (SELECT 1 FROM member AS m WHERE m.path = f.path)"
                " ORDER BY f.path"
            )
        )

    def fetched_not_listed(self, manifest: int) -> Iterator[str]:
        rows = self.db.execute(
            "SELECT path FROM fetch AS f WHERE NOT EXISTS"
            " (SELECT 1 FROM entry AS e WHERE e.manifest = ? AND e.path = f.path)"
            " ORDER BY path",
            (manifest,),
        )
        return (p for (p,) in rows)
