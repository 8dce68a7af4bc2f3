"""A real `redis-server` (the Debian package) on a free loopback port, for the cache tests.

Started with persistence off (`--save '' --appendonly no`) in a temporary directory, optionally
with a password (`--requirepass`); `kill()` ends it by its PID, `start()` brings it back on the
same port. `HeldGetReply` is a relay in front of it that holds back the answer to one GET, so a
test can order a lookup's Redis round trip against other requests without sleeping.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

from loopback_ports import free_port


class RedisServer:
    def __init__(self, workdir: Path, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: apt-get install redis-server (.ci/run does)"
            )
        self.binary = binary
        self.workdir = workdir
        self.password = password
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *(["--requirepass", self.password] if self.password is not None else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.ping():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def ping(self) -> bool:
        try:
            return self.command("PING").endswith(b"+PONG\r\n")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One raw RESP command (for tests that look inside), after AUTH when there is a
        password (its +OK answer comes first)."""
        commands = [("AUTH", self.password)] if self.password is not None else []
        parts = []
        for command in [*commands, args]:
            parts.append(f"*{len(command)}\r\n".encode())
            for arg in command:
                data = arg.encode()
                parts.append(f"${len(data)}\r\n".encode() + data + b"\r\n")
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"".join(parts))
            answer = s.recv(1 << 20)
            if commands and answer == b"+OK\r\n":
                answer += s.recv(1 << 20)  # the command's own answer, if it came apart
            return answer

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class HeldGetReply:
    """A TCP relay in front of a Redis server that can hold back the answer to one GET.

    `arm()`; the next GET that goes through is answered by Redis as usual, but its answer stays
    in the relay (`held` is set once it is there) until `release()`. Everything else passes at
    once. It runs on the test's event loop and listens on a port the kernel gives it in this
    process (no free-port race); `url` names it for a sidecar's `cache.redis.url`.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.held = asyncio.Event()
        self._armed = False
        self._release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def arm(self) -> None:
        self._armed = True

    def release(self) -> None:
        self._release.set()

    async def close(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _relay(self, app_in: asyncio.StreamReader, app_out: asyncio.StreamWriter) -> None:
        redis_in, redis_out = await asyncio.open_connection("127.0.0.1", self.target_port)
        hold = asyncio.Event()  # this connection's next answer is the one to hold
        pumps = (self._requests(app_in, redis_out, hold), self._answers(redis_in, app_out, hold))
        for pump in pumps:
            task = asyncio.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _requests(
        self, app_in: asyncio.StreamReader, redis_out: asyncio.StreamWriter, hold: asyncio.Event
    ) -> None:
        try:
            while chunk := await app_in.read(1 << 16):
                # A command is written whole and small: one read holds all of it.
                if self._armed and chunk.startswith(b"*2\r\n$3\r\nGET\r\n"):
                    self._armed = False
                    hold.set()
                redis_out.write(chunk)
                await redis_out.drain()
        finally:
            redis_out.close()

    async def _answers(
        self, redis_in: asyncio.StreamReader, app_out: asyncio.StreamWriter, hold: asyncio.Event
    ) -> None:
        try:
            while chunk := await redis_in.read(1 << 16):
                if hold.is_set():
                    hold.clear()
                    self.held.set()
                    await self._release.wait()
                app_out.write(chunk)
                await app_out.drain()
        finally:
            app_out.close()
