"""How the forwarder settles a reservation when an attempt fails, times out, or is refused.

A real sidecar app with a SpendTracker, OpenAI stand-ins as upstreams and the openai SDK as the
app; the operator's side is the small in-process `Operator` of budget_helpers.py, which grants what
it is asked (or nothing, once told so).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp import web
from budget_helpers import Operator

from modelplane_sidecar.config import parse_config
from modelplane_sidecar.metrics import SidecarMetrics
from modelplane_sidecar.routing.classify.text import read_request
from modelplane_sidecar.server import create_app
from modelplane_sidecar.spend import SpendTracker, input_token_bound
from modelplane_sidecar.standins import start_site
from modelplane_sidecar.standins.openai import Behaviour, OpenAIStandIn

PRICE = {"inputPerMtok": 1000.0, "outputPerMtok": 1000.0}


class Stack:
    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []
        self.tracker = SpendTracker("pod")
        self.operator = Operator(self.tracker, grant=1.0)
        self.metrics = SidecarMetrics()

    async def upstream(self, name: str) -> tuple[OpenAIStandIn, str]:
        standin = OpenAIStandIn(name)
        runner, port = await start_site(standin.app())
        self.runners.append(runner)
        return standin, f"http://127.0.0.1:{port}/v1"

    async def sidecar(self, config: dict[str, Any]) -> openai.AsyncOpenAI:
        self.metrics = SidecarMetrics()
        self.tracker = SpendTracker("pod", on_settle=self.metrics.budget_settled)
        self.operator = Operator(self.tracker, grant=1.0)
        self.tracker.attach(self.operator)
        app = create_app(parse_config(config), self.metrics, None, self.tracker)
        runner, port = await start_site(app)
        self.runners.append(runner)
        return openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0
        )


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    s = Stack()
    try:
        yield s
    finally:
        for runner in reversed(s.runners):
            await runner.cleanup()


def config(urls: dict[str, str], budget: dict[str, Any], **alias: Any) -> dict[str, Any]:
    return {
        "endpoints": [
            {"name": n, "baseUrl": u, "model": f"{n}-model", "pricing": PRICE}
            for n, u in urls.items()
        ],
        "models": [
            {
                "name": "chat",
                "endpoints": list(urls),
                "retry": {"maxAttempts": 1},
                "circuitBreaker": {"enabled": False},
                **alias,
            }
        ],
        "budgets": [budget],
    }


async def ask(client: openai.AsyncOpenAI) -> Any:
    return await client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], max_tokens=20
    )


async def test_a_5xx_releases_and_the_fallback_settles_its_actual_cost(stack: Stack) -> None:
    first, first_url = await stack.upstream("first")
    _, second_url = await stack.upstream("second")
    first.then(Behaviour("status", 500))
    client = await stack.sidecar(
        config({"first": first_url, "second": second_url}, {"name": "team", "enforce": True})
    )
    raw = await ask(client)
    reply = raw.parse()
    assert raw.headers["x-modelplane-endpoint"] == "second"
    assert reply.usage is not None
    lease = stack.tracker.lease("team")
    cost = (reply.usage.prompt_tokens + reply.usage.completion_tokens) * 1000 / 1e6
    assert lease.settled == pytest.approx(cost)  # the 5xx cost nothing
    assert lease.reserved == 0.0
    assert lease.endpoints["second"].requests == 1 and "first" not in lease.endpoints


async def test_a_timeout_is_charged_its_worst_case(stack: Stack) -> None:
    slow, url = await stack.upstream("slow")
    slow.then(Behaviour("hang"))
    client = await stack.sidecar(
        config({"slow": url}, {"name": "team", "enforce": True}, timeout={"attemptSeconds": 0.2})
    )
    with pytest.raises(openai.APIStatusError) as failed:
        await ask(client)
    assert failed.value.status_code == 502
    lease = stack.tracker.lease("team")
    # Worst case: (prompt bytes + framing) tokens in, max_tokens=20 out, all at $1000/M.
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
    worst = (input_token_bound(read_request(body)) + 20) * 1000 / 1e6
    assert lease.settled == pytest.approx(worst)
    assert lease.reserved == 0.0


async def test_a_budget_that_cannot_pay_skips_its_endpoints_for_ones_outside_its_scope(
    stack: Stack,
) -> None:
    _, cloud_url = await stack.upstream("cloud")
    onprem, onprem_url = await stack.upstream("onprem")
    client = await stack.sidecar(
        config(
            {"cloud": cloud_url, "onprem": onprem_url},
            {"name": "cloud-spend", "enforce": True, "endpoints": ["cloud"]},
        )
    )
    stack.operator.exhausted = True
    raw = await ask(client)
    assert raw.headers["x-modelplane-endpoint"] == "onprem"
    assert len(onprem.received) == 1
    # Outside every budget's scope: the app's request goes as it is.
    assert onprem.received[0].body["max_tokens"] == 20
    assert stack.metrics.budget_refusals.labels("cloud-spend")._value.get() == 1
    # Nothing outside the scope: the app gets the 429 naming the budget.
    only_cloud = await stack.sidecar(
        config({"cloud": cloud_url}, {"name": "cloud-spend", "enforce": True})
    )
    stack.operator.exhausted = True
    with pytest.raises(openai.RateLimitError) as refused:
        await ask(only_cloud)
    assert refused.value.response.headers["x-modelplane-budget"] == "cloud-spend"
    assert "Budget 'cloud-spend' is exhausted" in refused.value.message
