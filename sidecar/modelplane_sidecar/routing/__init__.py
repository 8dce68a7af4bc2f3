"""The routing pipeline: classify -> match rule -> filter candidates -> pick.

Each step is a module of small named parts: `classify/` (sensitivity, complexity, size),
`rules.py` (first matching rule), `filters.py` (compliance, breaker, context window, limits),
`pickers.py` (one picker per strategy, plus the budget hook). `decide()` runs them in order and
returns a RouteDecision with the ordered candidates and the trace of why; execution with retries
and fallback lives in `forward.py`.
"""

from .decision import (
    DecisionTrace,
    RouteDecision,
    RoutedRequest,
    decide,
    explain,
    operation_for,
    prepare_routing,
)

__all__ = [
    "DecisionTrace",
    "RouteDecision",
    "RoutedRequest",
    "decide",
    "explain",
    "operation_for",
    "prepare_routing",
]
