"""Provider adapters: one module per upstream wire protocol, all behind `base.Adapter`."""

from __future__ import annotations

from ..config import Provider
from .anthropic import AnthropicAdapter
from .azure_openai import AzureOpenAIAdapter
from .base import Adapter
from .bedrock import BedrockAdapter
from .gemini import GeminiAdapter
from .openai import OpenAIAdapter

_ADAPTERS: dict[Provider, Adapter] = {
    Provider.OPENAI: OpenAIAdapter(),
    Provider.OPENAI_COMPATIBLE: OpenAIAdapter(),
    Provider.ANTHROPIC: AnthropicAdapter(),
    Provider.GEMINI: GeminiAdapter(),
    Provider.AZURE_OPENAI: AzureOpenAIAdapter(),
    Provider.BEDROCK: BedrockAdapter(),
}


def adapter_for(provider: Provider) -> Adapter:
    return _ADAPTERS[provider]
