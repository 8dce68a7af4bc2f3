"""The SSE parser: its fast path for one-line `data:` events agrees with the general parse, and
events come out the same however the byte stream is split into chunks."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from modelplane_sidecar.providers.sse import SSEEvent, SSEParser, _parse_lines

# Field values without line breaks; ':' and leading spaces included on purpose.
_value = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))
_line = st.one_of(
    _value.map(lambda v: b"data: " + v),
    _value.map(lambda v: b"data:" + v),
    _value.map(lambda v: b"event: " + v),
    _value.map(lambda v: b": " + v),  # a comment
    _value.map(lambda v: b"id: " + v),
)
_event = st.lists(_line, min_size=1, max_size=4).map(lambda lines: b"\n".join(lines) + b"\n\n")


def _events(stream: bytes, cuts: list[int]) -> list[SSEEvent]:
    parser = SSEParser()
    out: list[SSEEvent] = []
    start = 0
    for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        out.extend(parser.feed(stream[start:cut]))
        start = cut
    assert parser.pending == b""
    return out


@given(st.lists(_event, min_size=1, max_size=6), st.lists(st.integers(0, 10_000), max_size=8))
def test_events_match_the_general_parse_at_any_chunking(
    events: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(events)
    # The general line-by-line parse is the reference the one-line fast path must agree with.
    expected = [e for e in (_parse_lines(raw) for raw in events) if e is not None]
    assert _events(stream, cuts) == expected


def test_one_line_data_events_keep_their_raw_bytes_for_pass_through() -> None:
    frames = [b'data: {"a":1}\n\n', b"data: \n\n", b"data: [DONE]\n\n"]
    events = SSEParser().feed(b"".join(frames))
    assert [(e.event, e.data, e.raw) for e in events] == [
        (None, b'{"a":1}', frames[0]),
        (None, b"", frames[1]),
        (None, b"[DONE]", frames[2]),
    ]


def test_multi_line_data_and_crlf_take_the_general_path() -> None:
    events = SSEParser().feed(b"event: delta\r\ndata: one\r\ndata: two\r\n\r\ndata: x\ndata: y\n\n")
    assert [(e.event, e.data) for e in events] == [("delta", b"one\ntwo"), (None, b"x\ny")]


_cr_value = st.binary(max_size=20).map(lambda b: b.replace(b"\n", b""))  # lone CRs kept
#: What token streams look like: mostly one-line `data: ` events, some CRs and CRLFs, any event.
_stream_event = st.one_of(
    _value.map(lambda v: b"data: " + v + b"\n\n"),
    _value.map(lambda v: b"data: " + v + b"\n\n"),
    _cr_value.map(lambda v: b"data: " + v + b"\n\n"),
    _value.map(lambda v: b"data: " + v + b"\r\n\r\n"),
    _value.map(lambda v: b"data: " + v + b"\r\n\n"),
    _event,
)


@given(
    st.lists(_stream_event, min_size=1, max_size=8), st.lists(st.integers(0, 10_000), max_size=8)
)
def test_data_line_framing_gives_what_feed_gives(events: list[bytes], cuts: list[int]) -> None:
    """`feed_data_lines` either declines (None: nothing consumed) or returns exactly the payloads
    and the raw bytes of the events `feed` would return for the same chunk."""
    stream = b"".join(events)
    reference, fast = SSEParser(), SSEParser()
    start = 0
    for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        chunk = stream[start:cut]
        start = cut
        expected = reference.feed(chunk)
        framed = fast.feed_data_lines(chunk)
        if framed is None:
            assert fast.feed(chunk) == expected
        else:
            payloads, whole = framed
            assert payloads == [e.data for e in expected]
            assert whole == b"".join(e.raw for e in expected)
        assert fast.pending == reference.pending


def test_data_line_framing_of_typical_token_streams() -> None:
    frames = [b'data: {"a":1}\n\n', b'data: {"b":2}\n\n', b"data: [DONE]\n\n"]
    parser = SSEParser()
    assert parser.feed_data_lines(frames[0]) == ([b'{"a":1}'], frames[0])
    assert parser.feed_data_lines(frames[1] + frames[2][:7]) == ([b'{"b":2}'], frames[1])
    assert parser.pending == frames[2][:7]
    assert parser.feed_data_lines(frames[2][7:]) == ([b"[DONE]"], frames[2])
    assert parser.feed_data_lines(b": ping\n\n") is None
    assert parser.feed_data_lines(b"data: x\r\n\r\n") is None
