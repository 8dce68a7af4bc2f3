"""Request coalescing (single flight): identical cacheable requests share one upstream call.

A request that may be answered from the cache and misses becomes the *leader* of a flight under
its cache key (tenant, policy version, operation, route and canonical body) and lane, unless a
flight with that key is already in the air: then it *follows* it and waits for the leader's
answer instead of calling upstream too. The leader's complete answer (the one the cache stores)
is handed to every follower when the leader ends; a leader that gets no complete answer (every
endpoint failed, its stream broke, its app went away) hands over nothing, and the first follower
to resume leads a new flight that the others follow. A request follows at most
`FOLLOW_LIMIT` flights, then calls upstream on its own.

Waiting never outlives the follower's own deadline, and a follower that goes away stops waiting
without touching the flight. Only this process's requests coalesce (no cross-replica locking).
"""

from __future__ import annotations

import asyncio

from .store import CachedResponse

#: Flights one request may follow before it calls upstream on its own.
FOLLOW_LIMIT = 2


class Flight:
    """One upstream call that identical requests wait for."""

    __slots__ = ("_answer", "key", "leader", "waiters")

    def __init__(self, key: str, leader: str) -> None:
        self.key = key
        #: The request id of the request that makes the call.
        self.leader = leader
        self.waiters = 0
        self._answer: asyncio.Future[CachedResponse | None] = (
            asyncio.get_running_loop().create_future()
        )

    @property
    def landed(self) -> bool:
        return self._answer.done()

    async def wait(self, within: float) -> CachedResponse | None:
        """The leader's answer (None: it got none). TimeoutError after `within` seconds; a
        waiter cancelled (its app went away) stops waiting, the flight goes on."""
        self.waiters += 1
        try:
            async with asyncio.timeout(within):
                return await asyncio.shield(self._answer)
        finally:
            self.waiters -= 1


class Flights:
    """The flights in the air in this sidecar, by key."""

    def __init__(self) -> None:
        self._by_key: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: str) -> Flight | None:
        return self._by_key.get(key)

    def take_off(self, key: str, leader: str) -> Flight:
        flight = Flight(key, leader)
        self._by_key[key] = flight
        return flight

    def land(self, flight: Flight, answer: CachedResponse | None) -> None:
        """End `flight`: its waiters get `answer`, later requests start a new one."""
        if self._by_key.get(flight.key) is flight:
            del self._by_key[flight.key]
        if not flight.landed:
            flight._answer.set_result(answer)
