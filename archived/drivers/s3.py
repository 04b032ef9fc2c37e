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
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import hashlib
import math
import os
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import anyio
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    SSLError,
)
from botocore.loaders import create_loader
from pydantic import Field, StrictInt, field_validator

from .. import failpoints
from ..errors import ConfigError, StorageError, TargetUnavailable, classify
from ..fileio import BUFFER_SIZE, Parts, read_parts, write_all
from .base import (
    NO_LOCK,
    Digest,
    DriverOptions,
    Lock,
    StorageDriver,
    StoredCopy,
    copy_problem,
    wait_digest,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = structlog.get_logger(component="storage.s3")

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's floor for every part but the last
MAX_PART_SIZE = 5 * 1024 * MiB  # and its ceiling for a part or a single PUT
MAX_PARTS = 10_000
READ_CHUNK = BUFFER_SIZE  # network reads of the read-back
BATCH = 8 * MiB  # read-back bytes hashed (or written) per trip to a worker thread

# Error codes that say "try again later"; with any 5xx, 408 and 429.
RECOVERABLE_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "InternalError",
        "OperationAborted",
        "BadDigest",  # a part arrived damaged: send it again
        "XAmzContentSHA256Mismatch",
        "IncompleteBody",
        "NoSuchUpload",  # the multipart upload went away under us: start a new one
        "ExpiredToken",  # rotated credentials are read again on the next attempt
        "TokenRefreshRequired",
    }
)
# Codes that no retry fixes; everything else in 4xx is fatal too.
FATAL_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "NoSuchBucket",
        "InvalidBucketName",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
    }
)
# What a HEAD request's bare status means (HEAD responses have no error body).
HEAD_CODES = {"301": "PermanentRedirect", "400": "BadRequest", "403": "AccessDenied"}

# botocore's data loader keeps the parsed service models; sharing one across the
# short-lived sessions saves re-reading them from disk for every operation.
_LOADER = create_loader()


class S3Options(DriverOptions):
    bucket: str = Field(min_length=1, max_length=255)
    prefix: str = ""  # prepended as is: end it with "/" to make a folder
    endpoint: str | None = None  # an S3-compatible server; empty: AWS
    region: str = "us-east-1"
    credentials_file: Path | None = None  # an AWS-style shared credentials file
    profile: str | None = None  # section of credentials_file, or an AWS profile
    part_size: StrictInt = Field(default=64 * MiB, ge=MIN_PART_SIZE, le=MAX_PART_SIZE)
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    # Object Lock: every archive gets its job's retention date in this mode; off: None
    object_lock: Literal["GOVERNANCE", "COMPLIANCE"] | None = None

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if "/" in value or value != value.strip():
            raise ValueError("a bucket name, without slashes or spaces around it")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value.startswith("/"):
            raise ValueError("must not start with '/'")
        return value

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("credentials_file")
    @classmethod
    def _credentials_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value


class CredentialsError(Exception):
    """`credentials_file` cannot be used."""


def read_credentials(path: Path, profile: str) -> dict[str, str]:
    """The keys of `profile` in an AWS-style shared credentials file."""
    parser = configparser.RawConfigParser()
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise CredentialsError(f"cannot read credentials_file {path}: {exc}") from None
    if not parser.has_section(profile):
        raise CredentialsError(f"credentials_file {path} has no [{profile}] section")
    section = parser[profile]
    keys = {
        "aws_access_key_id": section.get("aws_access_key_id", "").strip(),
        "aws_secret_access_key": section.get("aws_secret_access_key", "").strip(),
    }
    if not all(keys.values()):
        needed = "aws_access_key_id and aws_secret_access_key"
        raise CredentialsError(f"credentials_file {path} [{profile}] needs {needed}")
    if token := section.get("aws_session_token", "").strip():
        keys["aws_session_token"] = token
    return keys


def error_code(exc: ClientError) -> str:
    """The service's error code; a HEAD request's bare status made into one."""
    code = str(exc.response.get("Error", {}).get("Code") or "")
    if code.isdigit() or not code:
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", code))
        return HEAD_CODES.get(status, code or status)
    return code


def is_recoverable(exc: BaseException) -> bool:
    """Whether an S3 operation that raised `exc` may succeed when tried again."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        if code in FATAL_CODES:
            return False
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in RECOVERABLE_CODES or status >= 500 or status in (408, 429)
    if isinstance(exc, SSLError):  # a certificate problem: configuration, not weather
        return False
    if isinstance(
        exc,
        ConnectionError
        | HTTPClientError
        | IncompleteReadError
        | ChecksumError
        | CredentialRetrievalError,
    ):
        return True
    return classify(exc) == "recoverable"  # timeouts and OS errors as everywhere else


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        message = exc.response.get("Error", {}).get("Message") or ""
        return f"{error_code(exc)}: {message}".rstrip(": ").splitlines()[0]
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _target_gone(exc: BaseException) -> bool:
    """The endpoint cannot be reached, or has no such bucket: nothing about the object."""
    if isinstance(exc, ClientError):
        return error_code(exc) == "NoSuchBucket"
    return isinstance(exc, ConnectionError)


def _is_missing(exc: ClientError) -> bool:
    return error_code(exc) in ("404", "NoSuchKey", "NotFound")


def _read_part(archive: Parts, offset: int, length: int, digest: Any) -> tuple[bytes, str]:
    """One part of the archive and its Content-MD5; updates the running sha256."""
    data = read_parts(archive, offset, length)
    digest.update(data)
    md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
    return data, md5


def _seconds(moment: datetime | None) -> datetime:
    """A lock date to the second (servers keep no more), the earliest when there is none."""
    if moment is None:
        return datetime.min.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(microsecond=0)


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
            f"storage.{self.target}: {op} {self._url(name)}: {_describe(exc)}",
            recoverable=is_recoverable(exc),
        )

    # -- the client ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _client(self) -> AsyncIterator[S3Client]:
        opts = self.opts
        keys: dict[str, str] = {}
        if opts.credentials_file is not None:
            keys = await anyio.to_thread.run_sync(
                read_credentials, opts.credentials_file, opts.profile or "default"
            )
            session = AioSession()
        else:
            session = AioSession(profile=opts.profile)
        session.register_component("data_loader", _LOADER)
        config = AioConfig(
            region_name=opts.region,
            signature_version="s3v4",
            s3={"addressing_style": opts.addressing_style},
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=10,
            read_timeout=60,
            # Content-MD5 is what every S3-compatible server checks; the newer
            # default checksums (CRC in aws-chunked trailers) are not.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        async with session.create_client(
            "s3",
            region_name=opts.region,
            endpoint_url=opts.endpoint,
            config=config,
            aws_access_key_id=keys.get("aws_access_key_id"),
            aws_secret_access_key=keys.get("aws_secret_access_key"),
            aws_session_token=keys.get("aws_session_token"),
        ) as client:
            yield client

    # -- the interface -------------------------------------------------------------

    async def ready(self) -> None:
        where = f"storage.{self.target}: bucket {self.opts.bucket!r} at {self._where}"
        try:
            async with self._client() as s3:
                await s3.head_bucket(Bucket=self.opts.bucket)
                if self.opts.object_lock and not await self._lockable(s3):
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
            raise ConfigError(f"{where}: {_describe(exc)}") from None
        except (ConnectionError, HTTPClientError) as exc:  # off the network: wait for it
            raise TargetUnavailable(f"{where}: {_describe(exc)}") from None
        except BotoCoreError as exc:
            raise ConfigError(f"{where}: {_describe(exc)}") from None

    async def put(
        self, archive: Parts, key: str, digest: Digest, size: int, lock: Lock = NO_LOCK
    ) -> StoredCopy:
        name = self._name(key)
        sha256 = await wait_digest(digest)  # it travels as metadata, ahead of the bytes
        copy = StoredCopy(self._url(name), size, sha256)
        headers = self._lock_headers(lock)
        try:
            async with self._client() as s3:
                if await self._adoptable(s3, name, sha256, size):
                    await self._keep_lock(s3, name, lock)
                    return copy  # in place from an earlier try
                await self._abort_uploads(s3, name)
                if size > self.opts.part_size:
                    await self._put_multipart(s3, archive, name, sha256, size, headers)
                else:
                    await self._put_single(s3, archive, name, sha256, size, headers)
                failpoints.hit("store.after_rename")
                got = await self._digest(s3, name)
                if got != (sha256, size):
                    with contextlib.suppress(ClientError, BotoCoreError):
                        await s3.delete_object(Bucket=self.opts.bucket, Key=name)
                else:
                    await self._keep_lock(s3, name, lock)
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
            async with self._client() as s3:
                got = await self._digest(s3, name)
        except CredentialsError as exc:
            return f"unreadable: {url}: {exc}"
        except (ClientError, BotoCoreError) as exc:
            verdict = "unreachable" if _target_gone(exc) else "unreadable"
            return f"{verdict}: {url}: {_describe(exc)}"
        return copy_problem(url, got, sha256, size)

    async def fetch(self, key: str, dest: Path) -> None:
        name = self._name(key)
        fd = await anyio.to_thread.run_sync(
            os.open, dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
        )
        try:
            async with self._client() as s3:
                if await self._stream(s3, name, lambda batch: _write_all(fd, batch)) is None:
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
            async with self._client() as s3:
                await self._abort_uploads(s3, name)
                if self.opts.object_lock:
                    existed = await self._delete_versions(s3, name)
                else:
                    existed = await self._exists(s3, name)
                    if existed:
                        await s3.delete_object(Bucket=self.opts.bucket, Key=name)
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
            async with self._client() as s3:
                found = await self._versions(s3, name)
                versions = [v for v, marker in found if v is not None and not marker]
                for version in versions:
                    await s3.put_object_legal_hold(
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

    # -- Object Lock ---------------------------------------------------------------

    async def _lockable(self, s3: S3Client) -> bool:
        """Whether the bucket has Object Lock turned on."""
        try:
            answer = await s3.get_object_lock_configuration(Bucket=self.opts.bucket)
        except ClientError as exc:
            if error_code(exc) in ("ObjectLockConfigurationNotFoundError", "404"):
                return False
            raise
        return answer.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"

    def _lock_headers(self, lock: Lock) -> dict[str, Any]:
        """The upload's Object Lock parameters; none on a target without object_lock."""
        headers: dict[str, Any] = {}
        if self.opts.object_lock and lock.until is not None:
            headers |= {
                "ObjectLockMode": self.opts.object_lock,
                "ObjectLockRetainUntilDate": lock.until,
            }
        if self.opts.object_lock and lock.legal_hold:
            headers["ObjectLockLegalHoldStatus"] = "ON"
        return headers

    async def _keep_lock(self, s3: S3Client, name: str, lock: Lock) -> None:
        """Read the object's lock back and set what is missing: a server may ignore the
        upload's Object Lock headers (on a multipart upload, say), and an object adopted
        from an earlier try was locked for that try's date. A lock that does not stick
        is an error: the copy would not be what the target promises."""
        if not self._lock_headers(lock):
            return
        for attempt in (1, 2):
            head = await s3.head_object(Bucket=self.opts.bucket, Key=name)
            retain = lock.until is not None and not (
                head.get("ObjectLockMode") == self.opts.object_lock
                and _seconds(head.get("ObjectLockRetainUntilDate")) >= _seconds(lock.until)
            )
            hold = lock.legal_hold and head.get("ObjectLockLegalHoldStatus") != "ON"
            if not (retain or hold):
                return
            if attempt == 2:
                raise StorageError(
                    f"storage.{self.target}: {self._url(name)} does not keep its Object Lock "
                    f"({self.opts.object_lock} until {lock.until}"
                    f"{', legal hold' if lock.legal_hold else ''})",
                    recoverable=False,
                )
            version = head.get("VersionId")
            where: dict[str, Any] = {"VersionId": version} if version else {}
            if retain:
                assert lock.until is not None and self.opts.object_lock is not None
                await s3.put_object_retention(
                    Bucket=self.opts.bucket,
                    Key=name,
                    Retention={"Mode": self.opts.object_lock, "RetainUntilDate": lock.until},
                    **where,
                )
            if hold:
                await s3.put_object_legal_hold(
                    Bucket=self.opts.bucket, Key=name, LegalHold={"Status": "ON"}, **where
                )

    async def _versions(self, s3: S3Client, name: str) -> list[tuple[str | None, bool]]:
        """Every version of `name` (version id, whether it is a delete marker)."""
        found: list[tuple[str | None, bool]] = []
        paginator = s3.get_paginator("list_object_versions")
        async for page in paginator.paginate(Bucket=self.opts.bucket, Prefix=name):
            for kind, marker in (("Versions", False), ("DeleteMarkers", True)):
                for entry in page.get(kind, []):  # type: ignore[attr-defined]
                    if entry.get("Key") == name:
                        found.append((entry.get("VersionId"), marker))
        return found

    async def _delete_versions(self, s3: S3Client, name: str) -> bool:
        """Remove every version of `name`, once none is locked or held any more: on a
        versioned bucket a plain delete only hides the object behind a marker."""
        versions = await self._versions(s3, name)
        now = datetime.now(UTC)
        for version, marker in versions:
            if marker or version is None:
                continue
            head = await s3.head_object(Bucket=self.opts.bucket, Key=name, VersionId=version)
            until = head.get("ObjectLockRetainUntilDate")
            held = head.get("ObjectLockLegalHoldStatus") == "ON"
            if held or (until is not None and until > now):
                why = "under an S3 legal hold" if held else f"under Object Lock until {until}"
                raise StorageError(
                    f"storage.{self.target}: {self._url(name)} is {why}: it is deleted "
                    "once that has passed",
                    recoverable=True,
                )
        for version, _ in versions:
            if version is None:  # a server that keeps no versions after all
                await s3.delete_object(Bucket=self.opts.bucket, Key=name)
            else:
                await s3.delete_object(Bucket=self.opts.bucket, Key=name, VersionId=version)
        return any(not marker for _, marker in versions)

    # -- the parts -----------------------------------------------------------------

    async def _exists(self, s3: S3Client, name: str) -> bool:
        try:
            await s3.head_object(Bucket=self.opts.bucket, Key=name)
        except ClientError as exc:
            if _is_missing(exc):
                return False
            raise
        return True

    async def _adoptable(self, s3: S3Client, name: str, sha256: str, size: int) -> bool:
        """An object already at `name` that is this archive: same size, digest, bytes."""
        try:
            head = await s3.head_object(Bucket=self.opts.bucket, Key=name)
        except ClientError as exc:
            if _is_missing(exc):
                return False
            raise
        if head.get("ContentLength") != size or head.get("Metadata", {}).get("sha256") != sha256:
            return False
        got = await self._digest(s3, name)
        if got == (sha256, size):
            return True
        log.warning(
            "s3: the object in place does not read back as its metadata says; replacing it",
            target=self.target,
            path=self._url(name),
        )
        return False

    async def _abort_uploads(self, s3: S3Client, name: str) -> int:
        """Abort multipart uploads of `name` that an interrupted attempt left behind."""
        aborted = 0
        try:
            paginator = s3.get_paginator("list_multipart_uploads")
            async for page in paginator.paginate(Bucket=self.opts.bucket, Prefix=name):
                for upload in page.get("Uploads", []):
                    if upload.get("Key") != name or "UploadId" not in upload:
                        continue
                    with contextlib.suppress(ClientError):  # NoSuchUpload: gone already
                        await s3.abort_multipart_upload(
                            Bucket=self.opts.bucket, Key=name, UploadId=upload["UploadId"]
                        )
                    aborted += 1
        except ClientError as exc:
            if error_code(exc) not in ("AccessDenied", "NotImplemented"):
                raise
            # Not allowed to list them (s3:ListBucketMultipartUploads) or not
            # supported by this server: a lifecycle rule has to clean them up.
            log.warning(
                "s3: cannot list unfinished multipart uploads",
                target=self.target,
                path=self._url(name),
                error=_describe(exc),
            )
        if aborted:
            log.info("s3: aborted unfinished uploads", target=self.target, count=aborted)
        return aborted

    async def _put_single(
        self, s3: S3Client, archive: Parts, name: str, sha256: str, size: int, headers: Any
    ) -> None:
        digest = hashlib.sha256()
        data, md5 = await anyio.to_thread.run_sync(_read_part, archive, 0, size, digest)
        self._check_source(archive, digest, sha256)
        await s3.put_object(
            Bucket=self.opts.bucket,
            Key=name,
            Body=data,
            ContentLength=size,
            ContentMD5=md5,
            ContentType="application/x-tar",
            Metadata={"sha256": sha256},
            **headers,
        )

    async def _put_multipart(
        self, s3: S3Client, archive: Parts, name: str, sha256: str, size: int, headers: Any
    ) -> None:
        part_size = max(self.opts.part_size, math.ceil(size / MAX_PARTS))
        bucket = self.opts.bucket
        upload = await s3.create_multipart_upload(
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
                data, md5 = await anyio.to_thread.run_sync(
                    _read_part, archive, offset, length, digest
                )
                answer = await s3.upload_part(
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
            self._check_source(archive, digest, sha256)
            await s3.complete_multipart_upload(
                Bucket=bucket,
                Key=name,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                try:
                    await s3.abort_multipart_upload(Bucket=bucket, Key=name, UploadId=upload_id)
                except (ClientError, BotoCoreError) as exc:
                    log.warning(
                        "s3: cannot abort the multipart upload; the next attempt will",
                        target=self.target,
                        path=self._url(name),
                        error=_describe(exc),
                    )
            raise

    def _check_source(self, archive: Parts, digest: Any, sha256: str) -> None:
        if digest.hexdigest() != sha256:
            raise StorageError(
                f"storage.{self.target}: the staged archive ({archive[0].parent}) "
                f"does not match its sha256 {sha256}",
                recoverable=True,
            )

    async def _stream(
        self, s3: S3Client, name: str, consume: Callable[[list[bytes]], None]
    ) -> int | None:
        """Read the object through `consume` in batches, in a worker thread; its size.

        None if there is no such object.
        """
        try:
            answer = await s3.get_object(Bucket=self.opts.bucket, Key=name)
        except ClientError as exc:
            if _is_missing(exc):
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

    async def _digest(self, s3: S3Client, name: str) -> tuple[str, int] | None:
        """The sha256 and size of the object as it reads back; None if it is not there."""
        digest = hashlib.sha256()

        def update(batch: list[bytes]) -> None:
            for chunk in batch:
                digest.update(chunk)

        size = await self._stream(s3, name, update)
        return None if size is None else (digest.hexdigest(), size)
