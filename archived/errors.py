"""Errors as values, and the one classifier that decides what a phase error means.

Phases raise whatever they raise; `classify()` is the only place that turns an
exception into "retry later" or "this job can never complete".
"""

from __future__ import annotations

import errno
from enum import StrEnum


class Kind(StrEnum):
    RECOVERABLE = "recoverable"
    FATAL = "fatal"


class ArchivedError(Exception):
    """Base of our own errors. `kind` says how the classifier treats it."""

    kind: Kind = Kind.FATAL


class ConfigError(ArchivedError):
    """The config file is missing, unparsable or invalid (exit code 78): one line a problem."""

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class JobFileError(ArchivedError):
    """A job file cannot be accepted; the message is the reason written next to it."""


class SourceError(ArchivedError):
    """A source cannot be read as the job asks (missing, outside the roots, not allowed)."""


class IntegrityError(ArchivedError):
    """Staged data does not match what its task recorded."""


class StorageError(ArchivedError):
    """A storage target could not take or return the archive."""

    def __init__(self, message: str, *, recoverable: bool) -> None:
        super().__init__(message)
        self.kind = Kind.RECOVERABLE if recoverable else Kind.FATAL


class TargetUnavailable(StorageError):
    """A storage target cannot be reached now (not mounted, no marker, off the network):
    jobs wait for it. At start, on reload and in check-config this is a warning."""

    def __init__(self, message: str) -> None:
        super().__init__(message, recoverable=True)


class TransientError(ArchivedError):
    kind = Kind.RECOVERABLE


class NoSpace(TransientError):
    """A file system has less room than a step needs: told before the step writes."""


# OS errors that say "the world is not ready yet", not "this request is wrong".
RECOVERABLE_ERRNOS: frozenset[int] = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.EAGAIN,
        errno.EBUSY,
        errno.ETIMEDOUT,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ESTALE,
        errno.ENOTCONN,  # a FUSE or network mount whose server went away
        errno.EHOSTDOWN,
        errno.EINTR,
        errno.EROFS,
        errno.ENOMEM,
        errno.EMFILE,  # this process, or the system, is out of file descriptors for now
        errno.ENFILE,
    }
)


def classify(exc: BaseException) -> Kind:
    """Recoverable or fatal: the single decision point for every phase error."""
    if isinstance(exc, BaseExceptionGroup):  # fatal if any part of it is
        kinds = {classify(e) for e in exc.exceptions}
        return Kind.FATAL if Kind.FATAL in kinds else Kind.RECOVERABLE
    if isinstance(exc, ArchivedError):
        return exc.kind
    if isinstance(exc, TimeoutError):
        return Kind.RECOVERABLE
    if isinstance(exc, OSError):
        return Kind.RECOVERABLE if exc.errno in RECOVERABLE_ERRNOS else Kind.FATAL
    if _queue_may_pass(exc):
        return Kind.RECOVERABLE
    return Kind.FATAL


# The queue's database: full, busy, locked, an I/O error (SQLite, by the error's name);
# out of room or resources, or the connection lost (PostgreSQL, by SQLSTATE class).
RECOVERABLE_SQLITE = frozenset({"SQLITE_FULL", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR"})
RECOVERABLE_SQLSTATE_CLASSES = frozenset({"08", "53", "57"})


def _queue_may_pass(exc: BaseException) -> bool:
    name = getattr(exc, "sqlite_errorname", None)
    if isinstance(name, str):
        return name in RECOVERABLE_SQLITE or name.startswith("SQLITE_IOERR_")
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str):
        return state[:2] in RECOVERABLE_SQLSTATE_CLASSES
    # psycopg's own: the connection lost or never made (the server gone, a pool timeout)
    # has no SQLSTATE; its class is OperationalError (psycopg is an optional import)
    return any(
        c.__name__ == "OperationalError" and c.__module__.startswith("psycopg")
        for c in type(exc).__mro__
    )


def describe(exc: BaseException) -> str:
    """One line for the job's `error` field and the history."""
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return "; ".join(describe(e) for e in exc.exceptions)
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
