"""How often a job tries a phase again, and how long it waits in between.

Plain data and pure functions, no clock and no randomness of their own: the runner
draws the jitter and adds the delay to the time it reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from .config import RetryConfig


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int  # attempts of one phase (and of cleanup), the first included
    backoff: float  # seconds: the cap after the first failed attempt
    backoff_max: float  # seconds: the cap never grows beyond this

    @classmethod
    def of(cls, config: RetryConfig) -> RetryPolicy:
        return cls(config.max_attempts, config.backoff, config.backoff_max)

    def allows(self, attempt: int) -> bool:
        """Whether the `attempt`th attempt (counting from 1) may run."""
        return attempt <= self.max_attempts

    def last(self, attempt: int) -> bool:
        """Whether no attempt comes after the `attempt`th."""
        return attempt >= self.max_attempts

    def cap(self, failed: int) -> float:
        """The longest wait after `failed` failed attempts: `backoff` doubled each
        time, never beyond `backoff_max`."""
        doublings = failed - 1
        # 2**doublings overflows a float long before max_attempts runs out
        if doublings >= math.log2(self.backoff_max / self.backoff) + 1:
            return self.backoff_max
        return min(self.backoff_max, self.backoff * 2.0**doublings)

    def delay(self, failed: int, fraction: float) -> float:
        """The wait after `failed` failed attempts, for a `fraction` in [0, 1) drawn
        at random: full jitter, so that jobs failing together do not retry together."""
        return fraction * self.cap(failed)

    def next_try(self, failed: int, now: datetime, fraction: float) -> tuple[float, datetime]:
        """How long to wait after `failed` failed attempts, and until when."""
        delay = self.delay(failed, fraction)
        return delay, now + timedelta(seconds=delay)
