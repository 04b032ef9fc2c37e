"""The operator's actions (actions.py) on a real queue in a temporary state directory,
in-process: what each accepts, refuses, and leaves in the queue."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from jobrows import failed, in_flight, queued, write_config

from archived import actions
from archived.config import Config
from archived.states import State
from archived.store import Store
from archived.store_open import open_store


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return write_config(tmp_path)


@pytest.fixture
async def store(config: Config) -> AsyncIterator[Store]:
    opened = await open_store(config)
    assert opened is not None
    try:
        yield opened
    finally:
        await opened.close()


@pytest.mark.parametrize("action", ["cancel", "retry", "require_job"])
async def test_no_queue_or_no_job_is_refused(store: Store, action: str) -> None:
    for where in (None, store):
        with pytest.raises(actions.Refused, match="no job 'nope'"):
            await getattr(actions, action)(where, "nope")


async def test_hold_of_no_job_is_refused(store: Store, config: Config) -> None:
    with pytest.raises(actions.Refused, match="no job 'nope'"):
        await actions.hold(store, config, "nope", True)


async def test_cancel_asks_the_daemon(store: Store, config: Config) -> None:
    await in_flight(store, config, "r1")  # the oldest queued job is the one claimed
    await queued(store, config, "q1")
    assert await actions.cancel(store, "q1") == State.QUEUED
    assert await actions.cancel(store, "r1") == State.ACTIVITY_ARCHIVING
    assert sorted(j.id for j in await store.cancel_requests()) == ["q1", "r1"]


async def test_cancel_of_a_final_job_is_refused(store: Store, config: Config) -> None:
    await failed(store, config, "f1")
    with pytest.raises(actions.Refused, match="job f1 is failed: nothing to cancel"):
        await actions.cancel(store, "f1")
    assert await store.cancel_requests() == []


async def test_retry_queues_a_failed_job_again(store: Store, config: Config) -> None:
    await failed(store, config, "f1")
    done = await actions.retry(store, "f1")
    assert done == actions.Requeued(phase="queued", kept=[])
    job = await store.job("f1")
    assert job is not None and job.state == State.QUEUED
    history = await store.history("f1")
    assert history[-1].reason.startswith("requeued by operator (had failed in queued)")


async def test_retry_of_a_job_not_failed_is_refused(store: Store, config: Config) -> None:
    await queued(store, config, "q1")
    with pytest.raises(actions.Refused, match="job q1 is queued: only failed jobs"):
        await actions.retry(store, "q1")


async def test_hold_and_release(store: Store, config: Config) -> None:
    await queued(store, config, "q1")
    assert await actions.hold(store, config, "q1", True) == actions.Held([], "")
    assert await store.legal_hold("q1")
    await actions.hold(store, config, "q1", False)
    assert not await store.legal_hold("q1")


async def test_job_details(store: Store, config: Config) -> None:
    assert await actions.job_details(None, "q1") is None
    assert await actions.job_details(store, "q1") is None
    await in_flight(store, config, "q1")
    details = await actions.job_details(store, "q1")
    assert details is not None
    assert (details["id"], details["state"], details["owner"]) == (
        "q1",
        "activity_archiving",
        store.host_id,
    )
    assert [h["state"] for h in details["history"]] == [
        "uninitialized",
        "queued",
        "activity_archiving",
    ]
    assert sorted((t["kind"], t["name"]) for t in details["tasks"]) == [
        ("activity", "a"),
        ("storage", "primary"),
    ]
    assert details["progress"] is not None
    assert details["copies"] == details["orphans"] == details["audits"] == []
