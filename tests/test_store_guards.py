"""What the store refuses or keeps intact whatever it is given: column names that are
not a job's (under `python -O` too), and event details with any characters in them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from archived.store import NewJob, Store
from archived.store_sqlite import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await SqliteStore.open(tmp_path / "archived.db", "host")
    try:
        await store.insert_job(NewJob("j1", "n", "{}", "", "{}", "", None, ()), reason="new")
        yield store
    finally:
        await store.close()


async def test_update_job_refuses_what_is_not_a_job_column(store: Store) -> None:
    with pytest.raises(ValueError, match="not a job column"):
        await store.update_job("j1", **{"state = 'completed', attempts": 1})
    job = await store.job("j1")
    assert job is not None and job.state == "queued"


UNDER_O = """
import sys
import anyio
from pathlib import Path
from archived.store import NewJob
from archived.store_sqlite import SqliteStore

async def main():
    store = await SqliteStore.open(Path(sys.argv[1]), "host")
    await store.insert_job(NewJob("j1", "n", "{}", "", "{}", "", None, ()), reason="new")
    try:
        await store.update_job("j1", **{"state = 'completed', attempts": 1})
    except ValueError:
        print("refused")
    finally:
        await store.close()

anyio.run(main)
"""


def test_update_job_refuses_under_python_o(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-O", "-c", UNDER_O, str(tmp_path / "archived.db")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "refused"


async def test_a_retention_event_keeps_a_target_name_with_quotes(store: Store) -> None:
    await store.copy_deleted("j1", 'we"ird\\name', existed=True)
    (event,) = [e for e in await store.events("j1") if e.kind == "retention"]
    assert event.detail == {"target": 'we"ird\\name', "deleted": True}
