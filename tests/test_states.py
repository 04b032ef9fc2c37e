"""The transition table, exhaustively: every allowed transition, every refused one."""

from __future__ import annotations

import itertools

import pytest

from archived.states import (
    FINAL,
    IDLE,
    PROCESSING,
    RETRY_EVENT,
    STOPPABLE,
    TRANSITIONS,
    Event,
    IllegalTransition,
    State,
    allowed_events,
    next_state,
)

S, E = State, Event

# The happy path, in order, and the error path to `failed`.
HAPPY = [
    (S.UNINITIALIZED, E.INITIALIZED, S.QUEUED),
    (S.QUEUED, E.TRIGGERED, S.ACTIVITY_ARCHIVING),
    (S.ACTIVITY_ARCHIVING, E.DONE, S.POST_PROCESSING),
    (S.POST_PROCESSING, E.DONE, S.STORE),
    (S.STORE, E.DONE, S.CLEANUP),
    (S.CLEANUP, E.CLEANED, S.COMPLETED),
]
FAILING = [
    (S.STORE, E.ERROR, S.ERROR),
    (S.ERROR, E.FATAL, S.FAILURE),
    (S.FAILURE, E.HANDLED, S.ERROR_HANDLING),
    (S.ERROR_HANDLING, E.HANDLED, S.CLEANUP),
    (S.CLEANUP, E.CLEANED_AFTER_FAILURE, S.FAILED),
]

ALLOWED = {(s, e): t for s, events in TRANSITIONS.items() for e, t in events.items()}


@pytest.mark.parametrize(("state", "event", "target"), HAPPY + FAILING)
def test_seed_paths(state: State, event: Event, target: State) -> None:
    assert next_state(state, event) == target


def test_happy_path_is_a_chain() -> None:
    for (_, _, reached), (start, _, _) in itertools.pairwise(HAPPY):
        assert reached == start


@pytest.mark.parametrize(("state", "event"), sorted(ALLOWED))
def test_every_allowed_transition(state: State, event: Event) -> None:
    assert next_state(state, event) == ALLOWED[(state, event)]
    assert event in allowed_events(state)


FORBIDDEN = [(s, e) for s in State for e in Event if (s, e) not in ALLOWED]


@pytest.mark.parametrize(("state", "event"), FORBIDDEN)
def test_every_other_transition_is_refused(state: State, event: Event) -> None:
    with pytest.raises(IllegalTransition) as info:
        next_state(state, event)
    assert info.value.state == state and info.value.event == event


def test_every_state_has_a_row_and_final_states_stay_final() -> None:
    assert set(TRANSITIONS) == set(State)
    assert set(State) == FINAL | IDLE | PROCESSING
    assert not (FINAL & PROCESSING) and not (IDLE & PROCESSING)
    # completed only moves on by retention, failed only by an operator's retry
    assert allowed_events(S.COMPLETED) == {E.EXPIRED}
    assert allowed_events(S.FAILED) == {E.REQUEUED}
    assert allowed_events(S.DELETED) == frozenset()


def test_errors_in_queued_go_straight_to_failure() -> None:
    assert next_state(S.QUEUED, E.FATAL) == S.FAILURE
    with pytest.raises(IllegalTransition):
        next_state(S.QUEUED, E.ERROR)


@pytest.mark.parametrize("phase", [S.ACTIVITY_ARCHIVING, S.POST_PROCESSING, S.STORE])
def test_phase_errors_are_classified_then_retried_into_the_same_phase(phase: State) -> None:
    assert next_state(phase, E.ERROR) == S.ERROR
    assert next_state(S.ERROR, E.RECOVERABLE) == S.RECOVERABLE_ERROR
    assert next_state(S.RECOVERABLE_ERROR, RETRY_EVENT[phase]) == phase


def test_every_state_is_reachable_from_uninitialized() -> None:
    seen, frontier = {S.UNINITIALIZED}, [S.UNINITIALIZED]
    while frontier:
        for target in TRANSITIONS[frontier.pop()].values():
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(State)


@pytest.mark.parametrize("state", sorted(PROCESSING - {S.FAILURE, S.ERROR_HANDLING, S.CLEANUP}))
def test_cancel_and_timeout_lead_to_failure_from_running_states(state: State) -> None:
    assert next_state(state, E.CANCELED) == S.FAILURE
    assert next_state(state, E.TIMED_OUT) == S.FAILURE


def test_cleanup_retries_itself_and_can_only_end_final() -> None:
    """A cleanup error is retried in `cleanup` (never `error`: it is never fatal, and a
    stored job must not turn into a failed one), and cleanup is never cut short."""
    assert next_state(S.CLEANUP, E.CLEANUP_FAILED) == S.CLEANUP
    assert set(TRANSITIONS[S.CLEANUP].values()) == {S.CLEANUP, S.COMPLETED, S.FAILED}
    assert S.CLEANUP not in STOPPABLE
    with pytest.raises(IllegalTransition):
        next_state(S.CLEANUP, E.ERROR)
