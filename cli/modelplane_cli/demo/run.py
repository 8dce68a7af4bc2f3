"""Run the router against local stand-in providers and print what it decided for each request.

Everything runs in this one process on loopback ports: one stand-in per endpoint of the example
config, and the sidecar in front of them. The first rows show the routing rules and strategies
(sensitive data kept on-prem, failing closed when no compliant endpoint exists, cheap vs premium
by prompt complexity, a sticky A/B split); their "why" is the pick reason from the decision trace
(POST /v1/modelplane/explain). Then some stand-ins are scripted to fail, so the table shows
retries, fallbacks and the circuit breaker at work.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from modelplane_sidecar.config import Provider, RouterConfig, load_config_file
from modelplane_sidecar.server import create_app
from modelplane_sidecar.standins import start_site
from modelplane_sidecar.standins.anthropic import AnthropicStandIn
from modelplane_sidecar.standins.openai import Behaviour, OpenAIStandIn

CONFIG_PATH = Path(__file__).with_name("router.yaml")

_DEMO_KEYS = {
    "OPENAI_API_KEY": "sk-demo-openai-0000",
    "DEEPSEEK_API_KEY": "sk-demo-deepseek-0000",
    "ANTHROPIC_API_KEY": "sk-ant-demo-0000",
}


@dataclass
class Step:
    title: str
    path: str
    body: dict[str, Any]
    #: Empty: show the routing pipeline's own reason (from the explain endpoint).
    why: str = ""
    headers: dict[str, str] = field(default_factory=dict)


def _chat(model: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def _point_at(config: RouterConfig, urls: dict[str, str]) -> RouterConfig:
    endpoints = [e.model_copy(update={"base_url": urls[e.name]}) for e in config.endpoints]
    return config.model_copy(update={"endpoints": tuple(endpoints)})


async def _send(
    session: aiohttp.ClientSession, base: str, step: Step
) -> tuple[int, dict[str, str], str]:
    async with session.post(
        base + step.path, data=orjson.dumps(step.body), headers=step.headers
    ) as resp:
        raw = await resp.read()
        text = raw.decode(errors="replace")
        if resp.status >= 400:
            message = orjson.loads(raw)["error"]["message"]
            text = message
        elif step.body.get("stream"):
            frames = [line[6:] for line in text.splitlines() if line.startswith("data: {")]
            pieces = [orjson.loads(f)["choices"][0]["delta"].get("content") or "" for f in frames]
            text = f"{len(frames)} SSE chunks: " + "".join(pieces)
        elif step.path.endswith("embeddings"):
            text = f"{len(orjson.loads(raw)['data'])} embedding(s)"
        else:
            text = orjson.loads(raw)["choices"][0]["message"]["content"]
        return resp.status, dict(resp.headers), text


async def _pick_reason(session: aiohttp.ClientSession, base: str, step: Step) -> str:
    """What the routing pipeline says about this request, without sending it anywhere."""
    async with session.post(
        base + "/v1/modelplane/explain", data=orjson.dumps(step.body), headers=step.headers
    ) as resp:
        trace = orjson.loads(await resp.read())
    if trace["error"] is not None:
        return f"{trace['error']['status']}: {trace['error']['code']}"
    return str(trace["pick"])


def _print_table(rows: list[list[str]]) -> None:
    header = ["#", "request", "status", "endpoint", "rule", "tries", "fallbacks", "cache", "why"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


async def run_demo() -> int:
    for key, value in _DEMO_KEYS.items():
        os.environ.setdefault(key, value)
    config = load_config_file(CONFIG_PATH)
    standins: dict[str, OpenAIStandIn | AnthropicStandIn] = {}
    for e in config.endpoints:
        api_key = e.api_key.resolve() if e.api_key is not None else None
        kind = AnthropicStandIn if e.provider is Provider.ANTHROPIC else OpenAIStandIn
        standins[e.name] = kind(name=e.name, api_key=api_key)
    runners: list[web.AppRunner] = []
    urls: dict[str, str] = {}
    for name, standin in standins.items():
        runner, port = await start_site(standin.app())
        runners.append(runner)
        suffix = "" if isinstance(standin, AnthropicStandIn) else "/v1"
        urls[name] = f"http://127.0.0.1:{port}{suffix}"
    router_runner, router_port = await start_site(create_app(_point_at(config, urls)))
    runners.append(router_runner)
    base = f"http://127.0.0.1:{router_port}"
    print(f"modelplane demo: router on {base}, {len(standins)} stand-in providers")
    print(f"config: {CONFIG_PATH} (endpoints re-pointed at the stand-ins)\n")

    primary = standins["openai-gpt-4o-mini"]
    second = standins["deepseek-chat"]
    premium = standins["openai-gpt-4o"]
    chat = "/v1/chat/completions"
    ab_users = [f"user-{i}" for i in range(1, 5)]
    steps: list[tuple[Step, Any]] = [
        (Step("PII prompt", chat, _chat("chat", "Draft a reply to jane.doe@example.com")), None),
        (Step("secret prompt", chat, _chat("auto", "Why does AKIAIOSFODNN7EXAMPLE fail?")), None),
        (
            Step(
                "PII embedding",
                "/v1/embeddings",
                {"model": "embed", "input": "Patient SSN 123-45-6789"},
                "403: no on-prem endpoint for 'embed': fails closed, nothing sent",
            ),
            None,
        ),
        (Step("simple prompt", chat, _chat("auto", "List three primary colors.")), None),
        (
            Step(
                "hard prompt",
                chat,
                _chat(
                    "auto",
                    "Janet has 3 times as many marbles as Tom. After giving Tom 12 marbles they "
                    "have the same number. How many marbles did Janet have at first?",
                ),
            ),
            None,
        ),
        *[
            (
                Step(
                    f"A/B {user}",
                    chat,
                    _chat("chat", "Summarize: the meeting moved to Tuesday."),
                    headers={"x-task": "summarize", "x-user-id": user},
                ),
                None,
            )
            for user in [*ab_users, ab_users[0]]
        ],
        (
            Step(
                "cross-provider",
                chat,
                _chat("assistant", "Plan my week", stream=True),
                "gpt-4o 500 -> Claude served, Anthropic events translated to OpenAI chunks",
            ),
            lambda: premium.then(Behaviour("status", 500)),
        ),
        (
            Step(
                "cached FAQ",
                chat,
                _chat("faq", "What are your opening hours?", temperature=0),
                "temperature 0: cache miss, answer stored",
            ),
            None,
        ),
        (
            Step(
                "cached FAQ",
                chat,
                _chat("faq", "What are your opening hours?", temperature=0),
                "same question: cache hit, no upstream call",
            ),
            None,
        ),
        (
            Step(
                "chat", "/v1/chat/completions", _chat("chat", "What is a Pod?"), "primary healthy"
            ),
            None,
        ),
        (
            Step(
                "chat stream",
                "/v1/chat/completions",
                _chat("chat", "Stream a haiku", stream=True),
                "streamed from primary",
            ),
            None,
        ),
        (
            Step(
                "chat",
                "/v1/chat/completions",
                _chat("chat", "Hi again"),
                "primary 503 twice -> retried, then fell back",
            ),
            lambda: primary.then(Behaviour("status", 503), Behaviour("status", 503)),
        ),
        (
            Step(
                "chat",
                "/v1/chat/completions",
                _chat("chat", "Busy?"),
                "primary 429 Retry-After 30s > 2s cap -> fell back at once",
            ),
            lambda: primary.then(Behaviour("status", 429, retry_after="30")),
        ),
        (
            Step(
                "chat stream",
                "/v1/chat/completions",
                _chat("chat", "Stream it", stream=True),
                "primary reset before 1st byte, 3rd failure opens its breaker",
            ),
            lambda: primary.then(Behaviour("reset")),
        ),
        (
            Step(
                "chat",
                "/v1/chat/completions",
                _chat("chat", "Anyone home?"),
                "primary skipped (breaker open), DeepSeek 502 x2 -> on-prem",
            ),
            lambda: second.then(*[Behaviour("status", 502)] * 2),
        ),
        (
            Step(
                "embeddings",
                "/v1/embeddings",
                {"model": "embed", "input": ["a", "b"]},
                "alias 'embed'",
            ),
            None,
        ),
        (
            Step(
                "unknown model",
                "/v1/chat/completions",
                _chat("gpt-9", "?"),
                "404: alias not offered",
            ),
            None,
        ),
        (
            Step(
                "bad request",
                "/v1/chat/completions",
                {"model": "chat", "messages": "nope"},
                "upstream 400 passed through, no fallback",
            ),
            lambda: second.then(Behaviour("status", 400, message="'messages' must be an array")),
        ),
    ]
    rows: list[list[str]] = []
    started = time.perf_counter()
    async with aiohttp.ClientSession(headers={"content-type": "application/json"}) as session:
        for index, (step, setup) in enumerate(steps, 1):
            if setup is not None:
                setup()
            why = step.why or await _pick_reason(session, base, step)
            status, headers, text = await _send(session, base, step)
            rows.append(
                [
                    str(index),
                    step.title,
                    str(status),
                    headers.get("x-modelplane-endpoint", "-"),
                    headers.get("x-modelplane-rule", "-"),
                    headers.get("x-modelplane-attempts", "-"),
                    headers.get("x-modelplane-fallbacks", "-"),
                    headers.get("x-modelplane-cache", "-"),
                    why,
                ]
            )
            if index == 1:
                print(f"first answer: {text}\n")
        async with session.get(base + "/metrics") as resp:
            metrics = (await resp.text()).splitlines()
    _print_table(rows)
    served = [
        m
        for m in metrics
        if m.startswith(("modelplane_requests_total{", "modelplane_route_decisions_total{"))
    ]
    print(f"\n{len(steps)} requests in {time.perf_counter() - started:.2f}s; from /metrics:")
    for line in served:
        print("  " + line)
    for runner in runners:
        await runner.cleanup()
    return 0
