"""Server-Sent Events framing: split a byte stream into events, and write events back out."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SSEEvent:
    event: str | None
    data: bytes
    #: The event exactly as it arrived (terminator included), for zero-copy pass-through.
    raw: bytes


_CR = ord("\r")


class SSEParser:
    """Incremental parser: feed arbitrary chunks, get whole events back.

    Tolerates `\\r\\n` line endings, comments (`: ping`), multi-line `data:` fields and events
    split across chunks at any byte.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buffer = self._buffer + chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events: list[SSEEvent] = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            raw = buffer[start : end + 2]
            start = end + 2
            event = _parse_event(raw)
            if event is not None:
                events.append(event)
        self._buffer = buffer[start:]
        return events

    def feed_data_lines(self, chunk: bytes) -> tuple[list[bytes], bytes] | None:
        """A faster `feed` for what token streams send: when the buffered bytes are only
        one-line `data: ...` events (and maybe the start of the next), their payloads and the
        bytes of those whole events, exactly as `feed` would give them; else None, with nothing
        consumed (call `feed`)."""
        buffer = self._buffer + chunk if self._buffer else chunk
        last = len(buffer) - 2
        if (
            buffer.startswith(b"data: ")
            and buffer.find(b"\n", 6) == last
            and buffer.endswith(b"\n\n")
            and buffer[last - 1] != _CR
        ):
            # The most common chunk of all: exactly one event.
            self._buffer = b""
            return [buffer[6:last]], buffer
        # `feed` rewrites CRLF line ends; a lone CR is data (above), here any CR goes to `feed`.
        if b"\r" in buffer:
            return None
        parts = buffer.split(b"\n\n")
        rest = parts.pop()
        for part in parts:
            if not part.startswith(b"data: ") or b"\n" in part:
                return None
        self._buffer = rest
        return [part[6:] for part in parts], buffer[: len(buffer) - len(rest)]

    @property
    def pending(self) -> bytes:
        """Bytes received after the last complete event (non-empty means a cut-off event)."""
        return self._buffer


def _parse_event(raw: bytes) -> SSEEvent | None:
    # Fast path for the one-line `data: ...` event nearly every provider sends (`raw` always ends
    # with the blank line): the same result as the general parse below, without splitting lines.
    if raw.startswith(b"data: ") and raw.find(b"\n", 6) == len(raw) - 2:
        return SSEEvent(None, raw[6:-2], raw)
    return _parse_lines(raw)


def _parse_lines(raw: bytes) -> SSEEvent | None:
    """The general parse of one event: fields line by line, comments skipped."""
    name: str | None = None
    data: list[bytes] = []
    for line in raw.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    if name is None and not data:
        return None
    return SSEEvent(name, b"\n".join(data), raw)


def sse_data(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


DONE_FRAME = b"data: [DONE]\n\n"
