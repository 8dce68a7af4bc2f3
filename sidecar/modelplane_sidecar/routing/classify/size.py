"""Size classifier: an estimate of the request's tokens, without any tokenizer download.

BPE tokenizers of current models (OpenAI's o200k/cl100k, Llama 3's) average about four
characters of English or code per token, while CJK and other non-Latin scripts take about one
token per character. The estimate counts ASCII characters at four per token and everything else
at one per character, then adds message framing, tool schemas and images (from `text.py`), and
the output the app reserves with max_tokens. It runs in microseconds on any prompt size, which a
real tokenizer (about a millisecond per 10 kB) would not; `docs/routing.md` shows how close it
comes to a real BPE tokenizer on the RouteLLM prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .text import RequestText

_ASCII_CHARS_PER_TOKEN = 4


def estimate_text_tokens(text: str) -> int:
    if text.isascii():
        return -(-len(text) // _ASCII_CHARS_PER_TOKEN)
    ascii_chars = len(text.encode("ascii", "ignore"))
    return -(-ascii_chars // _ASCII_CHARS_PER_TOKEN) + (len(text) - ascii_chars)


@dataclass(slots=True, frozen=True)
class Size:
    #: Estimated prompt tokens (text, framing, tools, images).
    input_tokens: int
    #: The output the app reserved (max_tokens), if it set one.
    max_output_tokens: int | None

    @property
    def context_tokens(self) -> int:
        """What must fit in the endpoint's context window."""
        return self.input_tokens + (self.max_output_tokens or 0)

    def as_json(self) -> dict[str, Any]:
        return {"inputTokens": self.input_tokens, "maxOutputTokens": self.max_output_tokens}


def classify_size(text: RequestText) -> Size:
    tokens = estimate_text_tokens(text.full) + text.overhead_tokens
    return Size(tokens, text.max_output_tokens)
