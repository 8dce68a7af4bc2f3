"""A real `redis-server` (the Debian package) on a free loopback port, for the cache tests.

Started with persistence off (`--save '' --appendonly no`) in a temporary directory, optionally
with a password (`--requirepass`); `kill()` ends it by its PID, `start()` brings it back on the
same port.
"""

from __future__ import annotations

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
