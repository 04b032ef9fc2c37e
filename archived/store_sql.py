"""The store's domain operations, once for both backends, over a small connector.

A connector runs named queries (sql/<backend>/queries.sql: the same names and
parameters in both) in transactions, and turns parameters into what its database
takes. `SqlStore` is one object made of rooms by concern, each in its own module
(`store_queue`, `store_steps`, `store_retention`, `store_audits`, `store_schedules`,
`store_reads`); they and `store_sqlbase` are the one place where transactions begin
and commit. What differs by backend (leases and owners, notifications, leaders) are
the few hooks at the end of `SqlBase`, which the SQLite backend leaves as they are.
"""

from __future__ import annotations

import re
from importlib.resources import files

from .store_audits import AuditOps
from .store_queue import QueueOps
from .store_reads import JobReads
from .store_retention import RetentionOps
from .store_schedules import ScheduleOps
from .store_sqlbase import PROCESSING_STATES, Tx
from .store_steps import StepOps

# PROCESSING_STATES and Tx are the backends' too
__all__ = ["PROCESSING_STATES", "SqlStore", "Tx", "load_queries", "migrations"]

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load_queries(backend: str) -> dict[str, str]:
    text = (files("archived") / "sql" / backend / "queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)[1:]
    return {name: body.strip() for name, body in zip(parts[::2], parts[1::2], strict=True)}


def migrations(backend: str) -> list[tuple[int, str]]:
    """(number, SQL) of each numbered migration of `backend`, in order."""
    folder = files("archived") / "sql" / backend / "migrations"
    found = [p for p in folder.iterdir() if p.name.endswith(".sql")]
    return [
        (int(p.name.split("_", 1)[0]), p.read_text(encoding="utf-8"))
        for p in sorted(found, key=lambda p: p.name)
    ]


class SqlStore(QueueOps, StepOps, RetentionOps, AuditOps, ScheduleOps, JobReads):
    """The store's domain operations for both backends: one object (the `Store`
    protocol), its rooms by concern in their own modules."""
