"""Objects of the `s3` driver in and out: one PUT or a multipart upload (every part with
its Content-MD5, aborted when it fails), an object from an earlier try adopted when it
reads back as this archive, unfinished uploads of an interrupted attempt aborted, and
the read-back that hashes (or writes) the whole object in batches off the event loop.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
from collections.abc import Callable
from typing import Any

import anyio
import structlog
from botocore.exceptions import BotoCoreError, ClientError

from .. import cpus
from ..errors import StorageError
from ..fileio import BUFFER_SIZE, Parts, read_parts
from .s3_client import Bucket, MiB, describe, error_code, is_missing

log = structlog.get_logger(component="storage.s3")

MAX_PARTS = 10_000
READ_CHUNK = BUFFER_SIZE  # network reads of the read-back
BATCH = 8 * MiB  # read-back bytes hashed (or written) per trip to a worker thread


def _read_part(archive: Parts, offset: int, length: int, digest: Any) -> tuple[bytes, str]:
    """One part of the archive and its Content-MD5; updates the running sha256."""
    with cpus.bulk(length):
        data = read_parts(archive, offset, length)
        digest.update(data)
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
    return data, md5


async def exists(b: Bucket, name: str) -> bool:
    try:
        await b.s3.head_object(Bucket=b.opts.bucket, Key=name)
    except ClientError as exc:
        if is_missing(exc):
            return False
        raise
    return True


async def adoptable(b: Bucket, name: str, sha256: str, size: int) -> bool:
    """An object already at `name` that is this archive: same size, digest, bytes."""
    try:
        head = await b.s3.head_object(Bucket=b.opts.bucket, Key=name)
    except ClientError as exc:
        if is_missing(exc):
            return False
        raise
    if head.get("ContentLength") != size or head.get("Metadata", {}).get("sha256") != sha256:
        return False
    got = await read_back(b, name)
    if got == (sha256, size):
        return True
    log.warning(
        "s3: the object in place does not read back as its metadata says; replacing it",
        target=b.target,
        path=b.url(name),
    )
    return False


async def abort_uploads(b: Bucket, name: str) -> int:
    """Abort multipart uploads of `name` that an interrupted attempt left behind."""
    aborted = 0
    try:
        paginator = b.s3.get_paginator("list_multipart_uploads")
        async for page in paginator.paginate(Bucket=b.opts.bucket, Prefix=name):
            for upload in page.get("Uploads", []):
                if upload.get("Key") != name or "UploadId" not in upload:
                    continue
                with contextlib.suppress(ClientError):  # NoSuchUpload: gone already
                    await b.s3.abort_multipart_upload(
                        Bucket=b.opts.bucket, Key=name, UploadId=upload["UploadId"]
                    )
                aborted += 1
    except ClientError as exc:
        if error_code(exc) not in ("AccessDenied", "NotImplemented"):
            raise
        # Not allowed to list them (s3:ListBucketMultipartUploads) or not
        # supported by this server: a lifecycle rule has to clean them up.
        log.warning(
            "s3: cannot list unfinished multipart uploads",
            target=b.target,
            path=b.url(name),
            error=describe(exc),
        )
    if aborted:
        log.info("s3: aborted unfinished uploads", target=b.target, count=aborted)
    return aborted


async def put_single(
    b: Bucket, archive: Parts, name: str, sha256: str, size: int, headers: Any
) -> None:
    digest = hashlib.sha256()
    data, md5 = await anyio.to_thread.run_sync(_read_part, archive, 0, size, digest)
    check_source(b.target, archive, digest, sha256)
    await b.s3.put_object(
        Bucket=b.opts.bucket,
        Key=name,
        Body=data,
        ContentLength=size,
        ContentMD5=md5,
        ContentType="application/x-tar",
        Metadata={"sha256": sha256},
        **headers,
    )


async def put_multipart(
    b: Bucket, archive: Parts, name: str, sha256: str, size: int, headers: Any
) -> None:
    part_size = max(b.opts.part_size, math.ceil(size / MAX_PARTS))
    bucket = b.opts.bucket
    upload = await b.s3.create_multipart_upload(
        Bucket=bucket,
        Key=name,
        ContentType="application/x-tar",
        Metadata={"sha256": sha256},
        **headers,
    )
    upload_id = upload["UploadId"]
    try:
        digest = hashlib.sha256()
        parts: list[dict[str, Any]] = []
        for number, offset in enumerate(range(0, size, part_size), start=1):
            length = min(part_size, size - offset)
            data, md5 = await anyio.to_thread.run_sync(_read_part, archive, offset, length, digest)
            answer = await b.s3.upload_part(
                Bucket=bucket,
                Key=name,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ContentLength=length,
                ContentMD5=md5,
            )
            del data
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        check_source(b.target, archive, digest, sha256)
        await b.s3.complete_multipart_upload(
            Bucket=bucket,
            Key=name,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
        )
    except BaseException:
        with anyio.CancelScope(shield=True):
            try:
                await b.s3.abort_multipart_upload(Bucket=bucket, Key=name, UploadId=upload_id)
            except (ClientError, BotoCoreError) as exc:
                log.warning(
                    "s3: cannot abort the multipart upload; the next attempt will",
                    target=b.target,
                    path=b.url(name),
                    error=describe(exc),
                )
        raise


def check_source(target: str, archive: Parts, digest: Any, sha256: str) -> None:
    if digest.hexdigest() != sha256:
        raise StorageError(
            f"storage.{target}: the staged archive ({archive[0].parent}) "
            f"does not match its sha256 {sha256}",
            recoverable=True,
        )


async def stream(b: Bucket, name: str, consume: Callable[[list[bytes]], None]) -> int | None:
    """Read the object through `consume` in batches, in a worker thread; its size.

    None if there is no such object.
    """
    try:
        answer = await b.s3.get_object(Bucket=b.opts.bucket, Key=name)
    except ClientError as exc:
        if is_missing(exc):
            return None
        raise
    total, pending = 0, 0
    batch: list[bytes] = []
    async with answer["Body"] as body:
        while chunk := await body.read(READ_CHUNK):
            batch.append(chunk)
            pending += len(chunk)
            total += len(chunk)
            if pending >= BATCH:
                await anyio.to_thread.run_sync(consume, batch)
                batch, pending = [], 0
    if batch:
        await anyio.to_thread.run_sync(consume, batch)
    return total


async def read_back(b: Bucket, name: str) -> tuple[str, int] | None:
    """The sha256 and size of the object as it reads back; None if it is not there."""
    digest = hashlib.sha256()

    def update(batch: list[bytes]) -> None:
        for chunk in batch:
            digest.update(chunk)

    size = await stream(b, name, update)
    return None if size is None else (digest.hexdigest(), size)
