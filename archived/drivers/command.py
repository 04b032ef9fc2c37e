"""Activity driver `command`: the standard output of a program the config defines.

A job names a `[commands.NAME]` section, never a command line. It may add
arguments only where the config allows them (`allowed_args`, glob patterns each
argument must match). The program runs without a shell, stdin closed, in a clean
environment (PATH, LANG and the section's `env`). Its stdout streams into the
artifact through the shared writer, hashed as it is written; the last
`STDERR_LIMIT` bytes of stderr go into the job's event log. A non-zero exit is
fatal unless its code is in `transient_exit_codes`; a timeout is recoverable. A
cancelled or timed-out program is stopped at once with all it started (children.py).
"""

from __future__ import annotations

import fnmatch
import os
import selectors
import time
from typing import Any

import anyio
import anyio.from_thread
from pydantic import Field

from ..children import STDERR_LIMIT, Child
from ..config import CommandConfig, Config
from ..errors import ArchivedError, JobFileError, TransientError
from ..fileio import BUFFER_SIZE
from .base import ActivityContext, ActivityDriver, DriverOptions


class CommandFailed(ArchivedError):
    """The program exited with a code the config does not call transient."""


class CommandOptions(DriverOptions):
    command: str
    output: str = Field(default="", pattern=r"^$|^[A-Za-z0-9._-]{1,100}$")
    args: list[str] = []


def _clean_env(section: CommandConfig) -> dict[str, str]:
    keep = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TZ") if k in os.environ}
    return {**keep, **section.env}


class CommandDriver(ActivityDriver):
    Options = CommandOptions
    opts: CommandOptions

    @classmethod
    def check(cls, options: Any, config: Config) -> None:
        section = config.commands.get(options.command)
        if section is None:
            known = ", ".join(sorted(config.commands)) or "none configured"
            raise JobFileError(f"unknown command {options.command!r} (known: {known})")
        if set(options.output) == {"."}:
            raise JobFileError("output must not consist of dots only")
        for arg in options.args:
            if not any(fnmatch.fnmatchcase(arg, p) for p in section.allowed_args):
                raise JobFileError(
                    f"argument {arg!r} is not allowed for command {options.command!r} "
                    f"(commands.{options.command}.allowed_args)"
                )

    async def run(self, ctx: ActivityContext) -> dict[str, Any]:
        commands = ctx.config.commands  # the command is there: checked before the work
        return await self.checked_in_thread(
            ctx, lambda: self._run(ctx, commands[self.opts.command])
        )

    def _run(self, ctx: ActivityContext, section: CommandConfig) -> dict[str, Any]:
        argv = [*section.argv, *self.opts.args]
        output = self.opts.output or f"{self.opts.command}.out"
        writer = ctx.writer
        writer.start()
        try:
            child = Child(argv, env=_clean_env(section), cwd=section.cwd, capture_stdout=True)
        except OSError as exc:
            raise CommandFailed(
                f"command {self.opts.command}: cannot run {argv[0]}: {exc.strerror}"
            ) from None
        check_cancelled = anyio.from_thread.check_cancelled
        deadline = time.monotonic() + section.timeout
        timed_out = False
        try:
            with writer.stream(output) as sink, selectors.DefaultSelector() as sel:
                sel.register(child.stdout, selectors.EVENT_READ)
                fd = child.stdout.fileno()
                while True:
                    check_cancelled()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        timed_out = True
                        break
                    if not sel.select(min(left, 0.2)):
                        continue
                    chunk = os.read(fd, BUFFER_SIZE)
                    if not chunk:
                        break
                    sink.write(chunk)
            # stdout is closed: give the program the rest of its time to exit
            timed_out = timed_out or not child.wait(deadline, check_cancelled)
        finally:
            code = child.stop()  # at once, when cancelled: nothing waits for its timeout
        stderr = child.stderr()
        if stderr.strip():
            ctx.notes.append(
                f"command {self.opts.command} stderr (last {STDERR_LIMIT} bytes):\n{stderr}"
            )
        last_line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        if timed_out:
            raise TransientError(
                f"command {self.opts.command} timed out after {section.timeout:g}s"
            )
        if code != 0:
            message = f"command {self.opts.command} exited with {code}"
            message += f": {last_line}" if last_line else ""
            if code in section.transient_exit_codes:
                raise TransientError(message)
            raise CommandFailed(message)
        if writer.total_bytes == 0 and not section.allow_empty:
            raise CommandFailed(
                f"command {self.opts.command} printed nothing "
                f"(set commands.{self.opts.command}.allow_empty if that is fine)"
            )
        return {**writer.finish(), "exit": code}
