"""Step 1 of the routing pipeline: classify the request once; every rule reads the same results.

Sensitivity and size run on every request (compliance needs the one, the context-window filter
the other; together they cost tens of microseconds). Complexity runs only when a rule or strategy
asks for it, and then once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from ...config import SensitivityPolicy
from .complexity import Complexity, ComplexityModel, default_model
from .sensitivity import Sensitivity, classify_sensitivity
from .size import Size, classify_size
from .text import RequestText, read_request

__all__ = ["Classification", "Complexity", "Sensitivity", "Size", "classify"]


class Classification:
    """The classifiers' outputs for one request, with how long each took."""

    __slots__ = ("_complexity", "_model", "sensitivity", "size", "text", "timings_us")

    def __init__(
        self,
        text: RequestText,
        sensitivity: Sensitivity,
        size: Size,
        model: Callable[[], ComplexityModel],
        timings_us: dict[str, float],
    ) -> None:
        self.text = text
        self.sensitivity = sensitivity
        self.size = size
        self._model = model
        self._complexity: Complexity | None = None
        self.timings_us = timings_us

    @property
    def complexity_known(self) -> bool:
        return self._complexity is not None

    def complexity(self) -> Complexity:
        """The complexity score, computed on first use."""
        if self._complexity is None:
            started = time.perf_counter()
            self._complexity = self._model().score(self.text.prompt, self.text.user_turns)
            self.timings_us["complexity"] = (time.perf_counter() - started) * 1e6
        return self._complexity

    def as_json(self) -> dict[str, Any]:
        return {
            "sensitivity": self.sensitivity.as_json(),
            "size": self.size.as_json(),
            "complexity": self._complexity.as_json() if self._complexity is not None else None,
            "shape": {
                "messages": self.text.messages,
                "userTurns": self.text.user_turns,
                "tools": self.text.has_tools,
                "images": self.text.has_images,
            },
            "microseconds": {k: round(v, 1) for k, v in self.timings_us.items()},
        }


def classify(
    body: dict[str, Any],
    headers: Mapping[str, str],
    policy: SensitivityPolicy,
    model: Callable[[], ComplexityModel] = default_model,
) -> Classification:
    started = time.perf_counter()
    text = read_request(body)
    read = time.perf_counter()
    sensitivity = classify_sensitivity(text.full, headers, policy)
    sensed = time.perf_counter()
    size = classify_size(text)
    done = time.perf_counter()
    timings = {
        "read": (read - started) * 1e6,
        "sensitivity": (sensed - read) * 1e6,
        "size": (done - sensed) * 1e6,
    }
    return Classification(text, sensitivity, size, model, timings)
