"""The steps of a job this daemon runs, each in a transaction on a job it owns:
transitions, updates, its tasks (with the copy a storage task made), events, a copy
forgotten, an orphan recorded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from .states import Event, State
from .store import Job, NewEvent, TaskEnd, utcnow
from .store_sqlbase import SqlBase, Tx


class StepOps(SqlBase):
    """A running job's steps, on a job this daemon owns (LeaseLost otherwise)."""

    async def transition(
        self,
        job_id: str,
        state: State,
        event: str,
        reason: str,
        *,
        events: Iterable[NewEvent] = (),
        ended: Iterable[TaskEnd] = (),
        **fields: Any,
    ) -> Job:
        async with self._owned(job_id) as tx:
            for end in ended:
                await self._finish(tx, job_id, end)
            for logged in events:  # what happened before the move, first
                await self._event(tx, job_id, logged.kind, logged.detail, logged.at)
            await self._transition(tx, job_id, state, Event(event), reason, **fields)
            rows = await tx.rows_later("get_job", id=job_id)  # with them: no read after
        return Job.from_row(rows[0])

    async def update_job(self, job_id: str, **fields: Any) -> None:
        async with self._owned(job_id) as tx:
            await self._update(tx, job_id, fields)

    async def sync_storage_tasks(self, job_id: str, targets: Iterable[str]) -> None:
        wanted = sorted(targets)
        async with self._owned(job_id) as tx:
            await tx.run("drop_unstarted_storage_tasks", job_id=job_id, targets=wanted)
            for target in wanted:
                await tx.run(
                    "insert_task_if_missing",
                    job_id=job_id,
                    kind="storage",
                    name=target,
                    now=utcnow(),
                )

    async def start_task(self, job_id: str, kind: str, name: str) -> None:
        async with self._owned(job_id) as tx:
            await tx.run("start_task", job_id=job_id, kind=kind, name=name, now=utcnow())

    async def finish_tasks(self, job_id: str, ended: Iterable[TaskEnd]) -> Job:
        async with self._owned(job_id) as tx:
            for end in ended:
                await self._finish(tx, job_id, end)
            rows = await tx.rows_later("get_job", id=job_id)
        return Job.from_row(rows[0])

    @staticmethod
    async def _finish(tx: Tx, job_id: str, end: TaskEnd) -> None:
        if end.copy is not None:
            copy = end.copy
            await tx.run(
                "upsert_copy",
                job_id=job_id,
                target=end.name,
                path=copy.path,
                size=copy.size,
                sha256=copy.sha256,
                now=end.at,
            )
        await tx.run(
            "finish_task",
            job_id=job_id,
            kind=end.kind,
            name=end.name,
            state="failed" if end.error is not None else "completed",
            error=end.error,
            result=None if end.result is None else json.dumps(end.result),
            now=end.at,
            counted=1 if end.counted else 0,
        )

    async def task_progress(self, job_id: str, kind: str, name: str, progress: str) -> None:
        async with self._owned(job_id) as tx:
            await tx.run("task_progress", job_id=job_id, kind=kind, name=name, progress=progress)

    async def abandon_tasks(
        self,
        job_id: str,
        unstarted: Iterable[tuple[str, str]] = (),
        ended: Iterable[TaskEnd] = (),
    ) -> None:
        now = utcnow()
        async with self._owned(job_id) as tx:
            for end in ended:
                await self._finish(tx, job_id, end)
            for kind, name in unstarted:  # cut short before their start was committed
                await tx.run("start_task", job_id=job_id, kind=kind, name=name, now=now)
            await tx.run("abandon_tasks", job_id=job_id, now=now)

    async def add_event(self, job_id: str, kind: str, detail: Mapping[str, Any]) -> None:
        async with self._owned(job_id) as tx:
            await self._event(tx, job_id, kind, detail)

    async def forget_copy(self, job_id: str, target: str) -> None:
        async with self._owned(job_id) as tx:
            await tx.run("delete_copy", job_id=job_id, target=target)

    async def record_orphan(self, job_id: str, target: str, key: str, reason: str) -> None:
        async with self._owned(job_id) as tx:
            await self._orphan(tx, job_id, target, key, reason)
            await self._event(
                tx, job_id, "orphan", {"target": target, "key": key, "reason": reason}
            )
