"""What every room of the SQL store stands on: the connector and its transactions, the
statements the operations share (a transition with its history, an update, an event, an
orphan, a schedule run), and the hooks where backends differ, at the end of `SqlBase`,
which the SQLite backend leaves as they are.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import Any, Protocol

from .states import FINAL, IDLE, PROCESSING, Event, State, next_state
from .store import ScheduleRun, StaleState, utcnow

# The job columns a transition or an update may set (never id, state, spec).
JOB_COLUMNS = frozenset(
    {
        "phase",
        "step",
        "attempts",
        "retry_at",
        "error",
        "cancel_requested",
        "archive_name",
        "archive_sha256",
        "archive_size",
        "payload_files",
        "payload_bytes",
        "started_at",
        "config",
        "config_digest",
        "expires_at",
        "cleanup_attempts",
        "owner",
        "lease_until",
    }
)
PROCESSING_STATES = sorted(PROCESSING)


class Tx(Protocol):
    """The statements of one open transaction."""

    async def run(self, query: str, **params: Any) -> None:
        """A named write. A backend may hold it back until the transaction's next read
        or its end (SQLite sends them all at once), so its error may come then."""
        ...

    async def must_change(self, query: str, stale: BaseException, **params: Any) -> None:
        """A named write that must change exactly one row: `stale` is raised if not (at
        the latest when the transaction ends; it is undone then)."""
        ...

    async def count(self, query: str, **params: Any) -> int:
        """A named write, now; the rows it changed."""
        ...

    async def all(self, query: str, **params: Any) -> list[dict[str, Any]]: ...

    async def rows_later(self, query: str, **params: Any) -> list[dict[str, Any]]:
        """A named read that goes with the writes before it: the list it returns is
        filled by the time the transaction ends (at once where writes are not held
        back)."""
        ...

    async def execute(self, sql: str, params: Mapping[str, Any]) -> None:
        """SQL made here from known column names (with `:name` parameters), as `run`."""
        ...


class Connector(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """Begin ... commit, shielded from cancellation; rollback on error."""
        ...

    async def fetch(self, query: str, **params: Any) -> list[dict[str, Any]]:
        """A named read, outside any transaction."""
        ...

    async def close(self) -> None: ...


class SqlBase:
    """The connection and the shared statements; each room of `SqlStore` is one of these."""

    host_id: str
    shared = False
    lease = 0.0  # seconds; one daemon alone needs no leases

    def __init__(self, db: Connector, host_id: str) -> None:
        self.db, self.host_id = db, host_id

    async def close(self) -> None:
        await self.db.close()

    async def ping(self) -> None:
        await self.db.fetch("ping")

    # -- statements the rooms share ---------------------------------------------------

    async def _transition(
        self, tx: Tx, job_id: str, state: State, event: Event, reason: str, **fields: Any
    ) -> State:
        """Move the job from `state` by `event`, with history; StaleState if it moved."""
        to_state = next_state(state, event)
        if to_state in FINAL | IDLE:  # no daemon runs it now
            fields |= {"owner": None, "lease_until": None}
        now = utcnow()
        await tx.must_change(
            "set_state",
            StaleState(f"job {job_id} is no longer {state}"),
            id=job_id,
            from_state=state,
            to_state=to_state,
            now=now,
        )
        await self._update(tx, job_id, fields)
        await self._history(tx, job_id, to_state, reason, now)
        return to_state

    async def _history(self, tx: Tx, job_id: str, state: State, reason: str, now: datetime) -> None:
        await tx.run("insert_history", job_id=job_id, state=state, now=now, reason=reason)

    async def _update(self, tx: Tx, job_id: str, fields: Mapping[str, Any]) -> None:
        if not fields:
            return
        # the names go into the SQL text: a real check, which `python -O` keeps
        if unknown := set(fields) - JOB_COLUMNS:
            raise ValueError(f"not a job column: {sorted(unknown)}")
        assignments = ", ".join(f"{column} = :{column}" for column in sorted(fields))
        await tx.execute(f"UPDATE jobs SET {assignments} WHERE id = :id", {**fields, "id": job_id})

    async def _event(
        self,
        tx: Tx,
        job_id: str,
        kind: str,
        detail: Mapping[str, Any],
        at: datetime | None = None,
    ) -> None:
        await tx.run(
            "insert_event",
            job_id=job_id,
            now=at or utcnow(),
            kind=kind,
            detail=json.dumps(detail, sort_keys=True),
        )

    async def _orphan(self, tx: Tx, job_id: str, target: str, key: str, reason: str) -> None:
        await tx.run(
            "upsert_orphan", job_id=job_id, target=target, key=key, reason=reason, now=utcnow()
        )

    async def _schedule_run(self, tx: Tx, run: ScheduleRun) -> bool:
        inserted = await tx.count(
            "insert_schedule_run",
            schedule=run.schedule,
            slot=run.slot,
            result=run.result,
            job_id=run.job_id,
            fingerprint=run.fingerprint,
            detail=run.detail,
            now=run.at or utcnow(),
        )
        return inserted == 1

    # -- what backends differ in: one daemon (SQLite) needs none of it -----------------

    def _owned(self, job_id: str) -> AbstractAsyncContextManager[Tx]:
        """A transaction on a job this daemon runs: LeaseLost if it is not its own."""
        return self.db.transaction()

    def check_lease(self, job_id: str) -> None:
        return None

    async def _hold(self, tx: Tx, job_id: str) -> None:
        """Make the job this daemon's (and start its lease), in a claim."""
        await self._update(tx, job_id, {"owner": self.host_id})

    def _leases_renewed(self, job_ids: set[str], sent: float) -> None:
        """The database renewed these leases, asked at `sent` (time.monotonic())."""

    async def _announce(self, tx: Tx, what: str) -> None:
        """Tell the other daemons at commit: a new job, a cancel."""

    async def renew_leases(self) -> set[str]:
        return set()

    async def listen(self, on_news: Callable[[], None]) -> None:
        """Call `on_news` whenever another process queued a job or asked for a cancel;
        returns at once where the daemon is the only one (it polls)."""

    @asynccontextmanager
    async def leading(self, task: str) -> AsyncIterator[bool]:
        yield True
