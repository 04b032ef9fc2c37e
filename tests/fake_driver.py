"""An activity driver for tests, loaded as a plugin's would be (see the `fake_activity`
fixture): it archives the files its options name, or fails the way they say.

    {"name": "a", "driver": "fake", "files": {"x.txt": "x"}, "fail": "transient", "times": 2}

fails the first two runs of activity `a` with a recoverable error, then archives x.txt.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, ClassVar, Literal

import anyio

from archived.drivers.base import ActivityContext, ActivityDriver, DriverOptions
from archived.errors import SourceError, TransientError


class FakeOptions(DriverOptions):
    files: dict[str, str] = {"fake.txt": "fake\n"}
    fail: Literal["", "transient", "fatal", "hang"] = ""
    times: int = 1_000_000  # how many runs fail, the first ones (default: every run)
    unjson: bool = False  # report a result that is not JSON (a plugin's mistake)


class FakeActivity(ActivityDriver):
    Options = FakeOptions
    opts: FakeOptions
    runs: ClassVar[Counter[str]] = Counter()  # runs by activity name, in this process

    async def run(self, ctx: ActivityContext) -> dict[str, Any]:
        self.runs[self.name] += 1
        if self.opts.fail and self.runs[self.name] <= self.opts.times:
            if self.opts.fail == "hang":
                await anyio.sleep_forever()
            if self.opts.fail == "transient":
                raise TransientError(f"fake: run {self.runs[self.name]} fails, may pass")
            raise SourceError(f"fake: run {self.runs[self.name]} fails for good")
        writer, now = ctx.writer, time.time()
        writer.start()
        for relpath, text in sorted(self.opts.files.items()):
            writer.add(relpath, text.encode(), now)
        result = writer.finish()
        return {**result, "odd": {1, 2}} if self.opts.unjson else result
