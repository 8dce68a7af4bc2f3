"""A stand-in for the operator's side of the spend protocol, for sidecar-only budget tests."""

from __future__ import annotations

import asyncio
from typing import Any

from modelplane_sidecar.spend import SpendTracker


class Operator:
    """Answers the tracker's usage messages the way the operator does (tests drive it)."""

    def __init__(self, tracker: SpendTracker, grant: float = 1.0) -> None:
        self.tracker = tracker
        self.grant = grant
        self.granted = 0.0
        self.sent: list[dict[str, Any]] = []
        self.exhausted = False

    def __call__(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        asyncio.get_running_loop().call_soon(self.answer, message)

    def answer(self, message: dict[str, Any]) -> None:
        items = []
        for item in message["budgets"]:
            want = item.get("wantUSD")
            if want is not None and not self.exhausted:
                self.granted += max(want, self.grant)
            items.append(
                {
                    "budget": item["budget"],
                    "epoch": "2026-03-14T00:00:00Z",
                    "grantedUSD": self.granted,
                    "remainingUSD": 5.0,
                    "exhausted": self.exhausted and want is not None,
                }
            )
        self.tracker.on_lease({"type": "lease", "ack": message["seq"], "budgets": items})
