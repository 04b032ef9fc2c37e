"""The `archived` command line.

Exit codes: 0 success; 1 a job or a verification failed; 2 usage error (also a job
file that `submit` refuses); 78 config error. Errors are one line on stderr; the
traceback only with --debug.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import anyio

from . import __version__, cpus, loader, progress
from .config import Config, parse_duration
from .errors import ArchivedError, ConfigError, JobFileError
from .states import FINAL, State

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 78
EXIT_SIGPIPE = 128 + 13  # as a shell reports a program killed by SIGPIPE


class CommandError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _load_config(args: argparse.Namespace) -> Config:
    return loader.load(loader.config_path(args.config))


# -- commands ------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from . import log
    from .daemon import Daemon

    log.configure(debug=args.debug)
    config = _load_config(args)
    if config.daemon.pin_cpu:  # before any thread is made: they all inherit it
        cpus.pin()
    anyio.run(Daemon(config).run, backend="asyncio")
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from .jobfile import parse_job, read_job_file
    from .spool import Spool

    config = _load_config(args)
    try:  # before anything goes into the spool
        timeout = parse_duration(args.timeout) if args.timeout is not None else None
    except ValueError as exc:
        raise CommandError(f"--timeout: {exc}", EXIT_USAGE) from None
    validated = []
    for name in args.files:
        path = Path(name)
        try:
            data = read_job_file(path, config.limits.max_job_file_bytes)
            parse_job(data, path.name, config)
        except JobFileError as exc:
            raise CommandError(f"{path}: {exc}", EXIT_USAGE) from None
        validated.append((data, ".json" if path.name.endswith(".json") else ".toml"))
    spool = Spool(config.daemon.spool_dir)
    spool.create()
    ids = []
    for data, suffix in validated:
        ids.append(spool.submit(data, suffix))
        print(ids[-1], flush=True)
    if not args.wait:
        return EXIT_OK
    states = _wait_for(config, ids, timeout)
    for job_id, state in states.items():
        if state != State.COMPLETED:
            print(f"{job_id}: {state}", file=sys.stderr)
    return EXIT_OK if all(s == State.COMPLETED for s in states.values()) else EXIT_FAILED


def _wait_for(config: Config, ids: list[str], timeout: float | None) -> dict[str, str]:
    """Poll the queue until every job is final (or rejected into corrupt/).

    Never silent: on stderr it says at once when no daemon holds the state directory's
    lock (and when one does again; with SQLite, where that daemon is the only one), and
    how each job is doing: on a terminal, one line a job redrawn in place with its
    figures (see progress.py); otherwise one plain line each time a job's state changes.
    `timeout` bounds it all, a locked database too. The store's synchronous reader: a
    waiting `submit` starts and ends quickly, without an event loop.
    """
    from .lock import daemon_running
    from .store import StoreUnavailable
    from .store_open import open_state_reader

    deadline = None if timeout is None else time.monotonic() + timeout
    states: dict[str, str] = {}
    corrupt = config.daemon.spool_dir / "corrupt"
    state_dir = config.daemon.state_dir
    reader = open_state_reader(config)
    begun = time.monotonic()
    daemon_seen: bool | None = None
    look_at_lock = 0.0
    unreadable = ""
    screen = Screen(sys.stderr) if sys.stderr.isatty() else None
    lines = dict.fromkeys(ids, "waiting to be picked up")
    say = screen.say if screen else _say

    def settled(state: str | None) -> bool:
        return state in FINAL or str(state).startswith("rejected")

    try:
        while True:
            if not config.queue.url and time.monotonic() >= look_at_lock:  # twice a second at most
                look_at_lock = time.monotonic() + 0.5
                running = daemon_running(state_dir)
                if running != daemon_seen and not running:
                    say(f"no daemon is running on {state_dir}: the jobs wait until one starts")
                elif running != daemon_seen and daemon_seen is not None:
                    say("a daemon is running now")
                daemon_seen = running
            try:
                known = reader.peek(i for i in ids if not settled(states.get(i)))
                for job_id in ids:
                    if settled(states.get(job_id)):
                        continue
                    peeked = known.get(job_id)
                    if peeked is None:
                        if any(corrupt.glob(f"{job_id}.*.reason")):
                            states[job_id] = lines[job_id] = "rejected (see spool corrupt/)"
                            if not screen:
                                print(f"{job_id}: {lines[job_id]}", file=sys.stderr, flush=True)
                        continue
                    job, tasks = peeked
                    figures = progress.figures(
                        job.to_json(), [t.to_json() for t in tasks], datetime.now(UTC)
                    )
                    lines[job_id] = progress.line(figures)
                    if job.state != states.get(job_id) and not screen:
                        print(f"{job_id}: {lines[job_id]}", file=sys.stderr, flush=True)
                    states[job_id] = job.state
                unreadable = ""
            except StoreUnavailable as exc:  # locked, busy, unreachable: say so, and go on
                if str(exc) != unreadable:
                    unreadable = str(exc)
                    say(f"cannot read the jobs' states now: {exc}")
            if screen:
                screen.show([f"{job_id}  {lines[job_id]}" for job_id in ids])
            if all(settled(states.get(i)) for i in ids):
                return states
            left = math.inf if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return {
                    i: states[i]
                    if settled(states.get(i))
                    else f"{states.get(i, 'not picked up')} (timed out waiting)"
                    for i in ids
                }
            # quick for a quick job, easing off for a long one: late by 2 % at the most
            time.sleep(min(max((time.monotonic() - begun) / 50, 0.01), 0.5, left))
    finally:
        reader.close()


class Screen:
    """`submit --wait` on a terminal: one line a job, redrawn in place; what is said
    meanwhile goes above them."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.lines: list[str] = []
        self.drawn = 0

    def show(self, lines: list[str]) -> None:
        if lines != self.lines:
            self.lines = lines
            self._redraw()

    def say(self, message: str) -> None:
        self._redraw(f"archived: {message}\n")

    def _redraw(self, above: str = "") -> None:
        # back to the first line drawn, clear to the end of the screen, draw again
        up = f"\x1b[{self.drawn}A\r\x1b[J" if self.drawn else ""
        try:  # a line that wraps would take two: cut it at the terminal's width
            width = os.get_terminal_size(self.stream.fileno()).columns - 1
        except (OSError, ValueError):
            width = -1
        body = "".join(f"{line[:width] if width > 0 else line}\n" for line in self.lines)
        self.stream.write(up + above + body)
        self.stream.flush()
        self.drawn = len(self.lines)


def _say(message: str) -> None:
    print(f"archived: {message}", file=sys.stderr, flush=True)


async def _read(config: Config, fn: Callable[[Any], Any]) -> Any:
    """`fn(store)`, or `fn(None)` when there is no queue yet."""
    from .store_open import open_store

    store = await open_store(config, create=False)
    if store is None:
        return await fn(None)
    try:
        return await fn(store)
    finally:
        await store.close()


def _act(config: Config, fn: Callable[[Any], Any]) -> Any:
    """An operator's action (actions.py) on the queue; one it refuses fails the command."""
    from .actions import Refused

    try:
        return anyio.run(_read, config, fn)
    except Refused as exc:
        raise CommandError(str(exc)) from None


def cmd_jobs(args: argparse.Namespace) -> int:
    config = _load_config(args)
    if args.state and args.state not in State.__members__.values():
        raise CommandError(f"unknown state {args.state!r}; one of: {', '.join(State)}", EXIT_USAGE)

    async def fetch(store: Any) -> list[dict[str, Any]]:
        return [j.to_json() for j in await store.jobs(args.state)] if store else []

    rows = anyio.run(_read, config, fetch)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print(f"{'ID':12}  {'STATE':18}  {'AGE':>6}  {'UPDATED':>7}  NAME")
    for r in rows:
        line = (
            f"{r['id']:12}  {r['state']:18}  {age(r['created_at']):>6}  "
            f"{age(r['updated_at']):>7}  {r['name']}"
        )
        at_risk = [
            f"{r[f'{kind}_copies']} {kind}"
            for kind in ("damaged", "unreachable")
            if r[f"{kind}_copies"]
        ]
        if at_risk:
            line += f"  copies: {', '.join(at_risk)}"
        print(line + (f"  error: {r['error']}" if r["error"] else ""))
    return EXIT_OK


def age(iso: str) -> str:
    """How long ago, the way an operator reads it: 45s, 12m, 3h, 5d."""
    return span((datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds())


def span(seconds: float) -> str:
    """A duration the way an operator reads it: 45s, 12m, 3h, 5d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(int(seconds), 0)}s"


def cmd_show(args: argparse.Namespace) -> int:
    config = _load_config(args)
    from . import actions

    details = anyio.run(_read, config, lambda store: actions.job_details(store, args.job))
    if details is None:
        raise CommandError(f"no job {args.job!r}")
    if args.json:
        print(json.dumps(details, indent=2))
        return EXIT_OK
    print(f"job {details['id']}  {details['name']}")
    print(
        f"  state    {details['state']} for {age(details['updated_at'])}"
        f" (created {age(details['created_at'])} ago)"
    )
    if details["progress"]:
        print(f"  progress {progress.line(progress.Figures(**details['progress']))}")
    if details["state"] == "recoverable_error" or details["attempts"] > 1:
        print(f"  attempt  {details['attempts']} of {details['phase']}")
    if details["retry_at"]:
        print(f"  retry    at {details['retry_at'][:19]}Z, holding no slot meanwhile")
    if details["owner"]:
        print(f"  owner    {details['owner']}")
    if details["legal_hold"]:
        print("  hold     legal hold: retention will not delete this job")
    for key in ("not_before", "expires_at", "error"):
        if details[key]:
            print(f"  {key.replace('_', ' '):8} {details[key]}")
    if details["archive"]:
        a = details["archive"]
        digest = f"sha256 {a['sha256']}" if a["sha256"] else "sha256 computed while stored"
        print(f"  archive  {a['name']}  {a['size']} bytes  {digest}")
    print("history")
    for h in details["history"]:
        print(f"  {h['at'][:23]}  {h['state']:18}  {h['reason']}")
    print("tasks")
    for t in details["tasks"]:
        line = f"  {t['kind']:8}  {t['name']:20}  {t['state']:10}  attempts {t['attempts']}"
        if report := t["progress"]:
            figures = (
                report["files"],
                report["files_total"],
                report["bytes"],
                report["bytes_total"],
            )
            line += f"  {progress.amounts(*figures)} so far"
        elif t["state"] == "completed" and t["result"] and "files" in t["result"]:
            line += f"  {t['result']['files']} files, {t['result']['bytes']} bytes"
        print(line + (f"  error: {t['error']}" if t["error"] else ""))
    if details["copies"]:
        print("copies")
        for c in details["copies"]:
            if c["deleted_at"]:
                print(f"  {c['target']:12}  deleted {c['deleted_at'][:19]}  (was {c['path']})")
                continue
            audited = (
                f", audited {c['audited_at'][:19]}: {c['audit_result']}" if c["audited_at"] else ""
            )
            print(f"  {c['target']:12}  {c['path']}  verified {c['verified_at'][:19]}{audited}")
    warnings = [e for e in details["events"] if e["kind"] == "warning"]
    if warnings:
        print("warnings")
        for e in warnings:
            print(f"  {e['at'][:19]}  {e['detail']['message']}")
            for names in e["detail"].get("names", []):
                print(f"    {', '.join(map(repr, names))}")
    left = [o for o in details["orphans"] if not o["removed_at"]]
    if left:
        print("orphans  (left on a target by cleanup; removed once it answers)")
        for o in left:
            print(f"  {o['target']:12}  {o['key']}  {o['reason']}")
    problems = [a for a in details["audits"] if a["result"] != "ok"]
    if problems:
        print("audit findings")
        for a in problems:
            print(f"  {a['at'][:19]}  {a['target']:12}  {a['result']:10}  {a['detail']}")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from . import actions

    state = _act(_load_config(args), lambda store: actions.cancel(store, args.job))
    print(f"{args.job}: cancel requested (was {state}); it fails at its next safe point")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    from . import actions

    done = _act(_load_config(args), lambda store: actions.retry(store, args.job))
    kept = f"; its archive is kept on {', '.join(done.kept)}" if done.kept else ""
    print(f"{args.job}: queued again (had failed in {done.phase}{kept})")
    return EXIT_OK


def cmd_init_target(args: argparse.Namespace) -> int:
    from .drivers import open_storage

    config = _load_config(args)
    if args.target not in config.storage:
        known = ", ".join(sorted(config.storage))
        raise CommandError(f"no target {args.target!r} in the config (known: {known})", EXIT_USAGE)
    said = anyio.run(open_storage(config, args.target).mark)
    print(
        said
        or f"storage.{args.target}: a {config.storage[args.target].driver} target needs no marker"
    )
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    from . import actions
    from .audit import Auditor

    config = _load_config(args)

    async def audit(store: Any) -> list[Any]:
        if store is None:
            return []
        if args.job:
            await actions.require_job(store, args.job)
        auditor = Auditor(store, config, config.daemon.state_dir / "audit")
        if args.job or args.all:
            return await auditor.round(job_id=args.job)
        return await auditor.round(
            copies=config.audit.copies_per_round, max_bytes=config.audit.bytes_per_round
        )

    results = _act(config, audit)
    for r in results:
        print(f"{r.job_id}  {r.target:12}  {r.result:10}  {r.detail}")
    healed = {(r.job_id, r.target) for r in results if r.result == "repaired"}
    bad = {(r.job_id, r.target) for r in results if r.result in ("missing", "damaged")}
    unreachable = {(r.job_id, r.target) for r in results if r.result == "unreachable"}
    print(
        f"{len({(r.job_id, r.target) for r in results})} copies audited, "
        f"{len(bad)} bad, {len(healed)} repaired"
        + (f", {len(unreachable)} unreachable" if unreachable else "")
    )
    return EXIT_OK if bad <= healed and not unreachable else EXIT_FAILED


def cmd_hold(args: argparse.Namespace) -> int:
    from . import actions

    config = _load_config(args)
    on = args.command == "hold"
    done = _act(config, lambda store: actions.hold(store, config, args.job, on))
    print(f"{args.job}: legal hold {'on: retention will not delete it' if on else 'released'}")
    for line in done.said:
        print(f"  {line}")
    if done.problem:
        raise CommandError(
            f"{done.problem}; the hold is {'on' if on else 'off'} in the database: "
            f"run `archived {args.command} {args.job}` again once the target answers"
        )
    return EXIT_OK


def cmd_schedules(args: argparse.Namespace) -> int:
    from .moments import iso_seconds as iso
    from .schedules import next_slot

    config = _load_config(args)

    async def fetch(store: Any) -> list[dict[str, Any]]:
        if store is None:
            return []
        runs = await store.schedule_runs(args.name, args.limit)
        return [r.to_json() | {"slot": iso(r.slot)} for r in runs]  # slots are whole seconds

    runs = anyio.run(_read, config, fetch)
    if args.json:
        print(json.dumps(runs, indent=2))
        return EXIT_OK
    now = datetime.now(UTC)
    for name, schedule in sorted(config.schedules.items()):
        if args.name in (None, name):
            slot = next_slot(schedule, now)
            print(
                f"{name}: cron {schedule.cron!r} ({schedule.timezone}), missed={schedule.missed}"
                f"{', skip_unchanged' if schedule.skip_unchanged else ''}; "
                f"next {iso(slot)} (in {span((slot - now).total_seconds())})"
            )
    for r in runs:
        print(
            f"  {r['slot']}  {r['schedule']:16}  {r['result']:8}  {r['job_id'] or ''}"
            f"  {r['detail']}"
        )
    return EXIT_OK


def cmd_migrate_queue(args: argparse.Namespace) -> int:
    from .lock import daemon_running
    from .store import SQLITE_FILE, StoreUnavailable
    from .store_open import move_queue

    config = _load_config(args)
    if not config.queue.url:
        raise CommandError("[queue] url is not set: there is no PostgreSQL queue to move to")
    if daemon_running(config.daemon.state_dir):
        raise CommandError(f"a daemon is running on {config.daemon.state_dir}: stop it first")
    try:
        counts = anyio.run(move_queue, config)
    except StoreUnavailable as exc:
        raise CommandError(str(exc)) from None
    print(", ".join(f"{n} {table}" for table, n in counts.items() if n) or "nothing to move")
    print(
        f"moved into the PostgreSQL queue; {config.daemon.state_dir / SQLITE_FILE} is no "
        "longer read (keep it until the daemon runs on the new queue, then remove it)"
    )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from .keys import trusted_keys
    from .minisign import MinisignError, PublicKey
    from .timestamp import load_ca_bundle
    from .verify import verify_path

    keys = []
    if args.key:
        try:
            keys = [PublicKey.loads(Path(args.key).read_text(encoding="utf-8"))]
        except (OSError, UnicodeDecodeError, MinisignError) as exc:
            raise CommandError(f"--key {args.key}: {exc}", EXIT_USAGE) from None
    elif not args.bag_only:
        keys = trusted_keys(_load_config(args))
    path = Path(args.path)
    if not path.exists():
        raise CommandError(f"{path}: no such file or directory", EXIT_USAGE)
    tsa_ca = None
    ca_path = Path(args.tsa_ca) if args.tsa_ca else None
    if ca_path is None and not args.bag_only and not args.key:
        ca_path = _load_config(args).signing.tsa_ca
    if ca_path is not None:
        try:
            tsa_ca = load_ca_bundle(ca_path)
        except ArchivedError as exc:
            raise CommandError(f"--tsa-ca {ca_path}: {exc}", EXIT_USAGE) from None
    report = verify_path(path, keys=keys, bag_only=args.bag_only, tsa_ca=tsa_ca)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for warning in report.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        for problem in report.problems:
            print(f"{problem.path or path}: {problem.message}")
        bag = report.bag
        if report.version not in (None, "1.0"):
            bag += f" (BagIt {report.version})"
        if report.ok:
            signed = f", signed by {report.signed_by}" if report.signed_by else ""
            if report.timestamp:
                signed += f", time-stamped {report.timestamp}"
            print(f"ok: {bag}: {report.files} payload files, {report.bytes} bytes{signed}")
        elif report.verdict == "unverifiable":
            print(f"unverifiable: {bag}: {'; '.join(report.unverifiable)}")
        else:
            print(f"invalid: {bag}: {len(report.problems)} problems")
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_keygen(args: argparse.Namespace) -> int:
    from .keys import public_path
    from .minisign import MinisignError, write_key_pair

    secret = Path(args.secret) if args.secret else _load_config(args).signing.key
    public = Path(args.public) if args.public else public_path(secret)
    secret.parent.mkdir(parents=True, exist_ok=True)
    try:
        key = write_key_pair(secret, public)
    except MinisignError as exc:
        raise CommandError(str(exc)) from None
    print(f"secret key: {secret}\npublic key: {public}\nkey id:     {key.key_id_hex}")
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from .daemon import check_config, shared_storage_warnings

    config = _load_config(args)
    # `run` makes the embedded default's key
    key = not (config.embedded and not config.signing.key.exists())
    warnings = anyio.run(lambda: check_config(config, key=key))
    for warning in [*warnings, *shared_storage_warnings(config)]:
        print(f"archived: warning: {warning}", file=sys.stderr)
    print(f"ok: {config.source or 'embedded default'}")
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    from . import install

    targets = {}
    for spec in args.target:
        name, sep, where = spec.partition("=")
        if not sep or not name or not where:
            raise CommandError(
                f"--target {spec!r}: NAME=PATH, e.g. primary=/srv/archive", EXIT_USAGE
            )
        targets[name] = Path(where)

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    layout = install.layout(
        folder=path(args.dir),
        config=loader.config_path(args.config, system=None),  # the one to write
        state_dir=path(args.state_dir),
        spool_dir=path(args.spool_dir),
        key=path(args.key),
        sources=[Path(s) for s in args.source],
        targets=targets,
    )
    config = install.plan(layout)
    for line in anyio.run(install.create, layout, config):
        print(line)
    print(f"ok: {layout.config}\n{install.next_steps(layout)}", end="")
    return EXIT_OK


# -- wiring --------------------------------------------------------------------------


def _global_options(default: Any) -> argparse.ArgumentParser:
    """--config and --debug, which every command takes before or after its name. After
    it, their default is `default`: SUPPRESS, so as not to undo what was given before."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="PATH", default=default, help="config file (or ARCHIVED_CONFIG)"
    )
    debug = False if default is None else default
    common.add_argument(
        "--debug", action="store_true", default=debug, help="tracebacks and debug logs"
    )
    return common


def parser() -> argparse.ArgumentParser:
    common = _global_options(argparse.SUPPRESS)
    p = argparse.ArgumentParser(
        prog="archived",
        parents=[_global_options(None)],
        description="Signed, checksummed BagIt archives from job files.",
    )
    p.add_argument("--version", action="version", version=f"archived {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, fn: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    add("run", cmd_run, "run the daemon in the foreground")
    sp = add("submit", cmd_submit, "validate job files and drop them into the spool")
    sp.add_argument("--wait", action="store_true", help="block until every job is final")
    sp.add_argument("--timeout", metavar="DURATION", help="with --wait: give up after this")
    sp.add_argument("files", nargs="+", metavar="FILE")
    sp = add("jobs", cmd_jobs, "list jobs")
    sp.add_argument("--state", metavar="S")
    sp.add_argument("--json", action="store_true")
    sp = add("show", cmd_show, "one job: state, history, tasks, copies, errors")
    sp.add_argument("job", metavar="JOB")
    sp.add_argument("--json", action="store_true")
    sp = add("cancel", cmd_cancel, "stop a job: it fails with reason 'canceled'")
    sp.add_argument("job", metavar="JOB")
    sp = add("retry", cmd_retry, "queue a failed job again")
    sp.add_argument("job", metavar="JOB")
    sp = add("hold", cmd_hold, "put a legal hold on a job: retention will not delete it")
    sp.add_argument("job", metavar="JOB")
    sp = add("release", cmd_hold, "release a legal hold")
    sp.add_argument("job", metavar="JOB")
    sp = add("schedules", cmd_schedules, "configured schedules and what each slot did")
    sp.add_argument("name", metavar="NAME", nargs="?")
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")
    sp = add("audit", cmd_audit, "re-read stored copies now and repair damaged ones")
    sp.add_argument("job", metavar="JOB", nargs="?", help="every copy of this job")
    sp.add_argument("--all", action="store_true", help="every copy of every completed job")
    sp = add("verify", cmd_verify, "verify an archive or any bag (a tar, a zip or a directory)")
    sp.add_argument("--key", metavar="PUB", help="minisign public key to check the signature")
    sp.add_argument("--bag-only", action="store_true", help="check BagIt validity alone")
    sp.add_argument("--tsa-ca", metavar="PEM", help="CA bundle to check a time-stamp token")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("path", metavar="PATH")
    sp = add("keygen", cmd_keygen, "create an Ed25519 signing key pair (minisign format)")
    sp.add_argument("--secret", metavar="PATH", help="default: the configured signing.key")
    sp.add_argument("--public", metavar="PATH", help="default: beside the secret key, .pub")
    add("check-config", cmd_check_config, "validate the config")
    add(
        "migrate-queue",
        cmd_migrate_queue,
        "move this host's SQLite queue into the (empty) PostgreSQL queue of [queue] url",
    )
    sp = add(
        "init-target",
        cmd_init_target,
        "mark a target's directory as the target (an empty mount point is not)",
    )
    sp.add_argument("target", metavar="NAME")
    sp = add(
        "init",
        cmd_init,
        "set up an installation: a commented config, its directories, key pair and target "
        "markers; never overwrites",
    )
    sp.add_argument(
        "--dir", metavar="DIR", help="everything in this folder (default: /etc, /var, /srv)"
    )
    sp.add_argument(
        "--target",
        metavar="NAME=PATH",
        action="append",
        default=[],
        help="a localdir storage target (default: primary=DIR/archive or /srv/archive)",
    )
    sp.add_argument(
        "--source",
        metavar="PATH",
        action="append",
        default=[],
        help="a source root jobs may archive from (default: DIR/sources or /srv/exports)",
    )
    sp.add_argument("--state-dir", metavar="PATH")
    sp.add_argument("--spool-dir", metavar="PATH")
    sp.add_argument("--key", metavar="PATH", help="the signing key to make (or keep)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        error: Exception = exc
        code, message = EXIT_CONFIG, "\n".join(f"config error: {p}" for p in exc.problems)
    except CommandError as exc:
        error, code, message = exc, exc.code, str(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader is gone (`archived jobs | head -1`)
        return EXIT_SIGPIPE
    except Exception as exc:
        code, message = EXIT_FAILED, f"error: {exc}"
        if not args.debug:
            print(f"archived: {message}", file=sys.stderr)
            return code
        raise
    if args.debug:
        traceback.print_exception(error)
    for line in message.splitlines():
        print(f"archived: {line}", file=sys.stderr)
    return code


def console() -> NoReturn:
    """The `archived` command: `main()`, then out without the interpreter's teardown,
    which spends about 45 ms freeing modules no one will use again (every command has
    closed what it opened by the time `main()` returns)."""
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # what was left in the buffer had no reader (`| head`)
        code = code or EXIT_SIGPIPE
    except (OSError, ValueError):  # closed
        pass
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)
