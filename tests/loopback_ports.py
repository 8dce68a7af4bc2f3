"""Free loopback ports for servers that a test starts in another process and must name a port
for in advance (`modelplane serve`, `modelplane operator`, redis-server).

Such a port is free only when it is chosen. One from `bind(("127.0.0.1", 0))` comes from the
kernel's ephemeral range, where every outgoing connection on the machine also takes its local
port: on a busy machine one of them can take the port before the server binds it, and the server
then fails to start. These ports come from below that range, which the kernel never hands out by
itself; the pick is random (from the OS, not the seedable `random`) so that concurrent test runs
keep apart, and each port is checked free on every interface by binding it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: Ports below this are left to services with well-known or configured ports.
_LOWEST = 20000
_PICK = random.SystemRandom()
#: Ports this process handed out already (two servers of one test never get the same one).
_GIVEN: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A port nothing is bound to now, outside the kernel's ephemeral range, and not handed out
    before by this process."""
    below = _ephemeral_start()
    lowest = _LOWEST if below - _LOWEST >= 1000 else 1024
    for _ in range(500):
        port = _PICK.randrange(lowest, below)
        if port in _GIVEN:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port found in {lowest}..{below - 1}")
