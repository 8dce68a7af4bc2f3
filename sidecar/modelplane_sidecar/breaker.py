"""Per-endpoint circuit breaker: closed -> open -> half-open (one probe at a time) -> closed.

An open breaker lets the router skip a dead endpoint at once instead of waiting for its timeout.
The clock is injectable so tests can move time without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

from .config import CircuitBreakerPolicy


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    __slots__ = ("_clock", "_failures", "_opened_at", "_probe_in_flight", "_successes", "state")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    def allow(self, policy: CircuitBreakerPolicy) -> bool:
        """May a call go to this endpoint now? In half-open state only one probe at a time."""
        if not policy.enabled or self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self._clock() - self._opened_at < policy.open_seconds:
                return False
            self.state = BreakerState.HALF_OPEN
            self._successes = 0
            self._probe_in_flight = False
        if self._probe_in_flight:
            return False
        self._probe_in_flight = True
        return True

    def retry_in(self, policy: CircuitBreakerPolicy) -> float:
        """Seconds until an open breaker lets a probe through."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, policy.open_seconds - (self._clock() - self._opened_at))

    def record_success(self, policy: CircuitBreakerPolicy) -> None:
        self._failures = 0
        if self.state is BreakerState.HALF_OPEN:
            self._probe_in_flight = False
            self._successes += 1
            if self._successes >= policy.half_open_successes:
                self.state = BreakerState.CLOSED

    def record_failure(self, policy: CircuitBreakerPolicy) -> None:
        if not policy.enabled:
            return
        if self.state is BreakerState.HALF_OPEN:
            self._trip()
            return
        self._failures += 1
        if self._failures >= policy.failure_threshold:
            self._trip()

    def release_probe(self) -> None:
        """A probe ended without a verdict (e.g. the client went away): let another one try."""
        self._probe_in_flight = False

    def _trip(self) -> None:
        self.state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._failures = 0
        self._probe_in_flight = False
