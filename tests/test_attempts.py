"""An attempt counted by the commit that enters a phase (the claim's, a transition's)
and given back when the daemon stops before the phase began: shutdown is not the
phase's fault. In process, on a real queue."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from jobrows import services, write_config

from archived.config import Config
from archived.intake import Intake, Pinned
from archived.phase import Services
from archived.runner import JobRunner
from archived.spool import Spool
from archived.states import State
from archived.store_open import open_store


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[Services]:
    config: Config = write_config(tmp_path)
    store = await open_store(config)
    assert store is not None
    shared = services(store, config)
    spool = Spool(config.daemon.spool_dir)
    spool.create()
    activity = {"name": "a", "driver": "files", "path": str(config.sources.allowed_roots[0])}
    spool.submit(json.dumps({"name": "j", "activities": [activity]}).encode(), ".json")
    pinned = Pinned.of(config)
    await Intake(spool, shared, lambda: pinned, lambda: None).ingest()
    try:
        yield shared
    finally:
        await store.close()


async def test_an_attempt_the_claim_counted_is_given_back_if_the_daemon_stops_first(
    svc: Services,
) -> None:
    claim = await svc.store.claim_next("{}", "d")
    assert claim is not None and claim.job.attempts == 1
    svc.stopping.set()  # the daemon stops before the runner's first step
    await JobRunner(svc, claim.job, counted=State.ACTIVITY_ARCHIVING).run()
    job = await svc.store.job(claim.job.id)
    assert job is not None and (job.state, job.phase, job.attempts) == (
        State.ACTIVITY_ARCHIVING,
        "activity_archiving",
        0,
    )


async def test_nothing_is_given_back_that_was_not_counted(svc: Services) -> None:
    claim = await svc.store.claim_next("{}", "d")
    assert claim is not None
    svc.stopping.set()
    await JobRunner(svc, claim.job).run()  # resumed: nothing counted on the way in
    job = await svc.store.job(claim.job.id)
    assert job is not None and job.attempts == 1
