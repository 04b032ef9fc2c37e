"""Job files: reading them safely, and the schema they must follow (TOML or JSON).

`read_job_file()` never follows a symlink and never blocks on a FIFO; `parse_job()`
turns bytes into a validated `JobSpec` against the config in force, or raises
JobFileError with the one line that goes into the `.reason` file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
)

from .bag import TIMESTAMP_LABEL
from .config import Config, first_error
from .drivers import activity_driver
from .errors import JobFileError, Kind, classify
from .moments import iso

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,100}$"
_ENCODABLE = re.compile(r"[^\ud800-\udfff]*")
OWN_LABEL_PREFIX = "Archived-"  # bag-info.txt labels of archived's own, e.g. Archived-Schedule
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")
# bag-info.txt labels that archived writes itself
RESERVED_LABELS = frozenset(
    label.lower()
    for label in (
        "Bagging-Date",
        "Payload-Oxum",
        "External-Identifier",
        "Bag-Software-Agent",
        "Bag-Size",
        "Bag-Group-Identifier",
        "Bag-Count",
        TIMESTAMP_LABEL,
    )
)


def _plain_name(value: str) -> str:
    if set(value) == {"."}:
        raise ValueError("must not consist of dots only")
    if value.startswith("-"):  # it ends up in file names that operators pass to tools
        raise ValueError("must not start with '-'")
    return value


class Activity(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(pattern=NAME_PATTERN)
    driver: str

    _check_name = field_validator("name")(_plain_name)

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=NAME_PATTERN)
    storage: list[str] | None = Field(None, min_length=1)
    not_before: AwareDatetime | None = None
    retention_days: StrictInt | None = Field(None, ge=1)
    metadata: dict[str, str] = {}
    activities: list[Activity] = Field(min_length=1)

    _check_name = field_validator("name")(_plain_name)

    @field_validator("not_before")
    @classmethod
    def _in_utc_range(cls, value: datetime | None) -> datetime | None:
        try:
            if value is not None:
                value.astimezone(UTC)
        except OverflowError:
            raise ValueError("out of range once converted to UTC") from None
        return value

    @field_validator("metadata")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for label, text in value.items():
            if not _LABEL.match(label) or label.strip() != label:
                raise ValueError(f"{label!r} is not a valid bag-info label")
            if label.lower() in RESERVED_LABELS:
                raise ValueError(f"{label!r} is written by archived itself")
            if "".join(text.splitlines()) != text:  # also \u2028, \x85, \x0c, ...
                raise ValueError(f"value of {label!r} must be one line")
        return value

    @field_validator("activities")
    @classmethod
    def _unique(cls, value: list[Activity]) -> list[Activity]:
        names = [a.name for a in value]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"activity names must be unique: {', '.join(dupes)}")
        return value

    def targets(self, config: Config) -> list[str]:
        return list(self.storage) if self.storage else sorted(config.storage)

    def not_before_utc(self) -> str | None:
        if self.not_before is None:
            return None
        return iso(self.not_before)


def read_job_file(path: Path, max_bytes: int, dir_fd: int | None = None) -> bytes:
    """The bytes of a job file: a regular file, not a symlink, at most `max_bytes`."""
    try:
        fd = os.open(
            path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the entry is a symlink
            raise JobFileError("is a symbolic link, not a regular file") from None
        if classify(exc) == Kind.RECOVERABLE:  # EMFILE, ENOMEM, ...: not the file's fault
            raise
        raise JobFileError(f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise JobFileError("not a regular file")
        if st.st_size > max_bytes:
            raise JobFileError(
                f"{st.st_size} bytes is over limits.max_job_file_bytes ({max_bytes})"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise JobFileError(f"over limits.max_job_file_bytes ({max_bytes})")
        return data
    finally:
        os.close(fd)


def parse_job(data: bytes, filename: str, config: Config) -> JobSpec:
    """Validate a job file's bytes against the schema and the config in force."""
    try:
        return _parse_job(data, filename, config)
    except JobFileError as exc:
        raise JobFileError(_one_line(str(exc))) from None


def _one_line(text: str) -> str:
    """`text` with its line breaks escaped: a reason is one line, whatever the file held."""
    return "".join(
        c.encode("unicode_escape").decode("ascii") if c.splitlines() == [""] else c for c in text
    )


def _parse_job(data: bytes, filename: str, config: Config) -> JobSpec:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobFileError(f"not UTF-8 (byte {exc.start})") from None
    raw = _decode(text, filename)
    _check_unicode(raw, "")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise JobFileError(first_error(exc)) from None
    for label in spec.metadata:
        if label.lower().startswith(OWN_LABEL_PREFIX.lower()):  # e.g. Archived-Schedule
            raise JobFileError(
                f"metadata: {label!r} is written by archived itself "
                f"(labels starting with {OWN_LABEL_PREFIX} are reserved)"
            )
    check_against(spec, config)
    return spec


def check_against(spec: JobSpec, config: Config) -> None:
    """What a job needs from the config: targets, drivers, commands, roots, retention.

    Also run when a job starts, since a reload may have changed the config since.
    """
    days, bounds = spec.retention_days, config.retention
    if days is not None and not bounds.min_days <= days <= bounds.max_days:
        raise JobFileError(
            f"retention_days: {days} is outside retention.min_days.."
            f"retention.max_days ({bounds.min_days}..{bounds.max_days})"
        )
    targets = spec.targets(config)
    for index, target in enumerate(targets):
        if target in targets[:index]:
            raise JobFileError(f"storage: {target!r} is named twice")
        if target not in config.storage:
            known = ", ".join(sorted(config.storage))
            raise JobFileError(f"storage: unknown storage target {target!r} (known: {known})")
    for index, activity in enumerate(spec.activities):
        where = f"activities.{index}"
        try:
            driver = activity_driver(activity.driver)
        except KeyError:
            raise JobFileError(
                f"{where}.driver: unknown activity driver {activity.driver!r}"
            ) from None
        try:
            options = driver.options(activity.options())
        except ValidationError as exc:
            raise JobFileError(f"{where}.{first_error(exc)}") from None
        try:
            driver.check(options, config)
        except (JobFileError, ValueError) as exc:
            raise JobFileError(f"{where} ({activity.name}): {exc}") from None


def _check_unicode(value: Any, where: str) -> None:
    """JSON can spell a lone surrogate (`"\\ud800"`), which no UTF-8 text can hold."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, where)
            _check_unicode(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_unicode(item, f"{where}.{index}" if where else str(index))
    elif isinstance(value, str) and not _ENCODABLE.fullmatch(value):
        bad = next(c for c in value if 0xD800 <= ord(c) <= 0xDFFF)
        place = f"{where}: " if where else ""
        raise JobFileError(f"{place}not Unicode text (a lone surrogate \\u{ord(bad):04x})")


def _decode(text: str, filename: str) -> Any:
    if filename.endswith(".json"):
        try:
            raw = json.loads(text, object_pairs_hook=_unique_keys)
        except RecursionError:
            raise JobFileError("not valid JSON: nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, an over-long integer, a duplicate key
            raise JobFileError(f"not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise JobFileError("not valid JSON: the top level must be an object")
        return raw
    _check_key_depth(text)
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise JobFileError("not valid TOML: nested too deeply") from None
    except ValueError as exc:  # TOMLDecodeError, or an over-long integer
        raise JobFileError(f"not valid TOML: {exc}") from None


# TOML's strings and comments, then a dotted key: its parts (bare, or a string already
# replaced by `s`) joined by dots. A float (`1.5`) is such a run with one dot.
_TOML_STRINGS = re.compile(
    r'"""(?:[^\\]|\\.)*?"""|\'\'\'.*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*',
    re.DOTALL,
)
_DOTTED_RUN = re.compile(r"[\w-]+(?:[ \t]*\.[ \t]*[\w-]+)+")
MAX_KEY_DEPTH = 32


def _check_key_depth(text: str) -> None:
    """Refuse dotted keys deeper than any job needs before tomllib sees them: it takes
    time and memory quadratic in their depth (20,000 parts: about a minute and 1 GB)."""
    bare = _TOML_STRINGS.sub("s", text)
    for run in _DOTTED_RUN.finditer(bare):
        if run.group().count(".") > MAX_KEY_DEPTH:
            raise JobFileError(f"not valid TOML: keys nested more than {MAX_KEY_DEPTH} deep")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """TOML refuses a key given twice; JSON would silently keep the last one."""
    keys = [key for key, _ in pairs]
    if dupes := sorted({key for key in keys if keys.count(key) > 1}):
        raise ValueError(f"duplicate key {dupes[0]!r}")
    return dict(pairs)
