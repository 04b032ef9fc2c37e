"""The JSON log lines: each names the module's component, and an exception comes as
structured frames, not a text blob."""

from __future__ import annotations

import json
import subprocess
import sys

LOG_SOME = """
from archived import log
from archived.retention import log as retention_log

log.configure()
retention_log.info("looked at the jobs", jobs=3)
try:
    {}["missing"]
except KeyError:
    retention_log.exception("round failed")
"""


def test_json_lines_carry_the_component_and_structured_tracebacks() -> None:
    done = subprocess.run(
        [sys.executable, "-c", LOG_SOME], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    info, failed = (json.loads(line) for line in done.stderr.splitlines())
    assert info["event"] == "looked at the jobs"
    assert info["component"] == failed["component"] == "retention"
    (exception,) = failed["exception"]
    assert exception["exc_type"] == "KeyError"
    assert exception["frames"][-1]["name"] == "<module>"
