"""Decision time of the routing pipeline per request, on a realistic prompt mix, in one run.

Runs `decide()` in process (no network: the decision happens before any upstream call) for every
request of a mix of prompts, several passes, and prints p50 / p99 / max side by side for:

  * baseline      the alias only (no rules): what every request pays (classifying sensitivity and
                  size for compliance and the context-window filter, the alias chain, filters)
  * rules only    12 ordered rules on model, headers, metadata, tools, tokens, data classes;
                  strategies priority / weighted / lowest-cost / least-loaded; no complexity
  * rules + complexity   the same rules plus a complexity-tiers rule that most requests reach
  * classifiers alone    sensitivity, size and complexity, each timed on its own; complexity also
                         without its everyday heads (the benchmark head alone, as before them)

The mix: RouteLLM's MMLU and GSM8K questions (when ../shared/data/routellm-evals is present),
multi-turn chats with a system prompt, prompts with personal data, requests with tool schemas,
and long documents to summarise (20-60 kB). The complexity model is loaded before timing.

Run: .venv/bin/python bench/bench_decision.py [--passes 5] [--limit 600]
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from modelplane_sidecar.config import parse_config
from modelplane_sidecar.providers.base import Operation
from modelplane_sidecar.routing import RoutedRequest, decide
from modelplane_sidecar.routing.classify.complexity import default_model
from modelplane_sidecar.routing.classify.sensitivity import classify_sensitivity
from modelplane_sidecar.routing.classify.size import classify_size
from modelplane_sidecar.routing.classify.text import read_request
from modelplane_sidecar.runtime import Snapshot

ROOT = Path(__file__).resolve().parent.parent
_SMALL_BODY = 4096
_HEADER = (
    "| {} | p50 us | p99 us | p99 us, bodies < 4 kB | max us | samples |\n|---|---|---|---|---|---|"
)
DATA = ROOT.parent / "shared" / "data" / "routellm-evals"

ENDPOINTS = [
    ("gpt-4o-mini", ["cloud"], 0.15, 0.6),
    ("gpt-4o", ["cloud"], 2.5, 10.0),
    ("claude-haiku", ["cloud", "gdpr"], 0.8, 4.0),
    ("deepseek", ["cloud"], 0.27, 1.1),
    ("llama-onprem", ["on-prem"], 0.0, 0.0),
    ("mistral-onprem", ["on-prem"], 0.0, 0.0),
]


def _config(with_rules: bool, with_complexity: bool) -> dict[str, Any]:
    endpoints = [
        {
            "name": name,
            "provider": "openai",
            "baseUrl": f"http://127.0.0.1:9/{name}",
            "model": name,
            "tags": tags,
            "pricing": {"inputPerMtok": pin, "outputPerMtok": pout},
            "contextWindow": 128000,
            "limits": {"requestsPerMinute": 100000, "maxConcurrency": 1000},
        }
        for name, tags, pin, pout in ENDPOINTS
    ]
    cloud = ["gpt-4o-mini", "deepseek", "claude-haiku", "gpt-4o"]
    rules: list[dict[str, Any]] = []
    if with_rules:
        rules = [
            {"name": "secrets", "match": {"dataClasses": ["secret"]}, "targets": ["llama-onprem"]},
            {
                "name": "pii",
                "match": {"dataClasses": ["pii"]},
                "targets": ["llama-onprem", "mistral-onprem", "claude-haiku"],
            },
            {
                "name": "team-search",
                "match": {"headers": {"x-team": ["search"]}},
                "strategy": "least-loaded",
                "targets": cloud,
            },
            {
                "name": "batch-jobs",
                "match": {"metadata": {"task": ["batch", "backfill"]}},
                "strategy": "lowest-cost",
                "targets": cloud,
            },
            {
                "name": "agents",
                "match": {"tools": True},
                "targets": ["gpt-4o", "claude-haiku"],
            },
            {
                "name": "images",
                "match": {"images": True},
                "targets": ["gpt-4o"],
            },
            {
                "name": "long-context",
                "match": {"tokens": {"min": 8000}},
                "strategy": "lowest-cost",
                "targets": cloud,
            },
            {
                "name": "embeddings",
                "match": {"operations": ["embeddings"]},
                "targets": ["gpt-4o-mini"],
            },
            {
                "name": "ab-summaries",
                "match": {"headers": {"x-task": ["summarize"]}},
                "strategy": "weighted",
                "targets": [
                    {"endpoint": "gpt-4o-mini", "weight": 50, "arm": "A"},
                    {"endpoint": "deepseek", "weight": 50, "arm": "B"},
                ],
            },
            {
                "name": "streams",
                "match": {"stream": True, "headers": {"x-latency": ["*"]}},
                "strategy": "lowest-latency",
                "targets": cloud,
            },
            {
                "name": "team-ads",
                "match": {"headers": {"x-team": ["ads"]}},
                "targets": ["deepseek", "gpt-4o-mini"],
            },
        ]
        if with_complexity:
            rules.append(
                {
                    "name": "by-complexity",
                    "strategy": "complexity-tiers",
                    "targets": [
                        {"endpoint": "gpt-4o-mini", "tier": "cheap"},
                        {"endpoint": "deepseek", "tier": "standard"},
                        {"endpoint": "gpt-4o", "tier": "premium"},
                    ],
                }
            )
        else:
            rules.append({"name": "default", "strategy": "priority", "targets": cloud})
    return {
        "endpoints": endpoints,
        "models": [{"name": "chat", "endpoints": cloud}],
        "rules": rules,
        "sensitivity": {
            "classes": [
                {"name": "public"},
                {"name": "pii", "allowedTags": ["on-prem", "gdpr"]},
                {"name": "secret", "allowedTags": ["on-prem"]},
            ]
        },
    }


def _benchmark_questions(limit: int, rng: random.Random) -> list[str]:
    if not DATA.exists():
        return []
    prompts: list[str] = []
    for path in sorted((DATA / "mmlu" / "responses").glob("*.csv")):
        with path.open(newline="") as f:
            prompts.extend(row["prompt"] for row in csv.DictReader(f))
    with (DATA / "gsm8k" / "gsm8k_responses.csv").open(newline="") as f:
        prompts.extend(row["prompt"] for row in csv.DictReader(f))
    rng.shuffle(prompts)
    return prompts[:limit]


CHAT_LINES = [
    "Can you help me rewrite this paragraph so it sounds more professional?",
    "What's the difference between a Deployment and a StatefulSet?",
    "Thanks, now make it shorter.",
    "Write a SQL query that returns the top 5 customers by revenue last quarter.",
    "Why does my Python script raise KeyError when the key is clearly there?",
    "Summarize the key risks in two bullet points.",
    "Translate the previous answer into German.",
]
PII_LINES = [
    "Please draft a reply to maria.garcia@example.com confirming her refund.",
    "The customer called from +1 415 555 0134 about order 88213.",
    "Card 5555 5555 5555 4444 was charged twice, what should I tell the bank?",
    "Transfer to IBAN GB82 WEST 1234 5698 7654 32 failed, explain why.",
    "Here is our config: aws_secret_access_key = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY'",
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    }
]


def _mix(limit: int) -> list[tuple[dict[str, Any], dict[str, str], bool]]:
    """(body, headers, stream) triples of a realistic request mix, shuffled deterministically."""
    rng = random.Random(7)
    questions = _benchmark_questions(limit, rng)
    system = {"role": "system", "content": "You are a helpful assistant for an e-commerce team."}
    mix: list[tuple[dict[str, Any], dict[str, str], bool]] = []
    for q in questions:
        mix.append(({"model": "chat", "messages": [{"role": "user", "content": q}]}, {}, False))
    for i in range(max(60, limit // 5)):
        turns: list[dict[str, str]] = [system]
        for j in range(1 + i % 4):
            turns.append({"role": "user", "content": CHAT_LINES[(i + j) % len(CHAT_LINES)]})
            turns.append({"role": "assistant", "content": "Sure. " + CHAT_LINES[j] * 3})
        turns.append({"role": "user", "content": CHAT_LINES[i % len(CHAT_LINES)]})
        headers = [{}, {"x-team": "search"}, {"x-team": "ads"}, {"x-task": "summarize"}][i % 4]
        body: dict[str, Any] = {"model": "chat", "messages": turns, "user": f"u{i}"}
        if i % 5 == 0:
            body["metadata"] = {"task": "batch"}
        mix.append((body, {**headers, "x-user-id": f"u{i}"}, i % 3 == 0))
    for i in range(max(20, limit // 10)):
        text = f"{CHAT_LINES[i % len(CHAT_LINES)]} {PII_LINES[i % len(PII_LINES)]}"
        mix.append(({"model": "chat", "messages": [{"role": "user", "content": text}]}, {}, False))
    for i in range(max(10, limit // 20)):
        body = {
            "model": "chat",
            "messages": [{"role": "user", "content": f"What's the weather in city {i}?"}],
            "tools": TOOLS,
        }
        mix.append((body, {}, False))
    filler = questions or CHAT_LINES * 50
    for i in range(max(5, limit // 50)):
        doc = "\n\n".join(rng.sample(filler, min(len(filler), 40 + 40 * (i % 3))))
        content = f"Summarise this document:\n{doc}"
        mix.append(
            ({"model": "chat", "messages": [{"role": "user", "content": content}]}, {}, False)
        )
    rng.shuffle(mix)
    return mix


def _requests(mix: list[tuple[dict[str, Any], dict[str, str], bool]]) -> list[RoutedRequest]:
    return [
        RoutedRequest(Operation.CHAT, body, CIMultiDictProxy(CIMultiDict(headers)), "chat", stream)
        for body, headers, stream in mix
    ]


def _time_each(
    fn: Callable[[RoutedRequest], object], requests: list[RoutedRequest], passes: int
) -> list[tuple[float, bool]]:
    """(microseconds, is the body under 4 kB) per call."""
    samples: list[tuple[float, bool]] = []
    small = [len(str(r.body)) < _SMALL_BODY for r in requests]
    for _ in range(passes):
        for request, is_small in zip(requests, small, strict=True):
            started = time.perf_counter_ns()
            fn(request)
            samples.append(((time.perf_counter_ns() - started) / 1000, is_small))
    return samples


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _row(name: str, samples: list[tuple[float, bool]]) -> str:
    values = [v for v, _ in samples]
    small = [v for v, is_small in samples if is_small]
    return (
        f"| {name} | {statistics.median(values):.0f} | {_p99(values):.0f} | {_p99(small):.0f} "
        f"| {max(values):.0f} | {len(values)} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--limit", type=int, default=600, help="benchmark questions in the mix")
    args = parser.parse_args(argv)

    model = default_model()
    requests = _requests(_mix(args.limit))
    snapshots = {
        "baseline (alias only)": Snapshot.build(parse_config(_config(False, False))),
        "rules only": Snapshot.build(parse_config(_config(True, False))),
        "rules + complexity": Snapshot.build(parse_config(_config(True, True))),
    }
    rng = random.Random(1)
    sizes = sorted(len(str(r.body)) for r in requests)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"load average before: {load} on {os.cpu_count()} CPUs (other load inflates p99/max)")
    print(
        f"{len(requests)} requests per pass x {args.passes} passes; body size p50 "
        f"{sizes[len(sizes) // 2]} B, max {sizes[-1]} B"
        + ("" if DATA.exists() else " (no RouteLLM data found: chat/PII/tools/documents only)")
    )
    print(f"\n{_HEADER.format('decision')}")
    for name, snap in snapshots.items():
        for request in requests[:50]:  # warm-up
            decide(snap, request, rng=rng)
        print(
            _row(name, _time_each(lambda r, s=snap: decide(s, r, rng=rng), requests, args.passes))
        )

    policy = snapshots["rules only"].config.sensitivity
    texts = {id(r): read_request(r.body) for r in requests}
    print(f"\n{_HEADER.format('classifier alone')}")
    print(_row("read request", _time_each(lambda r: read_request(r.body), requests, args.passes)))
    print(
        _row(
            "sensitivity",
            _time_each(
                lambda r: classify_sensitivity(texts[id(r)].full, r.headers, policy),
                requests,
                args.passes,
            ),
        )
    )
    print(_row("size", _time_each(lambda r: classify_size(texts[id(r)]), requests, args.passes)))
    before = model.benchmark_only()
    for name, scorer in (("complexity", model), ("complexity, benchmark head alone", before)):
        print(
            _row(
                name,
                _time_each(
                    lambda r, m=scorer: m.score(texts[id(r)].prompt, texts[id(r)].user_turns),
                    requests,
                    args.passes,
                ),
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
