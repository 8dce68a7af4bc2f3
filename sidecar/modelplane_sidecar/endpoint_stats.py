"""What the router has observed about one endpoint: latency, time to first token, request rate.

Fed by the forwarder after each attempt and read by routing steps (`lowest-latency` ordering, the
rate-limit filter). Latencies are exponentially weighted moving averages, so a slow spell fades
after a few requests. Request and token rates use a sliding one-minute window approximated from
two fixed windows (the current minute plus the previous one, weighted by overlap), which costs
four numbers per endpoint instead of a timestamp per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Weight of the newest sample in the moving averages.
EWMA_ALPHA = 0.3
_WINDOW_SECONDS = 60.0


class EndpointStats:
    __slots__ = (
        "_clock",
        "_current_requests",
        "_current_tokens",
        "_previous_requests",
        "_previous_tokens",
        "_window_start",
        "latency_samples",
        "latency_seconds",
        "ttft_samples",
        "ttft_seconds",
    )

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.latency_seconds: float | None = None
        self.latency_samples = 0
        self.ttft_seconds: float | None = None
        self.ttft_samples = 0
        self._window_start = clock()
        self._current_requests = 0
        self._current_tokens = 0
        self._previous_requests = 0
        self._previous_tokens = 0

    def observe_latency(self, seconds: float) -> None:
        """A complete response took `seconds` (from sending to the last byte)."""
        old = self.latency_seconds
        self.latency_seconds = seconds if old is None else old + EWMA_ALPHA * (seconds - old)
        self.latency_samples += 1

    def observe_ttft(self, seconds: float) -> None:
        """A stream's first bytes arrived `seconds` after the request was sent."""
        old = self.ttft_seconds
        self.ttft_seconds = seconds if old is None else old + EWMA_ALPHA * (seconds - old)
        self.ttft_samples += 1

    def _roll(self, now: float) -> float:
        """Advance the windows to `now`; returns the elapsed share of the current window."""
        elapsed = now - self._window_start
        if elapsed >= _WINDOW_SECONDS:
            if elapsed >= 2 * _WINDOW_SECONDS:
                self._previous_requests = self._previous_tokens = 0
            else:
                self._previous_requests = self._current_requests
                self._previous_tokens = self._current_tokens
            self._current_requests = self._current_tokens = 0
            self._window_start = now - (elapsed % _WINDOW_SECONDS)
            elapsed = now - self._window_start
        return elapsed / _WINDOW_SECONDS

    def note_request(self, tokens: int) -> None:
        """An attempt is being sent with about `tokens` input tokens."""
        self._roll(self._clock())
        self._current_requests += 1
        self._current_tokens += tokens

    def rate(self) -> tuple[float, float]:
        """(requests, tokens) in the last minute, by the sliding-window approximation."""
        share = self._roll(self._clock())
        keep = 1.0 - share
        return (
            self._current_requests + self._previous_requests * keep,
            self._current_tokens + self._previous_tokens * keep,
        )
