"""What a trivial job costs the queue, counted (not timed): its transactions and its
trips to the database's thread. A burst of small jobs waits on these, one after
another (bench/tiny.py measures the time); a change that adds one per job shows here."""

from __future__ import annotations

import collections
from typing import Any

import pytest

from archived import store_sqlite
from tests.conftest import Root

JOBS = 5
# a job: taken in, claimed, its tasks finished (one activity, two targets; a task's start
# is committed only once it has run a second; the activity's end goes with the transition
# out of its phase, the two copies share a commit), four transitions after the claim
# (post-processing's steps go with the one out of it), and a share of what the daemon
# does besides (housekeeping, the poll loop); measured 8.4 to 8.6 and 21 to 22 (about
# 22 to 23 with history and events read apart; 26.4 with the reads of the storage tasks,
# the kept copies and the job after the copies; 10.4 and 28.8 to 29.2 with each task's
# end committed alone; 13.4 and 34.2 with each start committed)
TRANSACTIONS = 9
TRIPS = 23  # those, the reads (the poll loop's among them) and the shared COMMITs


async def test_a_trivial_job_costs_a_bounded_number_of_commits_and_trips(
    root: Root, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root.sources / "a").mkdir(parents=True, exist_ok=True)
    (root.sources / "a" / "f.bin").write_bytes(b"x" * 1024)
    root.drop(root.job_file("warm-up"))
    await root.run_until_idle()  # the schema made, the key loaded: not counted

    transactions: collections.Counter[str] = collections.Counter()
    trips = 0
    opened = store_sqlite.SqliteConnector.transaction
    hop = store_sqlite.aiosqlite.Connection._execute

    def transaction(self: store_sqlite.SqliteConnector) -> Any:
        transactions["all"] += 1
        return opened(self)

    async def counted(self: Any, fn: Any, *args: Any, **kw: Any) -> Any:
        nonlocal trips
        trips += 1
        return await hop(self, fn, *args, **kw)

    monkeypatch.setattr(store_sqlite.SqliteConnector, "transaction", transaction)
    monkeypatch.setattr(store_sqlite.aiosqlite.Connection, "_execute", counted)
    root.drop(*[root.job_file(f"j{i}") for i in range(JOBS)])
    await root.run_until_idle()

    jobs = [j for j in await root.jobs() if j["name"].startswith("j")]
    assert [j["state"] for j in jobs] == ["completed"] * JOBS
    assert transactions["all"] <= TRANSACTIONS * JOBS, transactions
    assert trips <= TRIPS * JOBS, trips
