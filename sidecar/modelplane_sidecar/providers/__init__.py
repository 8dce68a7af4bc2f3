"""Provider adapters: one module per upstream wire protocol, all behind `base.Adapter`."""

from __future__ import annotations

from ..config import Provider
from .anthropic import AnthropicAdapter
from .base import Adapter
from .openai import OpenAIAdapter

_ADAPTERS: dict[Provider, Adapter] = {
    Provider.OPENAI: OpenAIAdapter(),
    Provider.OPENAI_COMPATIBLE: OpenAIAdapter(),
    Provider.ANTHROPIC: AnthropicAdapter(),
}


def adapter_for(provider: Provider) -> Adapter:
    return _ADAPTERS[provider]
