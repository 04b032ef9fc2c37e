"""The daemon's TOML config: schema, defaults, the embedded default, validation.

Every table refuses unknown keys, so a typo fails loudly instead of silently
changing what gets archived. Relative paths are taken relative to the config file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: object) -> float:
    """Seconds from "500ms", "30s", "5m", "1h", "2d" or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError('a duration such as "30s", "5m" or "1h"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match[1]) * _UNIT_SECONDS[match[2]]
    else:
        raise ValueError(f'{value!r} is not a duration such as "30s", "5m" or "1h"')
    if not math.isfinite(seconds):
        raise ValueError("a duration must be finite")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]

MS, HOUR, DAY = 0.001, 3600.0, 86400.0


def human(seconds: float) -> str:
    """A duration the way the config spells it: 10ms, 30s, 5m, 1h, 365d."""
    for unit, size in (("d", DAY), ("h", HOUR), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def within(least: float, most: float, *, off: bool = False) -> AfterValidator:
    """For a Duration: between `least` and `most`; with `off`, 0 as well (it turns a thing
    off), as in `Annotated[Duration, within(...)]`.

    Zero where it makes a busy loop or fails everything, and durations no one means
    (a poll every year), are refused by check-config rather than obeyed."""

    def check(seconds: float) -> float:
        if (off and seconds == 0) or least <= seconds <= most:
            return seconds
        zero = "0 (off) or " if off else ""
        raise ValueError(f"must be {zero}between {human(least)} and {human(most)}")

    return AfterValidator(check)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DaemonConfig(Section):
    state_dir: Path = Path("/var/lib/archived")
    spool_dir: Path = Path("/var/spool/archived")
    poll_interval: Annotated[Duration, within(10 * MS, HOUR)] = 1.0
    max_concurrent_jobs: StrictInt = Field(default=4, ge=1)
    shutdown_grace: Annotated[Duration, within(0, HOUR)] = 30.0
    job_timeout: Annotated[Duration, within(1, 365 * DAY)] = 6 * 3600.0
    pin_cpu: bool = True  # the daemon's threads on one CPU, bulk work on all (cpus.py)


class LimitsConfig(Section):
    activity_tasks: StrictInt = Field(default=4, ge=1)
    storage_tasks: StrictInt = Field(default=4, ge=1)
    hash_threads: StrictInt = Field(default=2, ge=1)
    max_job_file_bytes: StrictInt = Field(default=1024 * 1024, ge=64)


class RetryConfig(Section):
    max_attempts: StrictInt = Field(default=5, ge=1)
    backoff: Annotated[Duration, within(10 * MS, DAY)] = 5.0
    backoff_max: Annotated[Duration, within(10 * MS, 30 * DAY)] = 600.0

    @model_validator(mode="after")
    def _order(self) -> RetryConfig:
        if self.backoff_max < self.backoff:
            raise ValueError(
                f"backoff_max ({human(self.backoff_max)}) is less than backoff "
                f"({human(self.backoff)})"
            )
        return self


class SigningConfig(Section):
    key: Path = Path("/etc/archived/signing.key")
    public_keys: list[Path] = []  # further trusted keys for `verify`, e.g. across a rotation
    tsa_url: str = ""  # RFC 3161 time-stamping authority; empty: no time-stamps
    tsa_ca: Path | None = None  # CA bundle (PEM) the TSA's replies must chain to
    tsa_timeout: Annotated[Duration, within(100 * MS, HOUR)] = 30.0

    @model_validator(mode="after")
    def _tsa(self) -> SigningConfig:
        if self.tsa_url and self.tsa_ca is None:
            raise ValueError("tsa_url needs tsa_ca: a time-stamp is only worth its CA check")
        if self.tsa_url and not self.tsa_url.startswith(("http://", "https://")):
            raise ValueError(f"tsa_url {self.tsa_url!r} must be an http:// or https:// URL")
        return self


class SourcesConfig(Section):
    allowed_roots: list[Path] = []


class CommandConfig(Section):
    argv: list[str] = Field(min_length=1)
    timeout: Annotated[Duration, within(10 * MS, 30 * DAY)] = 3600.0
    env: dict[str, str] = {}
    cwd: Path | None = None
    allowed_args: list[str] = []  # globs; a job's `args` must each match one
    transient_exit_codes: list[StrictInt] = []  # exit codes worth a retry
    allow_empty: bool = False  # an empty output is an error unless this is set


class HooksConfig(Section):
    on_failure: list[str] = []
    timeout: Annotated[Duration, within(10 * MS, DAY)] = 60.0


class MetricsConfig(Section):
    textfile: Path | None = None  # e.g. /var/lib/node_exporter/textfile/archived.prom
    interval: Annotated[Duration, within(10 * MS, DAY)] = 10.0


class AuditConfig(Section):
    # between audit rounds; 0 turns periodic audits off
    interval: Annotated[Duration, within(10 * MS, 365 * DAY, off=True)] = 86400.0
    copies_per_round: StrictInt = Field(default=20, ge=1)
    bytes_per_round: StrictInt = Field(default=0, ge=0)  # 0: no limit


class RetentionConfig(Section):
    min_days: StrictInt = Field(default=1, ge=1)  # bounds for a job's retention_days
    max_days: StrictInt = Field(default=36500, ge=1)
    # how often the daemon looks for expired jobs
    check_interval: Annotated[Duration, within(10 * MS, DAY)] = 60.0


class ScheduleConfig(Section):
    cron: str  # five fields, or six with seconds last
    timezone: str = "UTC"
    missed: Literal["latest", "skip"] = "latest"  # slots that passed while the daemon was down
    skip_unchanged: bool = False  # no job when the sources did not change since the last one
    job: dict[str, Any]  # a job file's content

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from croniter import CroniterBadDateError, croniter

        if not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a valid cron expression")
        try:  # valid but impossible (February 30th): croniter gives up after some years
            croniter(value).get_next()
        except CroniterBadDateError:
            raise ValueError(f"cron {value!r} never fires (no such date)") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value


class QueueConfig(Section):
    # libpq URI of a PostgreSQL database that several daemons share; empty: SQLite in
    # daemon.state_dir, for one daemon
    url: str = ""
    host_id: str = ""  # unique per daemon; empty: hostname + ":" + daemon.state_dir
    # a daemon renews its jobs' leases every lease/3; one whose lease lapsed is taken over
    lease: Annotated[Duration, within(300 * MS, HOUR)] = 30.0

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URI (libpq), or empty for SQLite")
        return value


class StorageConfig(BaseModel):
    """`driver` plus the driver's own options, which the driver validates."""

    model_config = ConfigDict(extra="allow", frozen=True)
    driver: str


class Config(Section):
    daemon: DaemonConfig = DaemonConfig()
    limits: LimitsConfig = LimitsConfig()
    retry: RetryConfig = RetryConfig()
    signing: SigningConfig = SigningConfig()
    sources: SourcesConfig = SourcesConfig()
    commands: dict[str, CommandConfig] = {}
    hooks: HooksConfig = HooksConfig()
    metrics: MetricsConfig = MetricsConfig()
    audit: AuditConfig = AuditConfig()
    retention: RetentionConfig = RetentionConfig()
    schedules: dict[str, ScheduleConfig] = {}
    queue: QueueConfig = QueueConfig()
    storage: dict[str, StorageConfig] = {}
    # Not part of the file: where it came from, and whether it is the embedded default.
    source: Path | None = Field(None, exclude=True)
    embedded: bool = Field(False, exclude=True)

    def storage_options(self, target: str) -> dict[str, Any]:
        section = self.storage[target]
        return dict(section.model_extra or {})

    @property
    def digest(self) -> str:
        """Identifies this config in a job's snapshot."""
        return hashlib.sha256(self.snapshot().encode()).hexdigest()[:16]

    def snapshot(self) -> str:
        """What a job runs on. Not the queue: it is this daemon's (its host_id, a
        password in the URL), and a job runs alike on every daemon of the queue."""
        return json.dumps(self.model_dump(mode="json", exclude={"queue"}), sort_keys=True)

    @classmethod
    def from_snapshot(cls, text: str) -> Config:
        """The config a job's snapshot holds. The same few snapshots come back for job
        after job (one per config the daemon ran on), and validating one costs ~0.3 ms:
        they are kept, the model being frozen."""
        return _from_snapshot(text)


@functools.lru_cache(maxsize=16)
def _from_snapshot(text: str) -> Config:
    return Config.model_validate(json.loads(text))


def error_lines(exc: ValidationError) -> list[str]:
    """Pydantic's complaints as `dotted.path: message`, one line each."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key missing"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return lines


def first_error(exc: ValidationError) -> str:
    """Pydantic's first complaint as `dotted.path: message`, one line."""
    return error_lines(exc)[0]
