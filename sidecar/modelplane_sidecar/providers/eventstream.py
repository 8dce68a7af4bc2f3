"""AWS event-stream framing (`application/vnd.amazon.eventstream`), as Bedrock streams use it.

Each message is: total length and headers length (4 bytes each, big-endian), a CRC32 of those
eight bytes, the headers (name, type, value), the payload, and a CRC32 of everything before it.
`EventStreamDecoder` takes the bytes as they arrive, cut anywhere, and returns whole messages,
checking both checksums; `encode_message` writes one (for the Bedrock stand-in).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from .base import FailureKind, UpstreamFailure

_PRELUDE = struct.Struct(">III")
#: Messages are at most 16 MiB (the service's own limit); anything larger is corrupt framing.
_MAX_MESSAGE = 16 * 1024 * 1024
_MIN_MESSAGE = _PRELUDE.size + 4
#: Header value type -> fixed value size in bytes (None: 2-byte length prefix follows).
_FIXED = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}
_STRING = 7


@dataclass(slots=True)
class EventMessage:
    headers: dict[str, str | bytes | int | bool]
    payload: bytes

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return value if isinstance(value, str) else None


def _broken(why: str) -> UpstreamFailure:
    return UpstreamFailure(FailureKind.PROTOCOL, f"upstream event stream is corrupt: {why}")


class EventStreamDecoder:
    """Incremental decoder: `feed` bytes, get the complete messages among them."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of a message not yet complete (non-zero at the end means a cut-off stream)."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> list[EventMessage]:
        self._buffer += chunk
        messages: list[EventMessage] = []
        while len(self._buffer) >= _MIN_MESSAGE:
            total, headers_length, prelude_crc = _PRELUDE.unpack_from(self._buffer)
            if zlib.crc32(self._buffer[:8]) != prelude_crc:
                raise _broken("prelude checksum mismatch")
            if not _MIN_MESSAGE <= total <= _MAX_MESSAGE or headers_length > total - _MIN_MESSAGE:
                raise _broken(f"impossible lengths (total {total}, headers {headers_length})")
            if len(self._buffer) < total:
                break
            frame = bytes(self._buffer[:total])
            del self._buffer[:total]
            (message_crc,) = struct.unpack_from(">I", frame, total - 4)
            if zlib.crc32(frame[:-4]) != message_crc:
                raise _broken("message checksum mismatch")
            start = _PRELUDE.size
            headers = _headers(frame[start : start + headers_length])
            messages.append(EventMessage(headers, frame[start + headers_length : total - 4]))
        return messages


def _headers(raw: bytes) -> dict[str, str | bytes | int | bool]:
    headers: dict[str, str | bytes | int | bool] = {}
    at = 0
    while at < len(raw):
        name_length = raw[at]
        name = raw[at + 1 : at + 1 + name_length].decode("utf-8", "replace")
        at += 1 + name_length
        if at >= len(raw):
            raise _broken("header without a value")
        kind = raw[at]
        at += 1
        value: str | bytes | int | bool
        if kind in (0, 1):
            value = kind == 0
        elif kind in _FIXED:
            size = _FIXED[kind]
            data = raw[at : at + size]
            value = int.from_bytes(data, "big", signed=kind in (2, 3, 4, 5, 8))
            value = data if kind == 9 else value
            at += size
        elif kind in (6, _STRING):
            (length,) = struct.unpack_from(">H", raw, at)
            data = raw[at + 2 : at + 2 + length]
            value = data.decode("utf-8", "replace") if kind == _STRING else data
            at += 2 + length
        else:
            raise _broken(f"unknown header value type {kind}")
        headers[name] = value
    return headers


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message with string-valued headers."""
    encoded = bytearray()
    for name, value in headers.items():
        name_bytes, value_bytes = name.encode(), value.encode()
        encoded += bytes([len(name_bytes)]) + name_bytes + bytes([_STRING])
        encoded += struct.pack(">H", len(value_bytes)) + value_bytes
    total = _MIN_MESSAGE + len(encoded) + len(payload)
    prelude = struct.pack(">II", total, len(encoded))
    body = prelude + struct.pack(">I", zlib.crc32(prelude)) + bytes(encoded) + payload
    return body + struct.pack(">I", zlib.crc32(body))
