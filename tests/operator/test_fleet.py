"""Fleet-wide sidecar counts: each replica publishes a tally in its own Lease, the leader sums
the fresh ones with its own (in-memory Lease API and a hand-moved clock, tests/lease_fakes.py).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from lease_fakes import FakeClock, FakeLeases

from modelplane_operator.controller import applied_condition
from modelplane_operator.distribution.hub import ConfigHub, Identity, Session, SidecarCounts
from modelplane_operator.ha.fleet import (
    REPLICA_OF_LABEL,
    SIDECARS_ANNOTATION,
    FleetCounts,
    FleetSettings,
    SidecarTally,
    decode,
    encode,
    fleet_counts,
    tally,
)
from modelplane_operator.ha.lease import LeaseRecord

NS = "mp-system"
V1, V2 = "v1-aaaa", "v2-bbbb"


async def _nowhere(message: bytes) -> None:
    raise AssertionError("no config is published in these tests, so nothing is pushed")


def sidecar(
    hub: ConfigHub, name: str, namespace: str = "team-a", running: str | None = V2
) -> Session:
    session = Session(
        Identity(namespace, "app", f"system:serviceaccount:{namespace}:app"),
        name,
        _nowhere,
        running,
    )
    hub.connect(session)
    return session


class Replicas:
    def __init__(self) -> None:
        self.leases = FakeLeases()
        self.clock = FakeClock()
        self.changed: list[str] = []

    def replica(self, identity: str, leading: bool) -> tuple[FleetCounts, ConfigHub]:
        hub = ConfigHub()
        fleet = FleetCounts(
            self.leases,
            hub,
            FleetSettings(group="mp-modelplane", namespace=NS, identity=identity, ttl=15),
            self.clock,
            is_leader=lambda: leading,
            on_change=self.changed.append if leading else None,
        )
        return fleet, hub


@pytest.fixture
def replicas() -> Iterator[Replicas]:
    yield Replicas()


def test_counts_add_up_across_replicas_against_one_version() -> None:
    hub_a, hub_b = ConfigHub(), ConfigHub()
    sidecar(hub_a, "a1")
    sidecar(hub_a, "a2", running=V1)
    sidecar(hub_b, "b1")
    refused = sidecar(hub_b, "b2", running=V1)
    refused.rejected = (V2, "endpoint 'gpt': unknown provider")

    tallies = [tally(hub_a.sessions("team-a")), tally(hub_b.sessions("team-a"))]

    assert tallies[1] == SidecarTally(
        2, {V2: 1, V1: 1}, {V2: (1, "endpoint 'gpt': unknown provider")}
    )
    counts = fleet_counts(tallies, V2)
    assert counts == SidecarCounts(
        connected=4, current=2, stale=1, rejected=1, rejection="endpoint 'gpt': unknown provider"
    )
    status, reason, message = applied_condition(True, V2, counts)
    assert (status, reason) == ("False", "Rejected")
    assert message.startswith(f"2 of 4 connected sidecars run version {V2}; 1 stale, 1 rejected")
    # Against the old version the same sidecars count differently.
    assert fleet_counts(tallies, V1) == SidecarCounts(4, 2, 2, 0, None)


def test_the_wire_form_round_trips_and_ignores_junk() -> None:
    tallies = {"team-a": SidecarTally(3, {V1: 2}, {V2: (1, "bad")}), "team-b": SidecarTally(1)}
    assert decode(encode(tallies)) == tallies
    assert decode("not json") == {}
    assert decode('{"team-a": {"connected": -3, "acked": {"v": "x"}, "rejected": {"v": 1}}}') == {
        "team-a": SidecarTally()
    }
    assert decode(None) == {}


async def test_the_leader_sums_the_followers_published_tallies(replicas: Replicas) -> None:
    leader, leader_hub = replicas.replica("a", leading=True)
    follower, follower_hub = replicas.replica("b", leading=False)
    sidecar(leader_hub, "a1")
    sidecar(follower_hub, "b1")
    sidecar(follower_hub, "b2", running=V1)

    await follower.tick()
    await leader.tick()

    assert leader.counts("team-a", V2) == SidecarCounts(3, 2, 1, 0, None)
    assert leader.replicas() == ["b"]
    assert replicas.changed == ["team-a"]
    # Each replica's Lease says who it is and what it has.
    stored = replicas.leases.record(NS, follower.name)
    assert stored is not None and stored.holder == "b" and stored.duration_seconds == 15
    assert stored.labels == {REPLICA_OF_LABEL: "mp-modelplane"}
    assert decode(stored.annotations[SIDECARS_ANNOTATION])["team-a"].connected == 2
    # The follower reads nobody's counts; it never writes status.
    assert follower.counts("team-a", V2) == SidecarCounts(2, 1, 1, 0, None)

    # A sidecar ACKs the new version on the follower: the leader sees it after the next ticks.
    moved = follower_hub.sessions("team-a")[1]
    moved.acked = V2
    follower.mark("team-a")
    replicas.changed.clear()
    replicas.clock.advance(1.0)
    await follower.tick()
    await leader.tick()
    assert leader.counts("team-a", V2) == SidecarCounts(3, 3, 0, 0, None)
    assert replicas.changed == ["team-a"]


async def test_a_silent_replica_stops_counting_after_its_ttl_and_a_live_one_keeps_counting(
    replicas: Replicas,
) -> None:
    leader, _ = replicas.replica("a", leading=True)
    alive, alive_hub = replicas.replica("b", leading=False)
    dead, dead_hub = replicas.replica("c", leading=False)
    sidecar(alive_hub, "b1")
    sidecar(dead_hub, "c1")
    await alive.tick()
    await dead.tick()
    await leader.tick()
    assert leader.counts("team-a", V2).connected == 2

    # c dies; b keeps publishing (every ttl/3 with nothing new) and stays counted.
    replicas.changed.clear()
    for _ in range(16):
        replicas.clock.advance(1.0)
        await alive.tick()
        await leader.tick()
    assert leader.counts("team-a", V2).connected == 1
    assert leader.replicas() == ["b"]
    assert replicas.changed == ["team-a"]


async def test_a_new_leader_ignores_leases_that_were_stale_before_it_looked(
    replicas: Replicas,
) -> None:
    gone = LeaseRecord(
        holder="old-pod",
        duration_seconds=15,
        renew_time=replicas.clock.now() - dt.timedelta(seconds=60),
        labels={REPLICA_OF_LABEL: "mp-modelplane"},
        annotations={SIDECARS_ANNOTATION: encode({"team-a": SidecarTally(5, {V2: 5})})},
    )
    replicas.leases.put(NS, "mp-modelplane-0123456789ab", gone)
    leader, leader_hub = replicas.replica("a", leading=True)
    sidecar(leader_hub, "a1")

    await leader.tick()

    assert leader.counts("team-a", V2) == SidecarCounts(1, 1, 0, 0, None)
    # Ten minutes on, the leader deletes the Lease of the replica that never came back.
    replicas.clock.advance(600.0)
    await leader.tick()
    assert replicas.leases.record(NS, "mp-modelplane-0123456789ab") is None


async def test_a_clean_shutdown_withdraws_the_replicas_counts_at_once(replicas: Replicas) -> None:
    leader, _ = replicas.replica("a", leading=True)
    follower, follower_hub = replicas.replica("b", leading=False)
    sidecar(follower_hub, "b1")
    await follower.tick()
    await leader.tick()
    assert leader.counts("team-a", V2).connected == 1

    await follower.withdraw()
    replicas.clock.advance(1.0)
    await leader.tick()

    assert leader.counts("team-a", V2).connected == 0
    assert replicas.leases.record(NS, follower.name) is None


async def test_a_replica_whose_lease_was_replaced_under_it_writes_again(
    replicas: Replicas,
) -> None:
    follower, follower_hub = replicas.replica("b", leading=False)
    sidecar(follower_hub, "b1")
    await follower.tick()
    # Its Lease is rewritten by someone else (a previous run of the same pod name).
    stale = replicas.leases.record(NS, follower.name)
    assert stale is not None
    replicas.leases.put(NS, follower.name, stale.replace(annotations={}))
    follower.mark()
    await follower.tick()  # conflict: re-read
    await follower.tick()  # written at the version it read
    stored = replicas.leases.record(NS, follower.name)
    assert stored is not None
    assert decode(stored.annotations.get(SIDECARS_ANNOTATION))["team-a"].connected == 1
