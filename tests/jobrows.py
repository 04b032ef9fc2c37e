"""In-process helpers: a config on a temporary root, and jobs put straight into its queue
(no daemon, no spool), for tests of what acts on job rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio

from archived import loader
from archived.config import Config
from archived.intake import Pinned
from archived.jobfile import parse_job
from archived.keys import KeyRing
from archived.minisign import write_key_pair
from archived.phase import Services
from archived.states import Event, State
from archived.store import Job, NewJob, Store


def write_config(root: Path, **daemon: Any) -> Config:
    """A config on `root`: state, spool, sources, one localdir target, a key pair;
    `daemon` adds to its [daemon] table."""
    for name in ("sources", "target"):
        (root / name).mkdir(exist_ok=True)
    if not (root / "key").exists():
        write_key_pair(root / "key", root / "key.pub")
    settings = {"poll_interval": "10ms", "shutdown_grace": "5s", **daemon}
    path = root / "archived.toml"
    path.write_text(
        "[daemon]\n"
        f"state_dir = {json.dumps(str(root / 'state'))}\n"
        f"spool_dir = {json.dumps(str(root / 'spool'))}\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
        + f"[signing]\nkey = {json.dumps(str(root / 'key'))}\n"
        f"[sources]\nallowed_roots = [{json.dumps(str(root / 'sources'))}]\n"
        f"[storage.primary]\ndriver = 'localdir'\npath = {json.dumps(str(root / 'target'))}\n"
    )
    return loader.load(path)


def services(store: Store, config: Config) -> Services:
    """What a daemon's parts share, one slot of each kind."""
    return Services(
        store=store,
        state_dir=config.daemon.state_dir,
        keys=KeyRing(),
        activity_slots=anyio.CapacityLimiter(1),
        storage_slots=anyio.CapacityLimiter(1),
        hash_threads=anyio.CapacityLimiter(1),
    )


async def queued(
    store: Store, config: Config, job_id: str, targets: tuple[str, ...] = ("primary",)
) -> Job:
    """A job queued as a job file would have been, over the config's first source root,
    with a storage task for each of `targets`."""
    pinned = Pinned.of(config)
    source = str(config.sources.allowed_roots[0])
    data = json.dumps(
        {"name": f"job-{job_id}", "activities": [{"name": "a", "driver": "files", "path": source}]}
    ).encode()
    spec = parse_job(data, "job.json", config)
    new = NewJob(
        id=job_id,
        name=spec.name,
        spec=spec.model_dump_json(),
        spec_sha256="0" * 64,
        config=pinned.snapshot,
        config_digest=pinned.digest,
        not_before=None,
        tasks=(("activity", "a"), *(("storage", t) for t in targets)),
    )
    assert await store.insert_job(new, reason="test")
    job = await store.job(job_id)
    assert job is not None
    return job


async def in_flight(store: Store, config: Config, job_id: str) -> Job:
    """A job claimed, in activity_archiving, as a daemon that stopped left it (the queue's
    only job queued and due: the claim takes the oldest)."""
    await queued(store, config, job_id)
    pinned = Pinned.of(config)
    claim = await store.claim_next(pinned.snapshot, pinned.digest)
    assert claim is not None and claim.job.id == job_id
    return claim.job


async def failed(store: Store, config: Config, job_id: str) -> Job:
    """A job that failed (canceled while queued, its failure path run)."""
    job = await store.cancel_waiting(await queued(store, config, job_id))
    for state, event in (
        (State.FAILURE, Event.HANDLED),
        (State.ERROR_HANDLING, Event.HANDLED),
        (State.CLEANUP, Event.CLEANED_AFTER_FAILURE),
    ):
        await store.transition(job_id, state, event, "test")
    job = await store.job(job_id)
    assert job is not None and job.state == State.FAILED
    return job
