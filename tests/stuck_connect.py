"""A loopback port whose connections never complete: the kernel drops their SYNs.

A listening socket with a backlog of 0 that never accepts: once its accept queue is full (the
first connection), Linux drops every further SYN, so a client's `connect()` waits until its own
connect timeout. This is how an upstream that cannot be reached in time looks to the sidecar
(aiohttp's `sock_connect` timeout), without any address but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def stuck_port() -> Iterator[int]:
    """A port on 127.0.0.1 where connecting hangs, for the duration of the block."""
    listener = socket.socket()
    held: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        for _ in range(16):  # the accept queue takes one or two; bounded
            client = socket.socket()
            client.settimeout(0.5)
            try:
                client.connect(("127.0.0.1", port))
            except TimeoutError:
                client.close()
                if held:  # (the first always fits: a timeout then was only a slow machine)
                    break
                continue
            held.append(client)
        else:
            raise AssertionError("the accept queue never filled up")
        yield port
    finally:
        for client in held:
            client.close()
        listener.close()
