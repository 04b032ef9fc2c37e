"""The classifier: one table of what is worth retrying."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from archived.errors import (
    IntegrityError,
    Kind,
    SourceError,
    StorageError,
    TargetUnavailable,
    TransientError,
    classify,
    describe,
)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), Kind.RECOVERABLE),
        (OSError(errno.EIO, "Input/output error"), Kind.RECOVERABLE),
        (TimeoutError(), Kind.RECOVERABLE),
        (OSError(errno.ECONNREFUSED, "Connection refused"), Kind.RECOVERABLE),
        # a target that went away: an unmounted disk, a dead network file system
        (OSError(errno.ENOTCONN, "Transport endpoint is not connected"), Kind.RECOVERABLE),
        (OSError(errno.ESTALE, "Stale file handle"), Kind.RECOVERABLE),
        (OSError(errno.EHOSTDOWN, "Host is down"), Kind.RECOVERABLE),
        (OSError(errno.EROFS, "Read-only file system"), Kind.RECOVERABLE),
        (TargetUnavailable("storage.x: /mnt/x is not there"), Kind.RECOVERABLE),
        (OSError(errno.EACCES, "Permission denied"), Kind.FATAL),
        (OSError(errno.ENOENT, "No such file"), Kind.FATAL),
        (SourceError("gone"), Kind.FATAL),
        (IntegrityError("mismatch"), Kind.FATAL),
        (TransientError("later"), Kind.RECOVERABLE),
        (StorageError("full", recoverable=True), Kind.RECOVERABLE),
        (StorageError("denied", recoverable=False), Kind.FATAL),
        (ValueError("a bug"), Kind.FATAL),
        (ExceptionGroup("g", [TransientError("a"), TransientError("b")]), Kind.RECOVERABLE),
        (ExceptionGroup("g", [TransientError("a"), SourceError("b")]), Kind.FATAL),
    ],
)
def test_classify(exc: BaseException, kind: Kind) -> None:
    assert classify(exc) == kind


def test_describe_is_one_line_and_unwraps_groups() -> None:
    assert describe(OSError(errno.ENOSPC, "No space left on device", "/t/x")) == (
        "No space left on device: /t/x"
    )
    assert describe(ExceptionGroup("g", [SourceError("source /x does not exist")])) == (
        "source /x does not exist"
    )
    assert describe(ValueError("first\nsecond")) == "first"


def test_the_queue_database_busy_may_pass_a_wrong_statement_may_not(tmp_path: Path) -> None:
    """SQLite's errors are told by their name (SQLITE_FULL, SQLITE_BUSY, ...), not text."""
    path = tmp_path / "q.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (n)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError) as busy:
        other.execute("INSERT INTO t VALUES (1)")
    holder.close()
    with pytest.raises(sqlite3.OperationalError) as wrong:
        other.execute("INSERT INTO nowhere VALUES (1)")
    other.close()
    assert busy.value.sqlite_errorname == "SQLITE_BUSY"
    assert classify(busy.value) == Kind.RECOVERABLE
    assert classify(wrong.value) == Kind.FATAL


def test_a_lost_or_never_made_postgresql_connection_may_pass() -> None:
    """psycopg's own errors for a connection lost (the server restarted) or not had
    (the pool timed out) carry no SQLSTATE: they may pass, like SQLSTATE class 08; a
    wrong statement may not."""
    psycopg = pytest.importorskip("psycopg")
    pool = pytest.importorskip("psycopg_pool")
    assert classify(psycopg.OperationalError("server closed the connection")) == Kind.RECOVERABLE
    assert classify(pool.PoolTimeout("couldn't get a connection")) == Kind.RECOVERABLE
    assert classify(psycopg.errors.SyntaxError("near x")) == Kind.FATAL
    assert classify(psycopg.ProgrammingError("a bug")) == Kind.FATAL
