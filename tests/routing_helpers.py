"""Building blocks for routing tests: configs, snapshots, requests, a fixed-score model."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
from multidict import CIMultiDict, CIMultiDictProxy

from modelplane_sidecar.config import parse_config
from modelplane_sidecar.providers.base import Operation
from modelplane_sidecar.routing import RouteDecision, RoutedRequest, decide
from modelplane_sidecar.routing.classify.complexity import (
    STRUCTURAL_FEATURES,
    ComplexityModel,
    load_tokenizer,
)
from modelplane_sidecar.runtime import Snapshot

_TOKENIZER = load_tokenizer()
_N = len(STRUCTURAL_FEATURES)


def fixed_model(score: float) -> ComplexityModel:
    """A real ComplexityModel whose weights make every prompt score exactly `score`."""
    return ComplexityModel(
        _TOKENIZER,
        np.zeros(32000, dtype=np.float32),
        np.zeros(_N),
        np.zeros(_N),
        np.ones(_N),
        (np.zeros(_N), np.zeros(_N)),
        0.0,
        score,
        np.linspace(0.0, 1.0, 101),
        {},
    )


def ep(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "openai",
        "baseUrl": f"http://127.0.0.1:9/{name}",
        "model": f"{name}-model",
        **extra,
    }


def config(
    endpoints: list[dict[str, Any]],
    rules: list[dict[str, Any]] | None = None,
    models: list[dict[str, Any]] | None = None,
    **top: Any,
) -> dict[str, Any]:
    return {
        "endpoints": endpoints,
        "models": models or [{"name": "chat", "endpoints": [e["name"] for e in endpoints]}],
        "rules": rules or [],
        **top,
    }


def snapshot(data: dict[str, Any]) -> Snapshot:
    return Snapshot.build(parse_config(data, "test"))


def request(
    text: str = "What is a Pod?",
    model: str = "chat",
    headers: dict[str, str] | None = None,
    op: Operation = Operation.CHAT,
    stream: bool = False,
    **body: Any,
) -> RoutedRequest:
    payload: dict[str, Any] = {"model": model, **body}
    if op is Operation.CHAT:
        payload.setdefault("messages", [{"role": "user", "content": text}])
    elif op is Operation.EMBEDDINGS:
        payload.setdefault("input", text)
    else:
        payload.setdefault("prompt", text)
    return RoutedRequest(op, payload, CIMultiDictProxy(CIMultiDict(headers or {})), model, stream)


def route(
    snap: Snapshot,
    req: RoutedRequest,
    score: float = 0.5,
    seed: int = 0,
) -> RouteDecision:
    model = fixed_model(score)
    return decide(snap, req, rng=random.Random(seed), model=lambda: model)


def names(decision: RouteDecision) -> list[str]:
    return [c.name for c in decision.candidates]
