"""Moments in time as archived writes them: aware UTC `datetime`s, and their text.

One text form is kept and exchanged (the queue, event logs, job files):
`YYYY-MM-DDTHH:MM:SS.ffffffZ`, fixed width, so that text comparison is time order.
Schedule slots, which are whole seconds, are shown without the fraction; file names
carry the compact `YYYYMMDDTHHMMSSZ`.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """Fixed-width ISO 8601 UTC with microseconds: `YYYY-MM-DDTHH:MM:SS.ffffffZ`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_iso() -> str:
    return iso(utcnow())


def iso_seconds(moment: datetime) -> str:
    """ISO 8601 UTC to the second, `YYYY-MM-DDTHH:MM:SSZ`: a schedule's slot."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def compact(moment: datetime) -> str:
    """`YYYYMMDDTHHMMSSZ`, for a name: a bag's, a signature's stamp."""
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def as_datetime(value: datetime | str | None) -> datetime | None:
    """A timestamp from either backend (SQLite: text, PostgreSQL: timestamptz)."""
    if value is None or isinstance(value, datetime):
        return value
    moment = datetime.fromisoformat(value)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
