"""The job state machine, as plain data: states, events and the allowed transitions.

Nothing in this module does I/O. The runner asks `next_state(state, event)` what
comes next and records the answer; a transition missing from `TRANSITIONS` is a bug
and raises `IllegalTransition`.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    UNINITIALIZED = "uninitialized"
    QUEUED = "queued"
    ACTIVITY_ARCHIVING = "activity_archiving"
    POST_PROCESSING = "post_processing"
    STORE = "store"
    CLEANUP = "cleanup"
    COMPLETED = "completed"
    ERROR = "error"
    RECOVERABLE_ERROR = "recoverable_error"
    FAILURE = "failure"
    ERROR_HANDLING = "error_handling"
    FAILED = "failed"
    DELETED = "deleted"


class Event(StrEnum):
    INITIALIZED = "initialized"  # the job file became a valid job row
    TRIGGERED = "triggered"  # the poll loop claimed a queued job
    DONE = "done"  # the phase finished all its tasks
    ERROR = "error"  # a phase raised; classify it next
    RECOVERABLE = "recoverable"  # the classifier says: wait and retry
    FATAL = "fatal"  # the classifier says: this job can never complete
    EXHAUSTED = "exhausted"  # recoverable, but retry.max_attempts are used up
    RETRY_ACTIVITIES = "retry_activities"  # backoff over: re-enter the failed phase
    RETRY_POST_PROCESSING = "retry_post_processing"
    RETRY_STORE = "retry_store"
    CANCELED = "canceled"  # operator ran `archived cancel`
    TIMED_OUT = "timed_out"  # daemon.job_timeout passed
    HANDLED = "handled"  # failure hooks ran
    CLEANED = "cleaned"  # staging removed after success
    CLEANED_AFTER_FAILURE = "cleaned_after_failure"  # staging removed after failure
    CLEANUP_FAILED = "cleanup_failed"  # cleanup could not finish: it runs again after a backoff
    REQUEUED = "requeued"  # operator ran `archived retry` on a failed job
    EXPIRED = "expired"  # retention passed, stored copies deleted
    TAKEN_OVER = "taken_over"  # another daemon's lease on the job lapsed (PostgreSQL queue)


S, E = State, Event

# The phases whose errors are classified, and the event that re-enters each one after a
# recoverable error.
RETRY_EVENT: dict[State, Event] = {
    S.ACTIVITY_ARCHIVING: E.RETRY_ACTIVITIES,
    S.POST_PROCESSING: E.RETRY_POST_PROCESSING,
    S.STORE: E.RETRY_STORE,
}
# The same phases, which count attempts (retry.max_attempts each).
PHASES: tuple[State, ...] = tuple(RETRY_EVENT)

_STOP = {E.CANCELED: S.FAILURE, E.TIMED_OUT: S.FAILURE}  # allowed from every processing state
# A job whose owner's lease lapsed: the phases need the dead host's staging, so they start
# again at activity_archiving; the failure path and cleanup need none and go on where they are.
_RESTART = {E.TAKEN_OVER: S.ACTIVITY_ARCHIVING}

TRANSITIONS: dict[State, dict[Event, State]] = {
    S.UNINITIALIZED: {E.INITIALIZED: S.QUEUED, E.FATAL: S.FAILURE},
    S.QUEUED: {E.TRIGGERED: S.ACTIVITY_ARCHIVING, E.FATAL: S.FAILURE, E.CANCELED: S.FAILURE},
    S.ACTIVITY_ARCHIVING: {E.DONE: S.POST_PROCESSING, E.ERROR: S.ERROR, **_STOP, **_RESTART},
    S.POST_PROCESSING: {E.DONE: S.STORE, E.ERROR: S.ERROR, **_STOP, **_RESTART},
    S.STORE: {E.DONE: S.CLEANUP, E.ERROR: S.ERROR, **_STOP, **_RESTART},
    S.ERROR: {
        E.RECOVERABLE: S.RECOVERABLE_ERROR,
        E.FATAL: S.FAILURE,
        E.EXHAUSTED: S.FAILURE,
        **_STOP,
        **_RESTART,
    },
    S.RECOVERABLE_ERROR: {
        E.RETRY_ACTIVITIES: S.ACTIVITY_ARCHIVING,
        E.RETRY_POST_PROCESSING: S.POST_PROCESSING,
        E.RETRY_STORE: S.STORE,
        E.EXHAUSTED: S.FAILURE,
        **_STOP,
        **_RESTART,
    },
    S.FAILURE: {E.HANDLED: S.ERROR_HANDLING, E.TAKEN_OVER: S.FAILURE},
    S.ERROR_HANDLING: {E.HANDLED: S.CLEANUP, E.TAKEN_OVER: S.ERROR_HANDLING},
    # Cleanup is never fatal and never cut short: it retries itself, then gives up on
    # what it cannot remove (recorded as orphans), so every job reaches a final state.
    S.CLEANUP: {
        E.CLEANED: S.COMPLETED,
        E.CLEANED_AFTER_FAILURE: S.FAILED,
        E.CLEANUP_FAILED: S.CLEANUP,
        E.TAKEN_OVER: S.CLEANUP,
    },
    S.COMPLETED: {E.EXPIRED: S.DELETED},
    S.FAILED: {E.REQUEUED: S.QUEUED},
    S.DELETED: {},
}

FINAL: frozenset[State] = frozenset({S.COMPLETED, S.FAILED, S.DELETED})
IDLE: frozenset[State] = frozenset({S.UNINITIALIZED, S.QUEUED})
PROCESSING: frozenset[State] = frozenset(State) - FINAL - IDLE
# States that `archived cancel` and the job deadline can cut short.
STOPPABLE: frozenset[State] = frozenset(s for s, ev in TRANSITIONS.items() if E.CANCELED in ev)
# States a job waits in, holding no slot, until its retry_at: the claim takes it when due.
WAITING: frozenset[State] = frozenset({S.RECOVERABLE_ERROR, S.CLEANUP})


class IllegalTransition(Exception):
    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"no transition from {state} on {event}")
        self.state, self.event = state, event


def next_state(state: State, event: Event) -> State:
    """The state that `event` leads to from `state`, or IllegalTransition."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(state, event) from None


def allowed_events(state: State) -> frozenset[Event]:
    return frozenset(TRANSITIONS[state])
