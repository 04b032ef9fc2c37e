"""The classifier: one table of what is worth retrying."""

from __future__ import annotations

import errno

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
