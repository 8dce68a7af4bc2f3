"""Built-in list prices of well-known models, used when an endpoint declares no `pricing`.

USD per one million tokens (input, output, cached input), as the providers list them for
pay-as-you-go use (2025-08). They change: an endpoint's own `pricing` always wins, and self-hosted
or fine-tuned models need their own (a model not found here costs 0, which a Budget would never
stop). Matching is by the upstream model name with the provider's routing prefixes removed
(`us.anthropic.`, `openai/`...), and the longest table name that the model starts with, followed
by the end or a version suffix: `gpt-4o-2024-08-06` is priced as `gpt-4o`, `gpt-4o-mini` as
itself.
"""

from __future__ import annotations

from typing import Any

#: model -> (input, output, cached input) USD per 1M tokens.
PRICES: dict[str, tuple[float, float, float | None]] = {
    # OpenAI
    "gpt-5": (1.25, 10.0, 0.125),
    "gpt-5-mini": (0.25, 2.0, 0.025),
    "gpt-5-nano": (0.05, 0.40, 0.005),
    "gpt-4.1": (2.0, 8.0, 0.50),
    "gpt-4.1-mini": (0.40, 1.60, 0.10),
    "gpt-4.1-nano": (0.10, 0.40, 0.025),
    "gpt-4o": (2.50, 10.0, 1.25),
    "gpt-4o-mini": (0.15, 0.60, 0.075),
    "gpt-4-turbo": (10.0, 30.0, None),
    "gpt-3.5-turbo": (0.50, 1.50, None),
    "o1": (15.0, 60.0, 7.50),
    "o1-mini": (1.10, 4.40, 0.55),
    "o3": (2.0, 8.0, 0.50),
    "o3-mini": (1.10, 4.40, 0.55),
    "o4-mini": (1.10, 4.40, 0.275),
    "text-embedding-3-small": (0.02, 0.0, None),
    "text-embedding-3-large": (0.13, 0.0, None),
    "text-embedding-ada-002": (0.10, 0.0, None),
    # Anthropic (cached input = cache reads)
    "claude-opus-4-1": (15.0, 75.0, 1.50),
    "claude-opus-4": (15.0, 75.0, 1.50),
    "claude-sonnet-4-5": (3.0, 15.0, 0.30),
    "claude-sonnet-4": (3.0, 15.0, 0.30),
    "claude-3-7-sonnet": (3.0, 15.0, 0.30),
    "claude-3-5-sonnet": (3.0, 15.0, 0.30),
    "claude-haiku-4-5": (1.0, 5.0, 0.10),
    "claude-3-5-haiku": (0.80, 4.0, 0.08),
    "claude-3-haiku": (0.25, 1.25, 0.03),
    "claude-3-opus": (15.0, 75.0, 1.50),
    # Google (prompts up to 200k tokens)
    "gemini-2.5-pro": (1.25, 10.0, 0.31),
    "gemini-2.5-flash": (0.30, 2.50, 0.075),
    "gemini-2.5-flash-lite": (0.10, 0.40, 0.025),
    "gemini-2.0-flash": (0.10, 0.40, 0.025),
    "gemini-2.0-flash-lite": (0.075, 0.30, None),
    # DeepSeek
    "deepseek-chat": (0.27, 1.10, 0.07),
    "deepseek-reasoner": (0.55, 2.19, 0.14),
    # Mistral
    "mistral-large": (2.0, 6.0, None),
    "mistral-small": (0.10, 0.30, None),
}

#: Routing prefixes some providers put in front of the vendor's model name.
_PREFIXES = ("global.", "us.", "eu.", "apac.", "anthropic.", "openai.", "openai/", "models/")
_SUFFIX_STARTS = ("-", "@", ":", ".")


def _normalise(model: str) -> str:
    name = model.strip().lower()
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def lookup(model: str) -> tuple[float, float, float | None] | None:
    """The built-in (input, output, cached input) prices of `model`, or None when unknown."""
    name = _normalise(model)
    matches = [
        known
        for known in PRICES
        if name == known
        or (name.startswith(known) and name[len(known) : len(known) + 1] in _SUFFIX_STARTS)
    ]
    return PRICES[max(matches, key=len)] if matches else None


def builtin_pricing(model: str) -> dict[str, Any] | None:
    """The `pricing` of an endpoint config for `model` from the table (camelCase), or None."""
    found = lookup(model)
    if found is None:
        return None
    input_, output, cached = found
    pricing: dict[str, Any] = {"inputPerMtok": input_, "outputPerMtok": output}
    if cached is not None:
        pricing["cachedInputPerMtok"] = cached
    return pricing
