"""The S3 client of the `s3` driver: its options, one session per operation, and what
an error of the service means (recoverable or not, and in one line).

Credentials come from `credentials_file` when it is set (that file alone), otherwise
from the standard AWS chain of the daemon's environment, never from a job file.
"""

from __future__ import annotations

import configparser
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import anyio
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
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

from ..errors import classify
from .base import DriverOptions

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's floor for every part but the last
MAX_PART_SIZE = 5 * 1024 * MiB  # and its ceiling for a part or a single PUT

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


def describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        message = exc.response.get("Error", {}).get("Message") or ""
        return f"{error_code(exc)}: {message}".rstrip(": ").splitlines()[0]
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def target_gone(exc: BaseException) -> bool:
    """The endpoint cannot be reached, or has no such bucket: nothing about the object."""
    if isinstance(exc, ClientError):
        return error_code(exc) == "NoSuchBucket"
    return isinstance(exc, ConnectionError)


def is_missing(exc: ClientError) -> bool:
    return error_code(exc) in ("404", "NoSuchKey", "NotFound")


@contextlib.asynccontextmanager
async def open_client(opts: S3Options) -> AsyncIterator[S3Client]:
    """A client for one operation (a session reads its credentials afresh)."""
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


@dataclass(frozen=True)
class Bucket:
    """The target's bucket through one open client: where the other modules of the
    driver send their requests."""

    s3: S3Client
    opts: S3Options
    target: str

    def url(self, key: str) -> str:
        return f"s3://{self.opts.bucket}/{key}"
