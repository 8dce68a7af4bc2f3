"""Budgets over the real config stream: operator stream server + budget books, a real sidecar
(aiohttp app with its control-plane client and spend tracker), an OpenAI stand-in upstream and
the official openai SDK as the app. Only the TokenReview API is faked (as in
tests/operator/test_distribution.py); e2e/test_budgets.py runs the same against a real apiserver.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import openai
import pytest
from config_stream import NAMESPACE, budgeted_config, eventually, review, streamed_sidecar

from modelplane_operator.budget.service import BudgetService
from modelplane_operator.distribution.auth import Authenticator
from modelplane_operator.distribution.hub import ConfigHub
from modelplane_operator.distribution.server import StreamServer
from modelplane_sidecar.standins import start_site
from modelplane_sidecar.standins.openai import OpenAIStandIn

LIMIT = 0.01
NOW = dt.datetime(2026, 3, 14, 12, tzinfo=dt.UTC)
BUDGET = {
    "metadata": {"name": "daily", "namespace": NAMESPACE},
    "spec": {
        "period": "daily",
        "limitUSD": LIMIT,
        "maxOutputTokens": 50,
        "thresholds": [{"percent": 100, "action": "block"}],
    },
}


async def test_spend_flows_up_the_stream_and_the_budget_ends_with_a_429_naming_it(
    tmp_path: Path,
) -> None:
    standin = OpenAIStandIn("upstream")
    up_runner, up_port = await start_site(standin.app())
    config = budgeted_config(f"http://127.0.0.1:{up_port}/v1", BUDGET)
    hub = ConfigHub()
    books = BudgetService(clock=lambda: NOW)
    books.sync(NAMESPACE, [BUDGET])
    server = StreamServer(hub, Authenticator(review))
    server.budgets = books
    stream_port = await server.start("127.0.0.1", 0, None)
    hub.publish(NAMESPACE, config["metadata"]["version"], config)
    try:
        async with streamed_sidecar(f"http://127.0.0.1:{stream_port}", tmp_path) as sidecar:
            await eventually(lambda: sidecar.holder.snapshot is not None, "the config")
            await eventually(lambda: sidecar.tracker.lease("daily").epoch, "the budget's period")

            served = 0
            refused: openai.RateLimitError | None = None
            for _ in range(400):
                try:
                    await sidecar.client.chat.completions.create(
                        model="chat", messages=[{"role": "user", "content": "hello there"}]
                    )
                    served += 1
                except openai.RateLimitError as exc:
                    refused = exc
                    break
            assert refused is not None, "the budget never ran out"
            assert served > 10
            body = refused.body
            assert isinstance(body, dict)
            assert body["code"] == "budget_exhausted"
            assert body["message"].startswith("Budget 'daily' is exhausted for this period")
            assert refused.response.headers["x-modelplane-budget"] == "daily"
            # The cap was forced into every upstream call, with the key OpenAI's API wants.
            assert {r.body.get("max_completion_tokens") for r in standin.received} == {50}

            ledger = books.ledger(NAMESPACE, "daily")
            assert ledger is not None
            await eventually(
                lambda: ledger.endpoints.get("gpt") and ledger.endpoints["gpt"].requests == served,
                "the usage reports",
            )
            usage = ledger.endpoints["gpt"]
            expected = (usage.input_tokens * 2.5 + usage.output_tokens * 10.0) / 1e6
            assert ledger.spent == pytest.approx(expected)
            assert ledger.spent <= LIMIT
            # What is left cannot pay for one more call's worst case.
            worst = (len(b"hello there") + 4) * 2.5e-6 + 50 * 10e-6
            assert LIMIT - ledger.spent - ledger.leased < worst + 1e-9
            metrics = sidecar.metrics
            spend_metric = metrics.budget_spend.labels("daily", "gpt")._value.get()
            assert spend_metric == pytest.approx(ledger.spent)
            assert metrics.budget_refusals.labels("daily")._value.get() == 1
    finally:
        await server.stop()
        await books.close()
        await up_runner.cleanup()
