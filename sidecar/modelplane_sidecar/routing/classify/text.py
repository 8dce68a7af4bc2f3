"""What the classifiers read from an OpenAI request body: its text and its shape.

One light pass over the decoded body (no schema model): the text of every message, prompt or
input that would leave for the upstream (what the sensitivity detectors scan), the last user
message (what the complexity classifier reads), and structural facts rules can match on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Per-message framing tokens in chat formats (role markers and separators).
_TOKENS_PER_MESSAGE = 4
#: An image of unknown size at "high" detail (OpenAI's 512px tiles: 85 + 170 per tile, 4 tiles).
_TOKENS_PER_IMAGE = 765


@dataclass(slots=True, frozen=True)
class RequestText:
    #: Every piece of text that would be sent upstream, newline-joined.
    full: str
    #: The last user message (or the prompt/input), what "how hard is this?" is asked about.
    prompt: str
    #: Messages in the conversation (1 for completions and embeddings).
    messages: int
    #: User turns so far (conversation depth).
    user_turns: int
    has_tools: bool
    has_images: bool
    #: Tokens that are not plain text: message framing, tool schemas, images.
    overhead_tokens: int
    #: The output limit the app asked for (max_tokens / max_completion_tokens), if any.
    max_output_tokens: int | None


def _content_text(content: Any, parts: list[str]) -> tuple[str, int]:
    """Append the text of one message content; returns (its text, images in it)."""
    if isinstance(content, str):
        parts.append(content)
        return content, 0
    if not isinstance(content, list):
        return "", 0
    texts: list[str] = []
    images = 0
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
        elif kind in ("image_url", "image", "input_image"):
            images += 1
    joined = "\n".join(texts)
    if joined:
        parts.append(joined)
    return joined, images


def _strings(value: Any, parts: list[str]) -> str:
    """Text of a `prompt` or `input`: a string or a list of strings (token arrays carry none)."""
    if isinstance(value, str):
        parts.append(value)
        return value
    if isinstance(value, list):
        found = [v for v in value if isinstance(v, str)]
        parts.extend(found)
        return "\n".join(found)
    return ""


def _max_output(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def read_request(body: dict[str, Any]) -> RequestText:
    parts: list[str] = []
    prompt = ""
    count = 0
    user_turns = 0
    images = 0
    overhead = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            count += 1
            text, found = _content_text(message.get("content"), parts)
            images += found
            if message.get("role") == "user":
                user_turns += 1
                prompt = text
            calls = message.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                        parts.append(function["arguments"])
        overhead += count * _TOKENS_PER_MESSAGE + 3
    else:
        for key in ("prompt", "input"):
            if key in body:
                prompt = _strings(body[key], parts)
                count = user_turns = 1
                break
    tools = body.get("tools") or body.get("functions")
    has_tools = isinstance(tools, list) and bool(tools)
    if has_tools:
        # A tool schema costs roughly its JSON size in tokens; a cheap stand-in for that size.
        overhead += len(repr(tools)) // 4
    overhead += images * _TOKENS_PER_IMAGE
    return RequestText(
        full="\n".join(parts),
        prompt=prompt,
        messages=count,
        user_turns=user_turns,
        has_tools=has_tools,
        has_images=images > 0,
        overhead_tokens=overhead,
        max_output_tokens=_max_output(body),
    )
