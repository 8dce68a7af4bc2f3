"""Provider adapters: one module per upstream wire protocol, all behind `base.Adapter`.

A module is imported when a config first uses its provider, so a sidecar holds only the
protocols it speaks (most speak only OpenAI's).
"""

from __future__ import annotations

from ..config import Provider
from .base import Adapter

_ADAPTERS: dict[Provider, Adapter] = {}


def _load(provider: Provider) -> Adapter:
    if provider in (Provider.OPENAI, Provider.OPENAI_COMPATIBLE):
        from .openai import OpenAIAdapter

        return OpenAIAdapter()
    if provider is Provider.ANTHROPIC:
        from .anthropic import AnthropicAdapter

        return AnthropicAdapter()
    if provider is Provider.GEMINI:
        from .gemini import GeminiAdapter

        return GeminiAdapter()
    if provider is Provider.AZURE_OPENAI:
        from .azure_openai import AzureOpenAIAdapter

        return AzureOpenAIAdapter()
    if provider is Provider.BEDROCK:
        from .bedrock import BedrockAdapter

        return BedrockAdapter()
    raise ValueError(f"no adapter for provider {provider!r}")


def adapter_for(provider: Provider) -> Adapter:
    adapter = _ADAPTERS.get(provider)
    if adapter is None:
        adapter = _ADAPTERS[provider] = _load(provider)
    return adapter
