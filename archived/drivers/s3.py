"""Storage driver `s3`: archives as objects in an S3-compatible bucket (aiobotocore).

An object appears under its final key only through S3's own atomic PUT or
CompleteMultipartUpload, so no partial archive is ever visible there; a multipart
upload that fails or is cancelled is aborted. Every part carries its Content-MD5,
which the server checks, and the archive's sha256 travels as `x-amz-meta-sha256`.
After the upload the whole object is read back and hashed before the copy counts;
one that does not match is deleted again.

With `object_lock` (a bucket with S3 Object Lock), each archive is uploaded with its
retention date (mode GOVERNANCE or COMPLIANCE) and the job's legal hold; both are read
back with the object and set again where a server did not keep them. The bucket keeps
every version: `delete` removes all of them, never only hides the object behind a
delete marker, and refuses (recoverable) while a version is locked or held.

Credentials come from `credentials_file` when it is set (that file alone), otherwise
from the standard AWS chain of the daemon's environment (`AWS_ACCESS_KEY_ID`, ...,
`AWS_PROFILE`, the shared files, instance roles), never from a job file.

This module is the driver's contract and no more; the client and what its errors
mean are in `s3_client`, uploads and the read-back in `s3_objects`, Object Lock in
`s3_lock`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import anyio
import structlog
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    HTTPClientError,
    SSLError,
)

from .. import failpoints
from ..errors import ConfigError, StorageError, TargetUnavailable
from ..fileio import Parts, write_all
from .base import NO_LOCK, Digest, Lock, StorageDriver, StoredCopy, copy_problem, wait_digest
from .s3_client import (
    RECOVERABLE_CODES,
    Bucket,
    CredentialsError,
    S3Options,
    describe,
    error_code,
    is_recoverable,
    open_client,
    target_gone,
)
from .s3_lock import all_versions, delete_versions, keep_lock, lock_headers, lockable
from .s3_objects import (
    abort_uploads,
    adoptable,
    exists,
    put_multipart,
    put_single,
    read_back,
    stream,
)

__all__ = ["S3Driver", "S3Options", "is_recoverable"]

log = structlog.get_logger(component="storage.s3")


def _write_all(fd: int, batch: list[bytes]) -> None:
    for chunk in batch:
        write_all(fd, chunk)


class S3Driver(StorageDriver):
    Options = S3Options
    opts: S3Options

    # -- names ---------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self.opts.prefix + key

    def _url(self, name: str) -> str:
        return f"s3://{self.opts.bucket}/{name}"

    @property
    def _where(self) -> str:
        return self.opts.endpoint or f"AWS ({self.opts.region})"

    def _error(self, op: str, name: str, exc: BaseException) -> StorageError:
        return StorageError(
            f"storage.{self.target}: {op} {self._url(name)}: {describe(exc)}",
            recoverable=is_recoverable(exc),
        )

    # -- the bucket ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _bucket(self) -> AsyncIterator[Bucket]:
        async with open_client(self.opts) as s3:
            yield Bucket(s3, self.opts, self.target)

    # -- the interface -------------------------------------------------------------

    async def ready(self) -> None:
        where = f"storage.{self.target}: bucket {self.opts.bucket!r} at {self._where}"
        try:
            async with self._bucket() as b:
                await b.s3.head_bucket(Bucket=self.opts.bucket)
                if self.opts.object_lock and not await lockable(b):
                    raise ConfigError(
                        f"{where}: object_lock = {self.opts.object_lock!r}, but the bucket "
                        "has no Object Lock: turn it on for the bucket (versioning, then "
                        "put-object-lock-configuration), or leave object_lock out"
                    )
        except CredentialsError as exc:
            raise ConfigError(f"storage.{self.target}: {exc}") from None
        except ClientError as exc:
            code = error_code(exc)
            if code == "404":
                code = "NoSuchBucket"
            hint = {
                "NoSuchBucket": "the bucket does not exist",
                "AccessDenied": "the credentials may not use this bucket",
                "PermanentRedirect": "the bucket is in another region",
            }.get(code, "")
            message = f"{where}: {code}{f' ({hint})' if hint else ''}"
            if code.startswith("5") or code in RECOVERABLE_CODES:
                raise TargetUnavailable(message) from None
            raise ConfigError(message) from None
        except SSLError as exc:  # a certificate problem: configuration, not weather
            raise ConfigError(f"{where}: {describe(exc)}") from None
        except (ConnectionError, HTTPClientError) as exc:  # off the network: wait for it
            raise TargetUnavailable(f"{where}: {describe(exc)}") from None
        except BotoCoreError as exc:
            raise ConfigError(f"{where}: {describe(exc)}") from None

    async def put(
        self, archive: Parts, key: str, digest: Digest, size: int, lock: Lock = NO_LOCK
    ) -> StoredCopy:
        name = self._name(key)
        sha256 = await wait_digest(digest)  # it travels as metadata, ahead of the bytes
        copy = StoredCopy(self._url(name), size, sha256)
        headers = lock_headers(self.opts, lock)
        try:
            async with self._bucket() as b:
                if await adoptable(b, name, sha256, size):
                    await keep_lock(b, name, lock)
                    return copy  # in place from an earlier try
                await abort_uploads(b, name)
                if size > self.opts.part_size:
                    await put_multipart(b, archive, name, sha256, size, headers)
                else:
                    await put_single(b, archive, name, sha256, size, headers)
                failpoints.hit("store.after_rename")
                got = await read_back(b, name)
                if got != (sha256, size):
                    with contextlib.suppress(ClientError, BotoCoreError):
                        await b.s3.delete_object(Bucket=self.opts.bucket, Key=name)
                else:
                    await keep_lock(b, name, lock)
        except CredentialsError as exc:
            raise StorageError(f"storage.{self.target}: {exc}", recoverable=False) from None
        except (ClientError, BotoCoreError) as exc:
            raise self._error("put", name, exc) from exc
        if got != (sha256, size):
            seen = "nothing" if got is None else f"sha256 {got[0]} ({got[1]} bytes)"
            raise StorageError(
                f"storage.{self.target}: read-back of {copy.path} gave {seen}, "
                f"expected {sha256} ({size} bytes)",
                recoverable=True,
            )
        return copy

    async def check(self, key: str, sha256: str, size: int) -> str | None:
        name = self._name(key)
        url = self._url(name)
        try:
            async with self._bucket() as b:
                got = await read_back(b, name)
        except CredentialsError as exc:
            return f"unreadable: {url}: {exc}"
        except (ClientError, BotoCoreError) as exc:
            verdict = "unreachable" if target_gone(exc) else "unreadable"
            return f"{verdict}: {url}: {describe(exc)}"
        return copy_problem(url, got, sha256, size)

    async def fetch(self, key: str, dest: Path) -> None:
        name = self._name(key)
        fd = await anyio.to_thread.run_sync(
            os.open, dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
        )
        try:
            async with self._bucket() as b:
                if await stream(b, name, lambda batch: _write_all(fd, batch)) is None:
                    raise StorageError(
                        f"storage.{self.target}: fetch {self._url(name)}: NoSuchKey",
                        recoverable=False,
                    )
        except CredentialsError as exc:
            raise StorageError(f"storage.{self.target}: {exc}", recoverable=False) from None
        except (ClientError, BotoCoreError) as exc:
            raise self._error("fetch", name, exc) from exc
        finally:
            os.close(fd)

    async def delete(self, key: str) -> bool:
        name = self._name(key)
        try:
            async with self._bucket() as b:
                await abort_uploads(b, name)
                if self.opts.object_lock:
                    existed = await delete_versions(b, name)
                else:
                    existed = await exists(b, name)
                    if existed:
                        await b.s3.delete_object(Bucket=self.opts.bucket, Key=name)
        except CredentialsError as exc:
            raise StorageError(f"storage.{self.target}: {exc}", recoverable=False) from None
        except ClientError as exc:
            if error_code(exc) == "NoSuchBucket":
                # The service itself says the bucket, and so the object, is gone. (A
                # bucket that was never there does not pass ready() at start or reload.)
                log.warning(
                    "s3: the bucket is gone, so is the object",
                    target=self.target,
                    path=self._url(name),
                )
                return False
            raise self._error("delete", name, exc) from exc
        except BotoCoreError as exc:
            raise self._error("delete", name, exc) from exc
        return existed

    async def set_legal_hold(self, key: str, on: bool) -> str | None:
        if not self.opts.object_lock:
            return None
        name = self._name(key)
        status: Literal["ON", "OFF"] = "ON" if on else "OFF"
        try:
            async with self._bucket() as b:
                found = await all_versions(b, name)
                versions = [v for v, marker in found if v is not None and not marker]
                for version in versions:
                    await b.s3.put_object_legal_hold(
                        Bucket=self.opts.bucket,
                        Key=name,
                        VersionId=version,
                        LegalHold={"Status": status},
                    )
        except CredentialsError as exc:
            raise StorageError(f"storage.{self.target}: {exc}", recoverable=False) from None
        except (ClientError, BotoCoreError) as exc:
            raise self._error("legal hold", name, exc) from exc
        if not versions:
            raise StorageError(
                f"storage.{self.target}: legal hold: {self._url(name)} is not there",
                recoverable=False,
            )
        return f"storage.{self.target}: S3 legal hold {status} on {self._url(name)}"
