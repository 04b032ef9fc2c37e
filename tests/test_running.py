"""The daemon's poll turns and its running jobs, in-process: a real queue on a temporary
state directory, the job runner replaced by one the test holds, so that what the poll
loop starts, and when, is seen directly."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from jobrows import in_flight, write_config

from archived import config as config_module
from archived import loader
from archived.config import Config
from archived.daemon import Daemon
from archived.intake import Pinned
from archived.runner import JobRunner
from archived.running import RunningJobs
from archived.store_open import open_store


async def wait_for(condition: Callable[[], Any], timeout: float = 10) -> Any:
    with anyio.fail_after(timeout):
        while not (value := condition()):
            await anyio.sleep(0.005)  # polling, not synchronisation
        return value


class Turns:
    """Counts the poll loop's turns (each claims what it can)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        claim = RunningJobs.claim

        async def counted(jobs: RunningJobs) -> None:
            self.count += 1
            await claim(jobs)

        monkeypatch.setattr(RunningJobs, "claim", counted)

    async def wait(self, turns: int) -> None:
        until = self.count + turns
        await wait_for(lambda: self.count >= until)


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Daemon]:
    daemon = Daemon(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        await wait_for(lambda: getattr(daemon, "jobs", None) is not None)
        try:
            yield daemon
        finally:
            daemon.svc.stopping.set()
            daemon.wake.set()


def counted(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    """One item a call of `owner.name`, from now on."""
    calls: list[int] = []
    original = getattr(owner, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


async def test_a_poll_turn_does_not_serialize_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config a job is triggered on is serialized once per load, not twice a turn."""
    config = write_config(tmp_path)
    turns = Turns(monkeypatch)
    calls = counted(monkeypatch, Config, "snapshot")
    async with running(config):
        await turns.wait(2)
        calls.clear()
        await turns.wait(5)
        assert calls == []


def test_pinned_digest_is_the_configs() -> None:
    config = loader.embedded_default()
    pinned = Pinned.of(config)
    assert (pinned.snapshot, pinned.digest) == (config.snapshot(), config.digest)


def test_a_jobs_config_is_validated_once_per_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Job after job runs on the same snapshot: it is validated once, not per job."""
    config = write_config(tmp_path)
    other = loader.embedded_default()
    config_module._from_snapshot.cache_clear()  # as another test may have left it
    validated = counted(monkeypatch, Config, "model_validate")
    first = Config.from_snapshot(config.snapshot())
    assert Config.from_snapshot(config.snapshot()) is first
    assert first.snapshot() == config.snapshot()
    assert Config.from_snapshot(other.snapshot()).snapshot() == other.snapshot()
    assert len(validated) == 2


async def left_in_flight(config: Config, count: int) -> list[str]:
    """`count` jobs a previous run of the daemon left in a processing state."""
    store = await open_store(config)
    assert store is not None
    try:
        return [(await in_flight(store, config, f"job{n}")).id for n in range(count)]
    finally:
        await store.close()


async def test_resumes_at_start_respect_max_concurrent_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs a previous run left in flight resume at most max_concurrent_jobs at a time;
    the others wait their turn."""
    config = write_config(tmp_path, max_concurrent_jobs=1)
    ids = await left_in_flight(config, 3)
    turns = Turns(monkeypatch)
    started: list[str] = []
    active: set[str] = set()
    most = 0
    release = anyio.Event()

    async def held(runner: JobRunner) -> None:
        nonlocal most
        started.append(runner.job.id)
        active.add(runner.job.id)
        most = max(most, len(active))
        try:
            await release.wait()
        finally:
            active.discard(runner.job.id)

    monkeypatch.setattr(JobRunner, "run", held)
    async with running(config):
        await turns.wait(5)
        assert len(started) == 1
        release.set()
        await wait_for(lambda: len(started) == 3)
    assert sorted(started) == ids
    assert most == 1
