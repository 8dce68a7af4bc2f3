"""The routing pipeline: classify -> match rule -> filter candidates -> pick.

`decide()` returns a RouteDecision: the ordered candidates to try and the trace of why.
Execution with retries and fallback lives in `forward.py`.
"""

from .decision import RouteDecision, RoutedRequest, decide

__all__ = ["RouteDecision", "RoutedRequest", "decide"]
