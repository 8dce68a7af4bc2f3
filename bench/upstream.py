"""A lean OpenAI stand-in for the load benchmark: raw asyncio on uvloop, no framework.

It answers `POST /v1/chat/completions` with OpenAI's `chat.completion` JSON, or, when the body
asks for `"stream": true`, with a `chat.completion.chunk` SSE stream (chunked transfer encoding,
a usage chunk when `stream_options.include_usage` is set, then `data: [DONE]`), one write per
frame as a model server streams tokens. The frames are shaped like those of
`modelplane_sidecar.standins.openai`, but the server does only what the benchmark needs, so it
stays far from being the bottleneck (tens of thousands of requests per second on one core,
against a few thousand for the proxies it feeds).

Run: python bench/upstream.py --port 18001
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterator
from typing import Any

import orjson

REPLY = "Hello! This is a canned answer from the benchmark's local stand-in model, word by word."
WORDS = [w if i == 0 else " " + w for i, w in enumerate(REPLY.split(" "))]
MAX_REQUEST = 1 << 20


def _usage(prompt: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": len(WORDS),
        "total_tokens": prompt + len(WORDS),
    }


def _prompt_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    chars = 0
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                chars += len(m["content"])
    return max(1, chars // 4)


def completion(body: dict[str, Any], ident: str) -> bytes:
    return orjson.dumps(
        {
            "id": ident,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(body.get("model")),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": REPLY, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(_prompt_tokens(body)),
            "system_fingerprint": "fp_bench",
        }
    )


def stream_frames(body: dict[str, Any], ident: str) -> list[bytes]:
    created = int(time.time())
    model = str(body.get("model"))
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

    def frame(delta: dict[str, Any], finish: str | None) -> bytes:
        payload: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    frames = [frame({"role": "assistant", "content": ""}, None)]
    frames += [frame({"content": w}, None) for w in WORDS]
    frames.append(frame({}, "stop"))
    if include_usage:
        usage = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_bench",
            "choices": [],
            "usage": _usage(_prompt_tokens(body)),
        }
        frames.append(b"data: " + orjson.dumps(usage) + b"\n\n")
    frames.append(b"data: [DONE]\n\n")
    return frames


def _chunked(frames: list[bytes]) -> list[bytes]:
    """One HTTP chunk per SSE frame; the last item also ends the body."""
    out = [b"%x\r\n%s\r\n" % (len(f), f) for f in frames]
    out[-1] += b"0\r\n\r\n"
    return out


def _simple(status: str, body: bytes, close: bool = False) -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    if close:
        head += "connection: close\r\n"
    return head.encode() + b"\r\n" + body


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)


class Upstream(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests must carry a Content-Length."""

    counter = 0

    def __init__(self) -> None:
        self._buf = b""
        self._transport: asyncio.Transport | None = None
        #: A stream is being written: the next request waits until it is done.
        self._streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._serve_buffered()

    def _serve_buffered(self) -> None:
        while self._buf and not self._streaming:
            head_end = self._buf.find(b"\r\n\r\n")
            if head_end < 0:
                if len(self._buf) > MAX_REQUEST:
                    self._fail("413 Payload Too Large", "request head too large")
                return
            head = self._buf[:head_end].decode("latin-1")
            lines = head.split("\r\n")
            method, _, rest = lines[0].partition(" ")
            path = rest.partition(" ")[0]
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "transfer-encoding":
                    self._fail("501 Not Implemented", "chunked request bodies are not supported")
                    return
            end = head_end + 4 + length
            if length > MAX_REQUEST:
                self._fail("413 Payload Too Large", "request body too large")
                return
            if len(self._buf) < end:
                return
            raw = self._buf[head_end + 4 : end]
            self._buf = self._buf[end:]
            self._answer(method, path, raw)

    def _answer(self, method: str, path: str, raw: bytes) -> None:
        assert self._transport is not None
        if method != "POST" or path != "/v1/chat/completions":
            self._transport.write(_simple("404 Not Found", _error(f"no route {method} {path}")))
            return
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._transport.write(_simple("400 Bad Request", _error("body is not JSON")))
            return
        Upstream.counter += 1
        ident = f"chatcmpl-bench{Upstream.counter:x}"
        if body.get("stream"):
            # Like a real model server, each frame goes out in its own write, one event-loop turn
            # apart (no sleeping), so the proxy sees a stream, not one buffered blob.
            chunks = _chunked(stream_frames(body, ident))
            self._transport.write(_STREAM_HEAD + chunks[0])
            self._streaming = True
            asyncio.get_running_loop().call_soon(self._send_next, iter(chunks[1:]))
        else:
            self._transport.write(_simple("200 OK", completion(body, ident)))

    def _send_next(self, rest: Iterator[bytes]) -> None:
        assert self._transport is not None
        chunk = next(rest, None)
        if self._transport.is_closing():
            return
        if chunk is None:
            self._streaming = False
            self._serve_buffered()
            return
        self._transport.write(chunk)
        asyncio.get_running_loop().call_soon(self._send_next, rest)

    def _fail(self, status: str, message: str) -> None:
        assert self._transport is not None
        self._transport.write(_simple(status, _error(message), close=True))
        self._transport.close()
        self._buf = b""


def _error(message: str) -> bytes:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return orjson.dumps({"error": error})


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
