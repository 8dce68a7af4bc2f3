"""The OpenAI stream pass-through's one-event-per-chunk fast path agrees with its general path:
the same bytes out, the same usage, the same failure, however the events are chunked."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from modelplane_sidecar.providers.base import UpstreamFailure, Usage
from modelplane_sidecar.providers.openai import OpenAIStreamPassThrough

REQUEST: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

_usage = st.fixed_dictionaries(
    {"prompt_tokens": st.integers(0, 99), "completion_tokens": st.integers(0, 99)}
)
_choice = st.fixed_dictionaries(
    {
        "index": st.just(0),
        "delta": st.fixed_dictionaries({"content": st.text(max_size=12)}),
        "finish_reason": st.sampled_from([None, "stop", "length", ""]),
    }
)
_chunk = st.fixed_dictionaries(
    {"object": st.just("chat.completion.chunk"), "choices": st.lists(_choice, max_size=2)},
    optional={"usage": st.one_of(st.none(), _usage), "error": st.just({"message": "overloaded"})},
)
_data = st.one_of(
    _chunk.map(orjson.dumps),
    st.sampled_from([b"[DONE]", b"", b"[1, 2]", b"not json", b'"text"']),
)
# One-line `data:` events mostly, with comments, CRLF line ends and named events now and then.
_event = st.one_of(
    _data.map(lambda d: b"data: " + d + b"\n\n"),
    _data.map(lambda d: b"data:" + d + b"\n\n"),
    _data.map(lambda d: b"data: " + d + b"\r\n\r\n"),
    _data.map(lambda d: b"data: " + d + b"\r\n\n"),
    _data.map(lambda d: b"event: chunk\ndata: " + d + b"\n\n"),
    st.just(b": keep-alive\n\n"),
)


def _run(chunks: list[bytes], forward_usage: bool) -> tuple[bytes, Usage | None, str | None]:
    translator = OpenAIStreamPassThrough(forward_usage, REQUEST)
    out = b""
    try:
        for chunk in chunks:
            out += translator.feed(chunk)
        out += translator.finish()
    except UpstreamFailure as failure:
        # What went out before the failure depends on where the chunks were cut; not compared.
        return b"", translator.usage, f"{failure.kind}: {failure.message}"
    return out, translator.usage, None


@given(st.lists(_event, min_size=1, max_size=8), st.booleans())
def test_one_event_per_chunk_matches_the_general_parse(
    events: list[bytes], forward_usage: bool
) -> None:
    # All events in one chunk always take the general path (the reference).
    assert _run(events, forward_usage) == _run([b"".join(events)], forward_usage)


@given(st.lists(_event, min_size=1, max_size=6), st.integers(1, 40), st.booleans())
def test_events_split_anywhere_match_the_general_parse(
    events: list[bytes], size: int, forward_usage: bool
) -> None:
    stream = b"".join(events)
    pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
    assert _run(pieces, forward_usage) == _run([stream], forward_usage)
