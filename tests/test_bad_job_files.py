"""Job files that cannot be accepted: never lost, never silently dropped, never fatal.

Every bad kind is dropped straight into `spool/incoming/` of one daemon's root (as
cron would: written in `tmp/`, renamed into `incoming/`), which the daemon then works
in process until idle. Each must land in
`spool/corrupt/` unchanged, beside a one-line `.reason`, with a log line, while the
daemon keeps going; a good job afterwards still completes. `archived submit`, on the
same config, refuses the same regular files with exit code 2 and one line on stderr
that gives the very reason the daemon gives, touching no spool directory. Spool entries
with any name, and one that cannot be moved at all, do not stop the daemon. Last, the
crash windows of the spool: a file in `active/` whose job is already in the database
makes no second job; one whose job is not becomes a job. What needs the daemon running
while the spool changes under it (an entry made unmovable, a folder removed) runs the
daemon as a process: the `slow` tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, Root, minisign_keypair, wait_until
from structlog.testing import capture_logs

from archived.cli import main
from archived.spool import SUBDIRS

MAX_JOB_FILE_BYTES = 8192  # above 4300 digits, the longest int Python parses


@dataclass(frozen=True)
class Site:
    """Paths the job files refer to; shared by the daemon's root and the CLI's."""

    sources: Path  # the one allowed root
    outside: Path  # a directory outside every allowed root
    elsewhere: Path  # where a spool symlink's (valid) target lives


def activity(site: Site, **fields: Any) -> dict[str, Any]:
    return {"name": "a", "driver": "files", "path": str(site.sources / "a"), **fields}


def json_job(site: Site, **fields: Any) -> bytes:
    """A job in JSON: valid unless `fields` make it otherwise."""
    body: dict[str, Any] = {"name": "bad", **fields}
    body.setdefault("activities", [activity(site)])
    return json.dumps(body).encode()


def toml_job(text: str) -> Callable[[Site], bytes]:
    """A job in TOML; `@A@` stands for the path of a good source directory."""
    return lambda site: text.replace("@A@", str(site.sources / "a")).encode()


TOML_ACTIVITY = '[[activities]]\nname = "a"\ndriver = "files"\npath = "@A@"\n'


@dataclass(frozen=True)
class Case:
    id: str
    filename: str  # its name in incoming/, hence in corrupt/
    expected: str  # what its .reason (and `submit`'s stderr) must say
    body: Callable[[Site], bytes]  # the bytes of the file, or of a symlink's target
    kind: str = "file"  # "file", "symlink" (to a valid job elsewhere) or "fifo"


CASES = [
    # unparsable
    Case(
        "toml-unparsable",
        "unparsable.toml",
        "not valid TOML",
        toml_job('name = "bad"\nactivities = [\n'),
    ),
    Case(
        "json-unparsable",
        "unparsable.json",
        "not valid JSON",
        lambda s: json_job(s)[:-7],
    ),
    Case(
        "not-utf8",
        "latin1.toml",
        "not UTF-8",
        lambda s: (
            'name = "bad"\n[metadata]\nCourse = "Prüfung"\n'.encode("latin-1")
            + toml_job(TOML_ACTIVITY)(s)
        ),
    ),
    Case(
        "over-size-limit",
        "huge.json",
        f"over limits.max_job_file_bytes ({MAX_JOB_FILE_BYTES})",
        lambda s: json_job(s, metadata={"Note": "x" * MAX_JOB_FILE_BYTES}),
    ),
    Case(
        "deeply-nested-json",
        "deep.json",
        "not valid JSON",
        lambda s: b'{"name": "bad", "metadata": ' + b"[" * 1500 + b"]" * 1500 + b"}",
    ),
    Case(  # tomllib takes time and memory quadratic in a dotted key's depth
        "deeply-dotted-toml-key",
        "dotted.toml",
        "keys nested more than 32 deep",
        toml_job('name = "bad"\nmetadata.x' + ".y" * 3000 + " = 1\n" + TOML_ACTIVITY),
    ),
    Case(  # the same, inside an inline table, its parts quoted, spaced and numbered
        "deeply-dotted-inline-key",
        "dotted-inline.toml",
        "keys nested more than 32 deep",
        toml_job(
            'name = "bad"\nmetadata = { x = { k' + ' . "y" . 1' * 350 + " = 1 } }\n" + TOML_ACTIVITY
        ),
    ),
    Case(
        "integer-too-long-toml",
        "longint.toml",
        "not valid TOML",
        toml_job('name = "bad"\nretention_days = ' + "9" * 4400 + "\n" + TOML_ACTIVITY),
    ),
    # unknown keys
    Case(
        "unknown-top-level-key",
        "typo-top.toml",
        "retention: unknown key",
        toml_job('name = "bad"\nretention = 10\n' + TOML_ACTIVITY),
    ),
    Case(
        "unknown-activity-key",
        "typo-activity.toml",
        "activities.0.excludes: unknown key",
        toml_job('name = "bad"\n' + TOML_ACTIVITY + 'excludes = ["*.tmp"]\n'),
    ),
    Case(
        "unknown-key-with-a-newline",
        "typo-newline.json",
        "unknown key",
        lambda s: json_job(s, **{"retention\ndays": 10}),
    ),
    Case(
        "duplicate-json-key",
        "dup-key.json",
        "duplicate key 'path'",
        lambda s: (
            '{"name": "bad", "activities": [{"name": "a", "driver": "files", '
            f'"path": "{s.outside}", "path": "{s.sources / "a"}"}}]}}'
        ).encode(),
    ),
    # wrong types
    Case(
        "retention-days-string",
        "ret-string.toml",
        "retention_days: Input should be a valid integer",
        toml_job('name = "bad"\nretention_days = "ten"\n' + TOML_ACTIVITY),
    ),
    Case(
        "retention-days-bool",
        "ret-bool.toml",
        "retention_days: Input should be a valid integer",
        toml_job('name = "bad"\nretention_days = true\n' + TOML_ACTIVITY),
    ),
    Case(
        "activities-not-a-list",
        "activities-str.toml",
        "activities: Input should be a valid list",
        toml_job('name = "bad"\nactivities = "everything"\n'),
    ),
    Case(
        "json-not-an-object",
        "array.json",
        "the top level must be an object",
        lambda s: b"[1, 2]",
    ),
    # drivers, targets, commands
    Case(
        "unknown-driver",
        "tape.json",
        "activities.0.driver: unknown activity driver 'tape'",
        lambda s: json_job(s, activities=[activity(s, driver="tape")]),
    ),
    Case(
        "unknown-storage-target",
        "target.toml",
        "storage: unknown storage target 'tape'",
        toml_job('name = "bad"\nstorage = ["primary", "tape"]\n' + TOML_ACTIVITY),
    ),
    Case(
        "duplicate-storage-target",
        "target-twice.toml",
        "storage: 'primary' is named twice",
        toml_job('name = "bad"\nstorage = ["primary", "primary"]\n' + TOML_ACTIVITY),
    ),
    Case(
        "unknown-command",
        "command.toml",
        "unknown command 'pgdump' (known: none configured)",
        toml_job(
            'name = "bad"\n[[activities]]\nname = "grades"\ndriver = "command"\n'
            'command = "pgdump"\noutput = "grades.dump"\n'
        ),
    ),
    # names
    Case(
        "name-with-slash",
        "name-slash.json",
        "name: String should match pattern",
        lambda s: json_job(s, name="../x"),
    ),
    Case(
        "name-dot-dot",
        "name-dots.json",
        "name: Value error, must not consist of dots only",
        lambda s: json_job(s, name=".."),
    ),
    Case(
        "name-101-chars",
        "name-long.json",
        "name: String should match pattern",
        lambda s: json_job(s, name="n" * 101),
    ),
    Case(
        "name-leading-dash",
        "name-dash.json",
        "name: Value error, must not start with '-'",
        lambda s: json_job(s, name="-rf"),
    ),
    Case(
        "activity-name-leading-dash",
        "activity-dash.json",
        "activities.0.name: Value error, must not start with '-'",
        lambda s: json_job(s, activities=[activity(s, name="--all")]),
    ),
    Case(
        "name-empty",
        "name-empty.json",
        "name: String should match pattern",
        lambda s: json_job(s, name=""),
    ),
    Case(
        "activity-name-dot-dot",
        "activity-dots.json",
        "activities.0.name: Value error, must not consist of dots only",
        lambda s: json_job(s, activities=[activity(s, name="..")]),
    ),
    Case(
        "duplicate-activity-names",
        "dup-activity.json",
        "activity names must be unique: a",
        lambda s: json_job(s, activities=[activity(s), activity(s)]),
    ),
    # paths
    Case(
        "path-outside-allowed-roots",
        "outside.json",
        "outside sources.allowed_roots",
        lambda s: json_job(s, activities=[activity(s, path=str(s.outside))]),
    ),
    Case(
        "path-dot-dot-escape",
        "dotdot.json",
        "outside sources.allowed_roots",
        lambda s: json_job(s, activities=[activity(s, path=f"{s.sources}/../outside")]),
    ),
    Case(
        "path-relative",
        "relative.json",
        "path 'sources/a' must be absolute",
        lambda s: json_job(s, activities=[activity(s, path="sources/a")]),
    ),
    Case(
        "path-symlink-escaping-root",
        "escape.json",
        "outside sources.allowed_roots",
        lambda s: json_job(s, activities=[activity(s, path=str(s.sources / "escape"))]),
    ),
    Case(
        "path-with-a-newline",
        "path-newline.json",
        "outside sources.allowed_roots",
        lambda s: json_job(s, activities=[activity(s, path=f"{s.outside}/new\nline")]),
    ),
    Case(
        "path-with-nul",
        "path-nul.json",
        "null byte",
        lambda s: json_job(s, activities=[activity(s, path=f"{s.sources}/a\x00b")]),
    ),
    # metadata
    Case(
        "metadata-reserved-label",
        "oxum.toml",
        "'Payload-Oxum' is written by archived itself",
        toml_job('name = "bad"\n[metadata]\nPayload-Oxum = "1.1"\n' + TOML_ACTIVITY),
    ),
    Case(
        "metadata-reserved-label-any-case",
        "oxum-lower.json",
        "is written by archived itself",
        lambda s: json_job(s, metadata={"bagging-date": "2020-01-01"}),
    ),
    Case(
        "metadata-multi-line-value",
        "multiline.json",
        "value of 'Course' must be one line",
        lambda s: json_job(s, metadata={"Course": "CS101\nPayload-Oxum: 1.1"}),
    ),
    Case(
        "metadata-unicode-line-separator",
        "u2028.json",
        "value of 'Course' must be one line",
        lambda s: json_job(s, metadata={"Course": "CS101\u2028Payload-Oxum: 1.1"}),
    ),
    Case(
        "metadata-archived-label",
        "poses-as-scheduled.json",
        "'Archived-Schedule' is written by archived itself",
        lambda s: json_job(s, metadata={"Archived-Schedule": "nightly"}),
    ),
    Case(
        "metadata-archived-label-any-case",
        "archived-lower.toml",
        "'archived-anything' is written by archived itself",
        toml_job('name = "bad"\n[metadata]\narchived-anything = "x"\n' + TOML_ACTIVITY),
    ),
    # text that is not Unicode: JSON can spell a lone surrogate, which no UTF-8 can hold
    Case(
        "json-lone-surrogate-in-metadata",
        "surrogate-value.json",
        "metadata.Course: not Unicode text (a lone surrogate \\ud800)",
        lambda s: json_job(s).replace(b'"name"', b'"metadata": {"Course": "\\ud800"}, "name"'),
    ),
    Case(
        "json-lone-surrogate-in-a-key",
        "surrogate-key.json",
        "metadata: not Unicode text (a lone surrogate \\udfff)",
        lambda s: json_job(s).replace(b'"name"', b'"metadata": {"C\\udfff": "x"}, "name"'),
    ),
    Case(
        "json-lone-surrogate-in-a-path",
        "surrogate-path.json",
        "activities.0.path: not Unicode text (a lone surrogate \\udc80)",
        lambda s: json_job(s, activities=[activity(s, path="@P@")]).replace(
            b"@P@", str(s.sources / "a").encode() + b"\\udc80"
        ),
    ),
    # not_before
    Case(
        "not-before-naive-toml",
        "naive.toml",
        "not_before: Input should have timezone info",
        toml_job('name = "bad"\nnot_before = 2026-12-01T02:00:00\n' + TOML_ACTIVITY),
    ),
    Case(
        "not-before-naive-json",
        "naive.json",
        "not_before: Input should have timezone info",
        lambda s: json_job(s, not_before="2026-12-01T02:00:00"),
    ),
    Case(
        "not-before-out-of-range",
        "year9999.toml",
        "not_before: Value error, out of range",
        toml_job('name = "bad"\nnot_before = 9999-12-31T23:00:00-05:00\n' + TOML_ACTIVITY),
    ),
    # spool entries that are not regular files
    Case(
        "spool-entry-symlink",
        "linked.json",
        "is a symbolic link, not a regular file",
        lambda s: json_job(s, name="linked"),
        kind="symlink",
    ),
    Case("spool-entry-fifo", "pipe.toml", "not a regular file", lambda s: b"", kind="fifo"),
]
assert len({c.filename for c in CASES}) == len(CASES), "file names must be unique"


def make_site(base: Path) -> Site:
    sources, outside, elsewhere = base / "sources", base / "outside", base / "elsewhere"
    (sources / "a" / "sub").mkdir(parents=True)
    (sources / "a" / "hello.txt").write_text("hello\n")
    (sources / "a" / "sub" / "data.bin").write_bytes(os.urandom(10_000))
    outside.mkdir()
    (outside / "secret.txt").write_text("not to be archived\n")
    (sources / "escape").symlink_to(outside, target_is_directory=True)
    elsewhere.mkdir()
    return Site(sources, outside, elsewhere)


def make_root(base: Path, site: Site, keys: tuple[Path, Path], targets: dict[str, Path]) -> Root:
    base.mkdir(parents=True, exist_ok=True)
    root = Root(base, base / "archived.toml", site.sources, targets, *keys)
    root.write_config(limits={"max_job_file_bytes": MAX_JOB_FILE_BYTES})
    return root


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad-job-files")


@pytest.fixture(scope="module")
def site(site_dir: Path) -> Site:
    return make_site(site_dir)


@pytest.fixture(scope="module")
def keys(site_dir: Path) -> tuple[Path, Path]:
    (site_dir / "keys").mkdir()
    return minisign_keypair(site_dir / "keys")


@pytest.fixture(scope="module")
def targets(site_dir: Path) -> dict[str, Path]:
    targets = {"primary": site_dir / "t1", "offsite": site_dir / "t2"}
    for target in targets.values():
        target.mkdir()
    return targets


@pytest.fixture(scope="module")
def daemon_root(
    site_dir: Path, site: Site, keys: tuple[Path, Path], targets: dict[str, Path]
) -> Root:
    """One daemon's root (queue, spool) for every case in this module."""
    root = make_root(site_dir / "daemon", site, keys, targets)
    for sub in SUBDIRS:
        (root.spool / sub).mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def cli_root(site_dir: Path, site: Site, keys: tuple[Path, Path], targets: dict[str, Path]) -> Root:
    """The daemon's config but for its own (empty) spool, which no daemon reads."""
    root = make_root(site_dir / "cli", site, keys, targets)
    for sub in SUBDIRS:
        (root.spool / sub).mkdir(parents=True)
    return root


def alive(daemon: Daemon) -> bool:
    return daemon.proc is not None and daemon.proc.poll() is None


def submit(root: Root, path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`archived submit PATH` (its `main`, in process): exit code, stdout, stderr."""
    capsys.readouterr()
    code = main(["submit", str(path), "--config", str(root.config)])
    out, err = capsys.readouterr()
    return code, out, err


def spool_listing(spool: Path) -> dict[str, list[str]]:
    return {sub: sorted(os.listdir(spool / sub)) for sub in SUBDIRS}


def clear_spool(spool: Path) -> None:
    for sub in SUBDIRS:
        for entry in (spool / sub).iterdir():
            entry.unlink()


def make_entry(path: Path, case: Case, site: Site) -> bytes:
    """The case's file, symlink or FIFO at `path`; returns its (target's) bytes."""
    data = case.body(site)
    if case.kind == "fifo":
        os.mkfifo(path)
    elif case.kind == "symlink":
        target = site.elsewhere / f"{case.filename}.target"
        target.write_bytes(data)
        os.symlink(target, path)
    else:
        path.write_bytes(data)
    return data


def drop(spool: Path, case: Case, site: Site) -> bytes:
    """Put the case's entry into incoming/ as cron would; returns its (target's) bytes."""
    tmp = spool / "tmp" / case.filename
    data = make_entry(tmp, case, site)
    os.rename(tmp, spool / "incoming" / case.filename)
    return data


# -- every bad kind: `submit` refuses it, and the daemon puts it in corrupt/, saying the same


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_submit_and_daemon_refuse_bad_job_file_alike(
    daemon_root: Root, cli_root: Root, site: Site, case: Case, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = daemon_root.spool
    submitted = submit_refused(cli_root, case, site, capsys)
    data = drop(spool, case, site)
    moved = spool / "corrupt" / case.filename
    reason = spool / "corrupt" / f"{case.filename}.reason"

    with capture_logs() as logs:
        await daemon_root.run_until_idle()
    (event,) = [
        e for e in logs if e["event"] == "job file rejected" and e.get("file") == case.filename
    ]
    assert os.path.lexists(moved)
    text = reason.read_text()
    assert case.expected in text, f"{case.id}: reason {text!r} lacks {case.expected!r}"
    assert text.endswith("\n") and len(text.splitlines()) == 1, f"{case.id}: {text!r}"
    assert event["log_level"] == "error"
    assert case.expected in event["reason"], event
    assert event["moved_to"] == str(moved), event
    path, line = submitted  # one validation: the very same verdict
    assert line == f"archived: {path}: {text.rstrip()}", (case.id, line, text)

    if case.kind == "fifo":
        assert stat.S_ISFIFO(os.lstat(moved).st_mode), f"{case.id}: no longer a FIFO"
    elif case.kind == "symlink":
        target = site.elsewhere / f"{case.filename}.target"
        assert moved.is_symlink(), f"{case.id}: no longer a symlink"
        assert os.readlink(moved) == str(target)
        assert target.read_bytes() == data, f"{case.id}: the link's target was changed"
    else:
        assert not moved.is_symlink() and moved.is_file(), f"{case.id}: not a regular file"
        assert moved.read_bytes() == data, f"{case.id}: bytes changed on the way to corrupt/"

    # claimed exactly once: nothing of it is left in incoming/ or active/
    left = spool_listing(spool)
    assert not [n for n in left["incoming"] + left["active"] if case.filename in n], left
    assert left["tmp"] == []


async def test_good_job_after_the_bad_ones_completes(daemon_root: Root) -> None:
    root = daemon_root
    (job_id,) = root.drop(root.job_file("good-after-bad"))
    await root.run_until_idle()
    job = await root.details(job_id)
    assert job["state"] == "completed", job
    # no bad file (nor the symlink's valid target) became a job
    listed = await root.jobs()
    assert [(j["id"], j["name"]) for j in listed] == [(job_id, "good-after-bad")]
    assert spool_listing(root.spool)["incoming"] == []
    assert spool_listing(root.spool)["active"] == []


# -- spool entries whose names or nature make them hard to take ------------------------

ODD_NAMES = [b"x" * n for n in range(1, 256)] + [
    b"\xff\xfe.json",  # not UTF-8
    b"\xff" * 255,  # not UTF-8, and as long as a name can be
    "é".encode() * 127,  # 254 bytes of two-byte characters
    b"y" * 250 + b".json",  # 255 bytes, and it says JSON
    b"-rf",
    b"--config",
    b"-",
    b"new\nline.toml",
    b"tab\there",
    b"\x01\x02\x1b[31m",
    b" leading space",
    b"trailing space ",
    b"back\\slash",
    b"line\xe2\x80\xa8separator",
    b"*?[",
]
NOT_A_JOB = b"this is not a job file\n"


def shown(raw: bytes) -> str:
    """How a .reason file spells a name: invalid bytes and control characters escaped."""
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


async def test_no_spool_entry_name_stops_the_daemon(daemon_root: Root) -> None:
    """Every name length 1..255 and odd bytes: each entry lands in corrupt/ with a reason,
    under a shortened name (the original in the .reason) where its own leaves no room."""
    spool = os.fsencode(daemon_root.spool)
    corrupt = os.path.join(spool, b"corrupt")
    before = set(os.listdir(corrupt))
    for raw in ODD_NAMES:
        tmp = os.path.join(spool, b"tmp", b"entry")
        with open(tmp, "wb") as f:
            f.write(NOT_A_JOB)
        os.rename(tmp, os.path.join(spool, b"incoming", raw))

    await daemon_root.run_until_idle()
    left = os.listdir(os.path.join(spool, b"incoming")) + os.listdir(os.path.join(spool, b"active"))
    assert left == []
    new = sorted(set(os.listdir(corrupt)) - before)
    moved = [n for n in new if not n.endswith(b".reason")]
    assert len(moved) == len(ODD_NAMES)
    reasons = {}
    for name in moved:
        assert name + b".reason" in new, name
        with open(os.path.join(corrupt, name), "rb") as f:
            assert f.read() == NOT_A_JOB, f"{name!r} changed on the way to corrupt/"
        with open(os.path.join(corrupt, name + b".reason"), "rb") as f:
            reasons[name] = f.read().decode()
    for raw in ODD_NAMES:
        if raw in reasons:  # under its own name
            assert "not valid" in reasons[raw], (raw, reasons[raw])
            continue
        (text,) = [t for t in reasons.values() if f"original name: {shown(raw)}\n" in t]
        assert len(raw) + len(b".reason") > 255, raw
        assert "not valid" in text.splitlines()[0], text
    assert len(new) == 4 * len(ODD_NAMES) // 2
    (job_id,) = daemon_root.drop(daemon_root.job_file("good-after-odd-names"))
    await daemon_root.run_until_idle()
    assert (await daemon_root.details(job_id))["state"] == "completed"


@pytest.mark.slow  # the entry is made unmovable while the daemon runs
def test_an_entry_that_cannot_be_moved_is_logged_once_and_skipped(root: Root) -> None:
    """A mount point in incoming/ can be neither claimed nor moved to corrupt/ (EBUSY)."""
    daemon = root.start()
    source = root.path / "mounted.json"
    source.write_bytes(NOT_A_JOB)
    entry = root.spool / "incoming" / "stuck.json"
    daemon.send(signal.SIGSTOP)  # so that it cannot take the entry before it is mounted on
    try:
        entry.write_bytes(b"")
        done = subprocess.run(
            ["mount", "--bind", str(source), str(entry)], capture_output=True, timeout=10
        )
        if done.returncode != 0:
            entry.unlink()
            pytest.skip(f"cannot bind-mount here: {done.stderr.decode().strip()}")
    finally:
        daemon.send(signal.SIGCONT)
    try:

        def stuck_events() -> list[dict[str, Any]]:
            assert alive(daemon), f"daemon died:\n{daemon.log_text()[-3000:]}"
            return [e for e in daemon.events() if e.get("file") == "stuck.json"]

        (event,) = wait_until(stuck_events, 20, "the stuck entry logged")
        assert "Device or resource busy" in event["error"], event
        # the daemon goes on serving, and says it once however many polls pass
        (job_id,) = root.submit(root.job_file("good-beside-stuck"))
        assert root.wait_state(job_id, "completed", "failed")["state"] == "completed"
        assert len(stuck_events()) == 1, stuck_events()
    finally:
        subprocess.run(["umount", str(entry)], capture_output=True, timeout=10)
    # once it can be moved, the next poll takes it
    reason = root.spool / "corrupt" / "stuck.json.reason"
    wait_until(reason.exists, 20, "the entry taken once it is no longer stuck")
    assert alive(daemon)


# -- `archived submit` ------------------------------------------------------------------


def submit_refused(
    cli_root: Root, case: Case, site: Site, capsys: pytest.CaptureFixture[str]
) -> tuple[Path, str]:
    """`submit` of the case's entry: refused with exit 2 and one line, the spool untouched.
    Returns the entry's path and that line."""
    path = cli_root.path / case.filename
    make_entry(path, case, site)
    empty: dict[str, list[str]] = {sub: [] for sub in SUBDIRS}
    clear_spool(cli_root.spool)  # whatever an earlier (failed) case may have left

    code, out, err = submit(cli_root, path, capsys)

    assert code == 2, (case.id, code, err)
    lines = err.splitlines()
    assert len(lines) == 1, f"{case.id}: stderr is not one line: {err!r}"
    assert str(path) in lines[0] and case.expected in lines[0], (case.id, lines[0])
    assert "Traceback" not in err
    assert out == "", f"{case.id}: printed a job id for a refused file"
    assert spool_listing(cli_root.spool) == empty, f"{case.id}: submit wrote into the spool"
    return path, lines[0]


@pytest.mark.timeout(20)  # were it to block
def test_submit_does_not_block_on_a_fifo(
    cli_root: Root, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = cli_root.path / "pipe.json"
    os.mkfifo(fifo)
    clear_spool(cli_root.spool)
    code, _, err = submit(cli_root, fifo, capsys)
    assert code == 2, err
    assert "not a regular file" in err
    assert spool_listing(cli_root.spool)["incoming"] == []


def test_submit_accepts_a_good_file_into_incoming(
    cli_root: Root, capsys: pytest.CaptureFixture[str]
) -> None:
    """The control for the refusals above: the same root does take a valid job."""
    path = cli_root.job_file("control")
    clear_spool(cli_root.spool)
    code, out, err = submit(cli_root, path, capsys)
    try:
        assert code == 0, err
        (job_id,) = out.split()
        assert spool_listing(cli_root.spool)["incoming"] == [f"{job_id}.json"]
        assert (cli_root.spool / "incoming" / f"{job_id}.json").read_bytes() == path.read_bytes()
    finally:
        clear_spool(cli_root.spool)


# -- crash windows of the spool --------------------------------------------------------


async def test_reingested_active_file_does_not_make_a_second_job(root: Root) -> None:
    job_file = root.job_file("once")
    (job_id,) = root.drop(job_file)
    await root.run_until_idle()
    before = await root.details(job_id)
    assert before["state"] == "completed", before

    # crash window: the job was inserted, but its file was not yet removed from active/
    active = root.spool / "active"
    spent = active / f"{job_id}__{job_id}.json"
    shutil.copyfile(job_file, spent)
    # and a different file that claims the same job id must not replace that job
    clash = active / f"{job_id}__clash.json"
    clash_bytes = root.job_file("clash").read_bytes()
    clash.write_bytes(clash_bytes)

    with capture_logs() as logs:
        await root.run_until_idle()
    assert os.listdir(active) == []
    listed = await root.jobs()
    assert [j["id"] for j in listed] == [job_id], listed
    after = await root.details(job_id)
    assert after["state"] == "completed"
    assert after["history"] == before["history"], "the job was touched again"
    assert {t: len(root.archives(t)) for t in root.targets} == {t: 1 for t in root.targets}
    assert not [e for e in logs if e["event"] == "job queued"], (
        "the re-ingested file was queued again"
    )
    reason = root.spool / "corrupt" / "clash.json.reason"
    assert f"job id {job_id} already exists" in reason.read_text()
    assert (root.spool / "corrupt" / "clash.json").read_bytes() == clash_bytes


async def test_leftover_active_file_without_a_job_becomes_one(root: Root) -> None:
    # crash window: the file was renamed into active/, the job not yet inserted
    job_id = "0123456789ab"
    active = root.spool / "active"
    active.mkdir(parents=True)
    leftover = active / f"{job_id}__leftover.json"
    leftover.write_bytes(root.job_file("leftover").read_bytes())

    with capture_logs() as logs:
        await root.run_until_idle()
    job = await root.details(job_id)
    assert job["state"] == "completed", job
    assert job["name"] == "leftover"
    assert not leftover.exists()
    assert os.listdir(active) == []
    assert os.listdir(root.spool / "corrupt") == []
    listed = await root.jobs()
    assert [j["id"] for j in listed] == [job_id]
    queued = [e for e in logs if e["event"] == "job queued"]
    assert [(e["job_id"], e["file"]) for e in queued] == [(job_id, "leftover.json")]
    assert {t: len(root.archives(t)) for t in root.targets} == {t: 1 for t in root.targets}


@pytest.mark.slow  # the folder goes while the daemon runs
@pytest.mark.parametrize("removed", ["corrupt", "active", "tmp"])
def test_a_spool_folder_removed_under_the_daemon_comes_back(root: Root, removed: str) -> None:
    """An operator's `rm -r spool/corrupt` (or active/, tmp/) while the daemon runs: the
    next bad file still lands in corrupt/ with its reason, and good jobs still run."""
    daemon = root.start()
    shutil.rmtree(root.spool / removed)
    bad = root.spool / "incoming" / "bad.json"
    bad.write_bytes(NOT_A_JOB)
    reason = root.spool / "corrupt" / "bad.json.reason"  # written before the file moves
    moved = root.spool / "corrupt" / "bad.json"
    wait_until(moved.exists, 20, f"bad.json moved to corrupt/ after {removed}/ was removed")
    assert moved.read_bytes() == NOT_A_JOB and reason.exists()
    good = root.spool / "incoming" / "good.json"
    good.write_bytes(root.job_file("good").read_bytes())
    listed = wait_until(
        lambda: json.loads(root.cli("jobs", "--json", check=True).stdout), 20, "the good job"
    )
    (job,) = listed
    assert root.wait_state(job["id"], "completed", "failed")["state"] == "completed"
    assert alive(daemon)
    assert spool_listing(root.spool)["active"] == []
