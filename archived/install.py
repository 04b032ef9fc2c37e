"""`archived init`: a real installation from nothing, without overwriting anything.

It writes a commented config, makes the state and spool directories with the modes the
systemd files give them, makes the signing key pair, marks the storage targets, and
runs the checks `archived check-config` runs. Everything that could stop it is checked
before anything is written, so a refusal leaves no trace; an existing config is such a
refusal, so running it twice changes nothing. An existing key pair or directory is
kept as it is. A target directory is made only inside the installation's own folder
(`--dir`): anywhere else it may be the mount point of a disk that is not there, so
init asks for it to exist, as `archived init-target` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from . import loader, preflight
from .config import Config
from .errors import ConfigError
from .fileio import atomic_file
from .keys import public_path
from .spool import SUBDIRS

# The modes systemd/archived.tmpfiles gives the spool: members of the group may drop
# job files into tmp/ and incoming/ (setgid, so the daemon's group owns them).
SPOOL_MODES = {"": 0o750, "tmp": 0o2770, "incoming": 0o2770, "active": 0o750, "corrupt": 0o750}
DIR_MODE = 0o750  # state, sources and targets of an own folder; the config's directory
CONFIG_MODE = 0o640

FHS = {
    "config": loader.SYSTEM_CONFIG,
    "state_dir": Path("/var/lib/archived"),
    "spool_dir": Path("/var/spool/archived"),
    "key": Path("/etc/archived/signing.key"),
    "source": Path("/srv/exports"),
    "target": Path("/srv/archive"),
}


@dataclass(frozen=True)
class Layout:
    """Where an installation keeps what; `folder` is `--dir`, if given."""

    config: Path
    state_dir: Path
    spool_dir: Path
    key: Path
    sources: list[Path]
    targets: dict[str, Path]
    folder: Path | None = None
    made: list[str] = field(default_factory=list)  # what init did, for the operator

    def own(self, path: Path) -> bool:
        """Whether `path` lies in the installation's own folder (init may make it)."""
        return self.folder is not None and path.absolute().is_relative_to(self.folder)


def layout(
    *,
    folder: Path | None,
    config: Path | None = None,
    state_dir: Path | None = None,
    spool_dir: Path | None = None,
    key: Path | None = None,
    sources: list[Path] | None = None,
    targets: dict[str, Path] | None = None,
) -> Layout:
    """The paths given, the rest from `folder` (a self-contained installation) or else
    the places the systemd unit expects."""

    def default(name: str, inside: str) -> Path:
        return folder / inside if folder is not None else FHS[name]

    if folder is not None:
        folder = folder.absolute()
    return Layout(
        config=(config or default("config", "archived.toml")).absolute(),
        state_dir=(state_dir or default("state_dir", "state")).absolute(),
        spool_dir=(spool_dir or default("spool_dir", "spool")).absolute(),
        key=(key or default("key", "signing.key")).absolute(),
        sources=[p.absolute() for p in sources or [default("source", "sources")]],
        targets={
            n: p.absolute()
            for n, p in (targets or {"primary": default("target", "archive")}).items()
        },
        folder=folder,
    )


def _toml(value: object) -> str:
    return json.dumps(str(value) if isinstance(value, Path) else value)


def render(lay: Layout) -> str:
    """The config file: what this installation needs, and every other section commented."""
    roots = ", ".join(_toml(p) for p in lay.sources)
    targets = "".join(
        f'\n[storage.{name}]\ndriver = "localdir"\npath = {_toml(path)}\nrequire_marker = true\n'
        for name, path in lay.targets.items()
    )
    first = next(iter(lay.targets))
    return f"""\
# archived: written by `archived init`. Keys left out have their defaults (the README's
# config reference has them all). `archived check-config` checks this file; the daemon
# reads it again on SIGHUP (`systemctl reload archived`).

[daemon]
# archived.db (queue and history), staging/ (<job id>/, end.tar), archived.lock
state_dir = {_toml(lay.state_dir)}
# tmp/ incoming/ active/ corrupt/: job files are dropped into incoming/
spool_dir = {_toml(lay.spool_dir)}
# poll_interval = "1s"
# max_concurrent_jobs = 4
# shutdown_grace = "30s"
# job_timeout = "6h"
# pin_cpu = true                        # threads on one CPU; bulk work on all (README)

[signing]
# minisign secret key (mode 0600); its public half beside it, .pub, is what others
# check archives with. Under systemd, LoadCredential=signing.key:... hands it over.
key = {_toml(lay.key)}
# public_keys = []                      # more keys `archived verify` trusts (key rotation)
# tsa_url = "https://tsa.example.org/tsr"   # RFC 3161 time-stamps, with tsa_ca
# tsa_ca = "/etc/archived/tsa-ca.pem"

[sources]
# `files` and `sqlite` activities read only below these
allowed_roots = [{roots}]

# [limits]
# activity_tasks = 4
# storage_tasks = 4
# hash_threads = 2

# [retry]
# max_attempts = 5
# backoff = "5s"
# backoff_max = "10m"

# [retention]                           # bounds for a job's retention_days
# min_days = 1
# max_days = 36500

# [audit]                               # re-read stored copies, repair damaged ones
# interval = "24h"
# copies_per_round = 20

# [metrics]                             # for node_exporter's textfile collector
# textfile = "/var/lib/prometheus/node-exporter/archived.prom"
# interval = "10s"

# [hooks]
# on_failure = ["/usr/local/bin/page-the-operator"]

# [commands.pgdump]                     # the only programs a job can run, by name
# argv = ["pg_dump", "--format=custom", "exams"]
# timeout = "1h"

# [schedules.nightly]                   # jobs the daemon makes by itself
# cron = "0 2 * * *"
# timezone = "UTC"
# [schedules.nightly.job]
# name = "nightly"
# [[schedules.nightly.job.activities]]
# name = "exports"
# driver = "files"
# path = {_toml(lay.sources[0])}

# Storage targets. Jobs store on every target unless they name some
# (storage = ["{first}"]). A localdir target keeps require_marker = true: archives go
# there only while its .archived-target exists, so an empty mount point (the disk
# not mounted) is never taken for it; `archived init-target NAME` marks a new disk.
{targets}
# [storage.cloud]                       # an S3 bucket: see the README's S3 section
# driver = "s3"
# bucket = "archive-example"
# endpoint = "https://s3.example.org"   # leave out for AWS
# region = "us-east-1"
# credentials_file = "/etc/archived/s3-credentials"
# object_lock = "COMPLIANCE"            # copies no one can delete before their retention
"""


def plan(lay: Layout) -> Config:
    """The config init would write, checked, and every reason to refuse (ConfigError),
    before anything is written."""
    problems = []
    if lay.config.exists() or lay.config.is_symlink():
        problems.append(
            f"{lay.config} exists: init never overwrites; `archived check-config` checks it"
        )
    if not lay.key.exists() and public_path(lay.key).exists():
        problems.append(
            f"signing.key: {public_path(lay.key)} exists without its secret key {lay.key}"
        )
    for name, path in lay.targets.items():
        if lay.own(path) or path.is_dir():
            continue
        problems.append(
            f"storage.{name}: {path} is not a directory: mount the disk and make the "
            "directory first (init makes no directory that may be a mount point)"
        )
    config = None
    try:
        config = loader.build(tomllib.loads(render(lay)), source=lay.config)
    except ConfigError as exc:
        problems += exc.problems
    else:
        problems += preflight.path_problems(config, lay.targets)
    if problems or config is None:
        raise ConfigError(*problems)
    return config


def _mkdir(path: Path, mode: int, lay: Layout) -> None:
    """Make `path` (and its parents) with `mode`; an existing directory is kept as it is."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)  # not subject to the umask, as systemd-tmpfiles
    lay.made.append(f"made {path} (mode {mode:o})")


def _write_new(path: Path, text: str, mode: int) -> None:
    """`text` at `path`, which must not exist (never overwrites). The file takes the
    group of its directory: root writes the config into /etc/archived, which
    systemd-tmpfiles gave to group archived, and the service must read it."""
    with atomic_file(path, mode, exclusive=True) as f:
        with contextlib.suppress(PermissionError):  # not ours to give: keep our own
            os.fchown(f.fileno(), -1, path.parent.stat().st_gid)
        f.write(text.encode())


async def create(lay: Layout, config: Config) -> list[str]:
    """Make the installation `plan` checked: directories, key pair, config, markers;
    then the checks of `check-config`. Returns what it did and its warnings."""
    from .daemon import check_config
    from .drivers import open_storage
    from .minisign import write_key_pair

    if lay.folder is not None:
        _mkdir(lay.folder, DIR_MODE, lay)
    _mkdir(lay.config.parent, DIR_MODE, lay)
    _mkdir(lay.state_dir, DIR_MODE, lay)
    for sub in SUBDIRS if lay.spool_dir.is_dir() else ("", *SUBDIRS):
        _mkdir(lay.spool_dir / sub, SPOOL_MODES[sub], lay)
    for path in [*lay.sources, *lay.targets.values()]:
        if lay.own(path):
            _mkdir(path, DIR_MODE, lay)
    if lay.key.exists():
        lay.made.append(f"kept the existing key pair {lay.key}")
    else:
        _mkdir(lay.key.parent, DIR_MODE, lay)
        key = write_key_pair(lay.key, public_path(lay.key))
        lay.made.append(f"made the key pair {lay.key} (key id {key.key_id_hex})")
    _write_new(lay.config, render(lay), CONFIG_MODE)
    lay.made.append(f"wrote {lay.config}")
    for name in lay.targets:
        said = await open_storage(config, name).mark()
        lay.made.append(said or f"storage.{name}: needs no marker")
    warnings = await check_config(config)
    return [*lay.made, *(f"warning: {w}" for w in warnings)]


def next_steps(lay: Layout) -> str:
    """What to do after init, for the installation it made."""
    conf = "" if lay.config == FHS["config"] else f" --config {lay.config}"
    source = lay.sources[0]
    job = f"""\
     cat > first-job.toml <<'EOF'
     name = "first"
     [[activities]]
     name = "files"
     driver = "files"
     path = "{source}"
     EOF
     archived{conf} submit --wait first-job.toml"""
    if lay.folder is not None:
        run = f"archived{conf} run      # in the foreground; Ctrl-C stops it"
        return f"next:\n  1. {run}\n  2. put a file into {source}, then in another shell:\n{job}\n"
    owners = " ".join(str(p) for p in lay.targets.values())
    return f"""\
next:
  1. the service's user owns the targets:  chown archived:archived {owners}
     and they are in ReadWritePaths= of the unit (systemctl edit archived)
  2. systemctl enable --now archived && systemctl status archived
  3. a first job:
{job}
"""
