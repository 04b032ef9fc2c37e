"""A third party's driver, installed as a distribution with entry points, is found by
name: as an activity driver of a job file and as a storage driver of the config."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from archived import loader
from archived.errors import ConfigError

PLUGIN = '''
from typing import Any

from archived.drivers.base import (
    ActivityContext,
    ActivityDriver,
    DriverOptions,
    StorageDriver,
    StoredCopy,
)


class GreetingOptions(DriverOptions):
    text: str


class GreetingDriver(ActivityDriver):
    """Writes one file holding its text."""

    Options = GreetingOptions

    def fingerprint(self) -> list[str]:
        return [self.opts.text]

    async def run(self, ctx: ActivityContext) -> dict[str, Any]:
        ctx.writer.add("greeting.txt", self.opts.text.encode(), 0)
        return {"greeted": True}


class NowhereOptions(DriverOptions):
    depth: int = 1


class NowhereDriver(StorageDriver):
    Options = NowhereOptions

    async def ready(self) -> None:
        pass

    async def put(self, archive, key, digest, size, lock=None) -> StoredCopy:
        raise NotImplementedError

    async def check(self, key, sha256, size):
        return None

    async def fetch(self, key, dest):
        raise NotImplementedError

    async def delete(self, key):
        return False
'''

ENTRY_POINTS = """
[archived.activity_drivers]
greeting = greeting_plugin:GreetingDriver

[archived.storage_drivers]
nowhere = greeting_plugin:NowhereDriver
"""

CHECK = """
import json, sys
from pathlib import Path

from archived import loader
from archived.drivers import activity_driver, storage_driver
from archived.jobfile import parse_job
from archived.schedules import fingerprint

root = Path(sys.argv[1])
config = loader.build(
    {
        "daemon": {"state_dir": "state", "spool_dir": "spool"},
        "storage": {"far": {"driver": "nowhere", "depth": 3}},
    },
    source=root / "archived.toml",
)
job = {"name": "hello", "activities": [{"name": "say", "driver": "greeting", "text": "hi"}]}
spec = parse_job(json.dumps(job).encode(), "hello.json", config)
print(json.dumps({
    "activity": activity_driver("greeting").__name__,
    "storage": storage_driver("nowhere").__name__,
    "depth": config.storage_options("far")["depth"],
    "fingerprint": fingerprint(spec) is not None,
}))
"""


def test_a_plugin_driver_is_found_through_its_entry_points(tmp_path: Path) -> None:
    site = tmp_path / "site"
    dist = site / "greeting_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (site / "greeting_plugin.py").write_text(textwrap.dedent(PLUGIN))
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: greeting-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    done = subprocess.run(
        [sys.executable, "-c", CHECK, str(tmp_path)],
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "activity": "GreetingDriver",
        "storage": "NowhereDriver",
        "depth": 3,
        "fingerprint": True,
    }


def test_an_unknown_driver_is_still_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown storage driver 'nowhere'"):
        loader.build({"storage": {"far": {"driver": "nowhere"}}}, source=tmp_path / "a.toml")


NO_AIOBOTOCORE = """
import sys

sys.modules["aiobotocore"] = None  # as if the extra archived[s3] were not installed
from pathlib import Path

from archived import loader
from archived.errors import ConfigError

local = {"driver": "localdir", "path": sys.argv[1]}
loader.build({"storage": {"here": local}}, source=Path(sys.argv[1]) / "a.toml")
assert "archived.drivers.s3" not in sys.modules  # not loaded without an s3 target
try:
    loader.build(
        {"storage": {"far": {"driver": "s3", "bucket": "b"}}}, source=Path(sys.argv[1]) / "a.toml"
    )
except ConfigError as exc:
    print(exc)
"""


def test_an_s3_target_without_its_extra_is_a_config_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_AIOBOTOCORE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "storage.far.driver: the s3 driver needs aiobotocore" in done.stdout
    assert "pip install 'archived[s3]'" in done.stdout
