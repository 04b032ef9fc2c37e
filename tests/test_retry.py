"""The backoff between attempts: pure, so checked without a daemon or a clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from archived.config import RetryConfig
from archived.retry import RetryPolicy

POLICY = RetryPolicy(max_attempts=5, backoff=5.0, backoff_max=600.0)


def test_the_cap_doubles_from_backoff_after_each_failed_attempt() -> None:
    assert [POLICY.cap(n) for n in range(1, 6)] == [5.0, 10.0, 20.0, 40.0, 80.0]


def test_the_cap_stops_at_backoff_max() -> None:
    assert POLICY.cap(8) == 600.0  # 5 * 2**7 = 640
    assert POLICY.cap(7) == 320.0


@pytest.mark.parametrize("failed", [1_100, 10_000, 10**9])
def test_the_cap_does_not_overflow_however_many_attempts(failed: int) -> None:
    # max_attempts has no upper bound in the config; 2.0**1100 overflows a float
    policy = RetryPolicy(max_attempts=10**9 + 1, backoff=0.01, backoff_max=3600.0)
    assert policy.cap(failed) == 3600.0


def test_backoff_equal_to_backoff_max_is_flat() -> None:
    flat = RetryPolicy(max_attempts=3, backoff=60.0, backoff_max=60.0)
    assert [flat.cap(n) for n in (1, 2, 3, 50)] == [60.0] * 4


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.999])
def test_the_delay_is_full_jitter_below_the_cap(fraction: float) -> None:
    assert POLICY.delay(3, fraction) == pytest.approx(fraction * 20.0)


def test_next_try_is_the_delay_after_now() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    delay, at = POLICY.next_try(2, now, 0.5)
    assert delay == 5.0
    assert at == now + timedelta(seconds=5)


def test_attempts_allowed_and_the_last() -> None:
    assert [POLICY.allows(n) for n in (1, 5, 6)] == [True, True, False]
    assert [POLICY.last(n) for n in (4, 5, 6)] == [False, True, True]


def test_the_policy_of_a_config_section() -> None:
    section = RetryConfig(max_attempts=3, backoff="2s", backoff_max="1m")
    assert RetryPolicy.of(section) == RetryPolicy(3, 2.0, 60.0)
