"""The daemon's threads on one CPU; a thread moving bulk data on all of them.

The daemon's Python runs in several threads: the event loop, aiosqlite's, the worker
threads of small steps. Only one of them runs Python at a time (the GIL). Spread over
several CPUs, each hand-over of the GIL, each wake-up of a waiting thread, crosses CPUs,
and on a virtual machine a cross-CPU wake-up is expensive. A burst of 300 tiny jobs
(bench/tiny.py, two vCPUs) on one CPU: 27.6 ms CPU a job instead of 37.1, 16% less
time; on tmpfs, where the disk costs nothing, 19.2 ms instead of 29.8, 40% less time.
So at start the daemon's threads are pinned to one CPU, the one the process runs
on then (the scheduler just picked it), and every thread made later inherits that;
unless another daemon of this machine is pinned there already: then a CPU none is
pinned to, if there is one (`_claim`). Daemons started together (several on one
database, each with its own state dir) would otherwise often share one CPU and leave
another to the rest: three of them on two vCPUs ran two on one CPU in most starts.

Hashing and copying large files needs no GIL and gains from more CPUs: a thread that
moves at least `BULK` bytes at once runs on every CPU the process was allowed, for that
long (`bulk()`), and the helper threads that only ever hash big blocks always do
(`widen()`). Pinned whole (with `taskset`), a 100 MiB archive took 26% longer.

The programs the daemon starts (`command` activities, the failure hook) get every CPU.

`[daemon] pin_cpu = false` leaves every thread on every allowed CPU, as does an
allowance of one CPU only (systemd's `CPUAffinity=`, `taskset`).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

# From this many bytes at once a thread uses every CPU. 40 jobs of 20 files of 1 MiB on
# tmpfs: with 4 MiB here 3.80 s pinned against 3.23 s not; with 1 MiB 3.52 s against
# 3.64 s (medians, in one run each).
BULK = 1024 * 1024

_allowed: frozenset[int] | None = None  # every CPU the process may use, once pinned
_cpu: int | None = None  # the one its threads run on
_claimed: socket.socket | None = None  # this process's claim on it (see _claim)


def current_cpu() -> int:
    """The CPU the calling thread runs on now."""
    with open("/proc/thread-self/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[36])


def _set(cpus: frozenset[int] | set[int]) -> None:
    """The calling thread on `cpus`, if the system lets it: pinning only saves CPU time,
    so a refusal is no error. (The allowed CPUs may have changed under the daemon, e.g.
    a cgroup's cpuset: EINVAL; a seccomp filter may forbid the call: EPERM.)"""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, cpus)


def pin() -> int | None:
    """The calling thread, and each thread it starts from now on, on one CPU of those
    allowed: the one it runs on. None (and nothing changed) if only one is allowed, or
    if the system does not let it (not Linux, no /proc, a seccomp filter)."""
    global _allowed, _cpu
    try:
        allowed = frozenset(os.sched_getaffinity(0))
        if len(allowed) < 2:
            return None
        cpu = current_cpu()
        if cpu not in allowed:  # not yet moved after an affinity change
            cpu = min(allowed)
        cpu = _claim(allowed, cpu)
        os.sched_setaffinity(0, {cpu})
    except (OSError, AttributeError, ValueError, IndexError):
        _release()  # not pinned: no claim on a CPU either
        return None
    _allowed, _cpu = allowed, cpu
    return cpu


CLAIM = "archived-cpu-"  # the claims' names (tests use their own)


def claim_name(cpu: int) -> str:
    """The abstract unix socket name whose owner is the daemon pinned to `cpu`."""
    return f"\0{CLAIM}{cpu}"


def _claim(allowed: frozenset[int], here: int) -> int:
    """A CPU of `allowed` that no other daemon of this machine is pinned to: `here`
    first, then the others in order; `here` if every one is taken (shared, then).

    A claim is an abstract unix socket bound to the CPU's name: one owner at a time,
    machine-wide (per network namespace) whoever runs the daemon, no file to leave
    behind, and the kernel releases it when the process ends, a `kill -9` too. Not
    inherited by the programs the daemon starts (close-on-exec)."""
    global _claimed
    for cpu in [here, *sorted(allowed - {here})]:
        claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            claim.bind(claim_name(cpu))
        except OSError:  # taken (or no abstract sockets here): the next one
            claim.close()
            continue
        if _claimed is not None:
            _claimed.close()
        _claimed = claim
        return cpu
    return here


def pinned() -> int | None:
    """The CPU the daemon's threads are pinned to, or None."""
    return _cpu


def unpin() -> None:
    """The calling thread back on every allowed CPU, and pinning over (tests)."""
    global _allowed, _cpu
    if _allowed is not None:
        _set(_allowed)
    _allowed = _cpu = None
    _release()


def _release() -> None:
    global _claimed
    if _claimed is not None:
        _claimed.close()
        _claimed = None


def widen() -> None:
    """The calling thread on every allowed CPU: for threads that only move bulk data
    (an executor's `initializer`; it never raises, or the executor would be broken)."""
    if _allowed is not None:
        _set(_allowed)


@contextmanager
def everywhere() -> Iterator[None]:
    """The calling thread on every allowed CPU meanwhile, then back where it was; what
    it starts then (a thread, a program) keeps every CPU."""
    allowed = _allowed
    if allowed is None:
        yield
        return
    try:
        before = os.sched_getaffinity(0)
    except OSError:
        yield
        return
    _set(allowed)
    try:
        yield
    finally:
        _set(before)


@contextmanager
def bulk(nbytes: int) -> Iterator[None]:
    """`everywhere()` while the calling thread moves `nbytes`, if that is at least
    `BULK`. Three system calls: about 2 us, nothing next to hashing 1 MiB (~1 ms)."""
    if nbytes < BULK:
        yield
        return
    with everywhere():
        yield
