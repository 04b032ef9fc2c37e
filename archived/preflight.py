"""What a config needs beyond its schema to work on this machine: directories that do not
collide, programs that are there.

Each function returns the problems it finds, one line each, so `check-config` can name
them all at once. Paths are compared with symlinks resolved, as far as they exist.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .config import Config


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def relation(a: Path, b: Path) -> str | None:
    """How directory `a` lies to `b`: "is", "is inside", "contains", or None (apart)."""
    a, b = _real(a), _real(b)
    if a == b:
        return "is"
    if a.is_relative_to(b):
        return "is inside"
    if b.is_relative_to(a):
        return "contains"
    return None


def path_problems(config: Config, target_roots: dict[str, Path]) -> list[str]:
    """Targets that share a directory with another target, a source root, the state
    directory or the spool; a spool where the daemon keeps its own state."""
    problems = []
    daemon = config.daemon
    names = sorted(target_roots)
    for i, name in enumerate(names):
        root = target_roots[name]
        for other in names[i + 1 :]:
            inner, outer = (other, name)
            how = relation(target_roots[inner], target_roots[outer])
            if how == "contains":
                inner, outer, how = outer, inner, "is inside"
            if how:
                problems.append(
                    f"storage.{inner}: {target_roots[inner]} {_phrase(how)} storage.{outer} "
                    f"({target_roots[outer]}): two targets in one directory trample each "
                    "other's files"
                )
        for source in config.sources.allowed_roots:
            if how := relation(root, source):
                problems.append(
                    f"storage.{name}: {root} {_phrase(how)} sources.allowed_roots ({source}): "
                    "jobs would archive the archives"
                )
        for key, place in (("state_dir", daemon.state_dir), ("spool_dir", daemon.spool_dir)):
            if how := relation(root, place):
                problems.append(
                    f"storage.{name}: {root} {_phrase(how)} daemon.{key} ({place}): "
                    "a target holds archives only"
                )
    if relation(daemon.spool_dir, daemon.state_dir) == "is":
        problems.append(
            f"daemon.spool_dir: the same directory as daemon.state_dir ({daemon.state_dir}); "
            "give each its own"
        )
    elif relation(daemon.spool_dir, daemon.state_dir / "staging") in ("is", "is inside"):
        problems.append(
            f"daemon.spool_dir: {daemon.spool_dir} is inside the staging area of "
            "daemon.state_dir, which the daemon clears"
        )
    return problems


def _phrase(how: str) -> str:
    return "is the directory of" if how == "is" else how


def program_problems(config: Config) -> list[str]:
    """Commands and the failure hook whose program is not an executable file."""
    problems = []
    for name, section in sorted(config.commands.items()):
        path = section.env.get("PATH", os.environ.get("PATH", os.defpath))
        problem = _not_executable(section.argv[0], path, section.cwd)
        if problem:
            problems.append(f"commands.{name}.argv: {problem}")
    if config.hooks.on_failure:
        path = os.environ.get("PATH", os.defpath)
        problem = _not_executable(config.hooks.on_failure[0], path, None)
        if problem:
            problems.append(f"hooks.on_failure: {problem}")
    return problems


def _not_executable(program: str, path: str, cwd: Path | None) -> str | None:
    if "/" in program:  # a path, relative to the working directory the program gets
        where = Path(cwd or Path.cwd()) / program
        if where.is_file() and os.access(where, os.X_OK):
            return None
        return f"{program!r} is not an executable file"
    if shutil.which(program, path=path):
        return None
    return f"{program!r} is not an executable on PATH {path}"
