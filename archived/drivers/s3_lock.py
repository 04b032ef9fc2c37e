"""Object Lock on the `s3` driver's objects: the upload's retention and legal hold, read
back and set again where a server did not keep them, and deleting every version of an
object once none is locked or held (on a versioned bucket a plain delete only hides it).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from ..errors import StorageError
from .base import Lock
from .s3_client import Bucket, S3Options, error_code


def _seconds(moment: datetime | None) -> datetime:
    """A lock date to the second (servers keep no more), the earliest when there is none."""
    if moment is None:
        return datetime.min.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(microsecond=0)


async def lockable(b: Bucket) -> bool:
    """Whether the bucket has Object Lock turned on."""
    try:
        answer = await b.s3.get_object_lock_configuration(Bucket=b.opts.bucket)
    except ClientError as exc:
        if error_code(exc) in ("ObjectLockConfigurationNotFoundError", "404"):
            return False
        raise
    return answer.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"


def lock_headers(opts: S3Options, lock: Lock) -> dict[str, Any]:
    """The upload's Object Lock parameters; none on a target without object_lock."""
    headers: dict[str, Any] = {}
    if opts.object_lock and lock.until is not None:
        headers |= {
            "ObjectLockMode": opts.object_lock,
            "ObjectLockRetainUntilDate": lock.until,
        }
    if opts.object_lock and lock.legal_hold:
        headers["ObjectLockLegalHoldStatus"] = "ON"
    return headers


async def keep_lock(b: Bucket, name: str, lock: Lock) -> None:
    """Read the object's lock back and set what is missing: a server may ignore the
    upload's Object Lock headers (on a multipart upload, say), and an object adopted
    from an earlier try was locked for that try's date. A lock that does not stick
    is an error: the copy would not be what the target promises."""
    if not lock_headers(b.opts, lock):
        return
    for attempt in (1, 2):
        head = await b.s3.head_object(Bucket=b.opts.bucket, Key=name)
        retain = lock.until is not None and not (
            head.get("ObjectLockMode") == b.opts.object_lock
            and _seconds(head.get("ObjectLockRetainUntilDate")) >= _seconds(lock.until)
        )
        hold = lock.legal_hold and head.get("ObjectLockLegalHoldStatus") != "ON"
        if not (retain or hold):
            return
        if attempt == 2:
            raise StorageError(
                f"storage.{b.target}: {b.url(name)} does not keep its Object Lock "
                f"({b.opts.object_lock} until {lock.until}"
                f"{', legal hold' if lock.legal_hold else ''})",
                recoverable=False,
            )
        version = head.get("VersionId")
        where: dict[str, Any] = {"VersionId": version} if version else {}
        if retain:
            assert lock.until is not None and b.opts.object_lock is not None
            await b.s3.put_object_retention(
                Bucket=b.opts.bucket,
                Key=name,
                Retention={"Mode": b.opts.object_lock, "RetainUntilDate": lock.until},
                **where,
            )
        if hold:
            await b.s3.put_object_legal_hold(
                Bucket=b.opts.bucket, Key=name, LegalHold={"Status": "ON"}, **where
            )


async def all_versions(b: Bucket, name: str) -> list[tuple[str | None, bool]]:
    """Every version of `name` (version id, whether it is a delete marker)."""
    found: list[tuple[str | None, bool]] = []
    paginator = b.s3.get_paginator("list_object_versions")
    async for page in paginator.paginate(Bucket=b.opts.bucket, Prefix=name):
        for kind, marker in (("Versions", False), ("DeleteMarkers", True)):
            for entry in page.get(kind, []):  # type: ignore[attr-defined]
                if entry.get("Key") == name:
                    found.append((entry.get("VersionId"), marker))
    return found


async def delete_versions(b: Bucket, name: str) -> bool:
    """Remove every version of `name`, once none is locked or held any more: on a
    versioned bucket a plain delete only hides the object behind a marker."""
    versions = await all_versions(b, name)
    now = datetime.now(UTC)
    for version, marker in versions:
        if marker or version is None:
            continue
        head = await b.s3.head_object(Bucket=b.opts.bucket, Key=name, VersionId=version)
        until = head.get("ObjectLockRetainUntilDate")
        held = head.get("ObjectLockLegalHoldStatus") == "ON"
        if held or (until is not None and until > now):
            why = "under an S3 legal hold" if held else f"under Object Lock until {until}"
            raise StorageError(
                f"storage.{b.target}: {b.url(name)} is {why}: it is deleted once that has passed",
                recoverable=True,
            )
    for version, _ in versions:
        if version is None:  # a server that keeps no versions after all
            await b.s3.delete_object(Bucket=b.opts.bucket, Key=name)
        else:
            await b.s3.delete_object(Bucket=b.opts.bucket, Key=name, VersionId=version)
    return any(not marker for _, marker in versions)
