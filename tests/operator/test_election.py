"""The Lease state machine of leader election, on a fake clock and an in-memory Lease API that
refuses stale writes like the apiserver (tests/lease_fakes.py).

The property at the end is the one that matters: whatever the order of attempts, failures,
concurrent writes and delays, two replicas never count themselves leader at the same moment.
"""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lease_fakes import START, FakeClock, FakeLeases, SkewedClock, unreachable

from modelplane_operator.ha.election import ElectionSettings, LeaderElector
from modelplane_operator.ha.lease import LeaseRecord, micro_time, parse_time

NS, NAME = "mp-system", "modelplane-operator"


def elector(
    leases: FakeLeases,
    clock: FakeClock | SkewedClock,
    identity: str,
    events: list[str] | None = None,
    **overrides: float,
) -> LeaderElector:
    timings = {"lease_duration": 15.0, "renew_deadline": 10.0, "retry_period": 2.0, **overrides}
    log = events if events is not None else []

    async def started() -> None:
        log.append(f"{identity} started")

    async def stopped() -> None:
        log.append(f"{identity} stopped")

    async def new_leader(leader: str | None) -> None:
        log.append(f"{identity} sees {leader}")

    return LeaderElector(
        leases,
        ElectionSettings(
            identity=identity,
            name=NAME,
            namespace=NS,
            annotations={"modelplane.io/stream-url": f"https://{identity}:8443"},
            **timings,
        ),
        clock,
        on_started=started,
        on_stopped=stopped,
        on_new_leader=new_leader,
    )


def stored(leases: FakeLeases) -> LeaseRecord:
    record = leases.record(NS, NAME)
    assert record is not None
    return record


async def test_the_first_replica_creates_the_lease_and_leads() -> None:
    leases, clock, events = FakeLeases(), FakeClock(), []
    a = elector(leases, clock, "a", events)

    await a.step()

    assert a.is_leader() and a.leader() == "a"
    lease = stored(leases)
    assert lease.holder == "a"
    assert lease.duration_seconds == 15
    assert lease.acquire_time == lease.renew_time == START
    assert lease.transitions == 0
    assert lease.annotations == {"modelplane.io/stream-url": "https://a:8443"}
    body = leases.store[(NS, NAME)]
    assert body["spec"] == {
        "holderIdentity": "a",
        "leaseDurationSeconds": 15,
        "leaseTransitions": 0,
        "acquireTime": "2026-03-14T12:00:00.000000Z",
        "renewTime": "2026-03-14T12:00:00.000000Z",
    }
    assert events == ["a started", "a sees a"]


async def test_the_leader_renews_and_keeps_acquire_time_and_transitions() -> None:
    leases, clock = FakeLeases(), FakeClock()
    a = elector(leases, clock, "a")
    await a.step()
    for _ in range(5):
        clock.advance(2.0)
        await a.step()

    lease = stored(leases)
    assert lease.renew_time == START + dt.timedelta(seconds=10)
    assert lease.acquire_time == START
    assert lease.transitions == 0
    assert a.is_leader()


async def test_a_follower_takes_over_only_after_the_lease_stopped_changing_for_its_duration() -> (
    None
):
    leases, clock, events = FakeLeases(), FakeClock(), []
    a = elector(leases, clock, "a", events)
    b = elector(leases, clock, "b", events)
    await a.step()
    await b.step()
    assert not b.is_leader() and b.leader() == "a"

    # a dies. b keeps reading the same Lease: expired 15 s after b saw it change, not before.
    clock.advance(14.9)
    await b.step()
    assert not b.is_leader() and b.leader() == "a"
    clock.advance(0.2)
    assert not a.is_leader()  # a would have stopped writing 5 s ago already
    await b.step()

    assert b.is_leader()
    lease = stored(leases)
    assert lease.holder == "b"
    assert lease.transitions == 1
    assert lease.acquire_time == lease.renew_time == clock.now()
    assert lease.annotations["modelplane.io/stream-url"] == "https://b:8443"
    assert events[-2:] == ["b started", "b sees b"]


async def test_expiry_is_measured_on_the_followers_clock_not_from_the_renew_time() -> None:
    leases, clock = FakeLeases(), FakeClock()
    # The leader's wall clock is an hour behind: its renewTime looks long expired to anyone
    # comparing timestamps across machines.
    a = elector(leases, SkewedClock(clock, -3600.0), "a")
    b = elector(leases, clock, "b")
    await a.step()
    assert stored(leases).renew_time == START - dt.timedelta(hours=1)

    await b.step()
    assert not b.is_leader()
    clock.advance(2.0)
    await a.step()
    clock.advance(14.0)
    await b.step()  # 14 s after b saw the last renewal: still a's
    assert not b.is_leader() and b.leader() == "a"


async def test_of_two_candidates_racing_for_an_expired_lease_exactly_one_wins() -> None:
    leases, clock, events = FakeLeases(), FakeClock(), []
    gone = elector(leases, clock, "gone")
    a = elector(leases, clock, "a", events)
    b = elector(leases, clock, "b", events)
    await gone.step()
    await a.step()
    await b.step()
    clock.advance(16.0)
    version_read_by_b = stored(leases).resource_version

    async def a_first() -> None:
        await a.step()

    # b has read the Lease; a's write lands before b's: b's replace carries a stale version.
    leases.before_write = lambda: leases.put(
        NS, NAME, stored(leases).replace(holder="a", renew_time=clock.now())
    )
    assert await b.try_acquire_or_renew() is False
    assert stored(leases).holder == "a"
    assert stored(leases).resource_version != version_read_by_b
    await b.step()
    assert not b.is_leader() and b.leader() == "a"
    assert "b started" not in events
    await a_first()


async def test_of_two_replicas_creating_the_lease_the_second_gets_a_conflict() -> None:
    leases, clock = FakeLeases(), FakeClock()
    a = elector(leases, clock, "a")
    b = elector(leases, clock, "b")
    leases.before_write = lambda: leases.put(
        NS, NAME, LeaseRecord(holder="a", duration_seconds=15, renew_time=clock.now())
    )
    assert await b.try_acquire_or_renew() is False
    await b.step()
    assert not b.is_leader() and b.leader() == "a"
    assert not a.is_leader()


async def test_a_leader_that_cannot_renew_stops_leading_at_the_deadline_and_steps_down() -> None:
    leases, clock, events = FakeLeases(), FakeClock(), []
    a = elector(leases, clock, "a", events)
    b = elector(leases, clock, "b", events)
    await a.step()
    await b.step()
    renewed = len(leases.writes)

    leases.failures = [unreachable() for _ in range(20)]
    clock.advance(2.0)
    await a.step()  # failed; still inside the deadline
    assert a.is_leader()
    clock.advance(7.9)
    assert a.is_leader()
    clock.advance(0.2)
    # Past renew deadline since the last renewal began: no writing, even before the next round.
    assert not a.is_leader()
    await a.step()
    assert events.count("a stopped") == 1
    await a.step()
    assert events.count("a stopped") == 1  # once
    assert len(leases.writes) == renewed

    # The apiserver is back; b takes over once the Lease has not changed for 15 s.
    leases.failures = []
    clock.advance(4.9)
    await b.step()
    assert b.is_leader() and stored(leases).holder == "b"


async def test_a_slow_answer_does_not_stretch_the_leaders_term() -> None:
    leases, clock = FakeLeases(), FakeClock()
    a = elector(leases, clock, "a")
    b = elector(leases, clock, "b")
    await a.step()
    clock.advance(2.0)
    renewal_began = clock.t

    async def meanwhile() -> None:
        await b.step()  # b sees the renewal the moment it is stored...
        clock.advance(6.0)  # ...and a hears back six seconds later

    leases.after_write = meanwhile
    await a.step()
    assert a.is_leader()
    clock.advance(renewal_began + 10.0 - clock.t + 0.01)
    # The term runs from when the renewal began, so a stops before b could take over.
    assert not a.is_leader()
    clock.advance(renewal_began + 15.0 - clock.t + 0.01)
    await b.step()
    assert b.is_leader()


async def test_a_leader_that_slept_through_another_term_starts_a_new_one() -> None:
    leases, clock, events = FakeLeases(), FakeClock(), []
    a = elector(leases, clock, "a", events)
    b = elector(leases, clock, "b", events)
    await a.step()
    await b.step()
    # a is paused (a long GC, a starved node); b takes over, leads, and shuts down cleanly.
    clock.advance(16.0)
    await b.step()
    await b.release()
    clock.advance(1.0)

    await a.step()

    # a's term lapsed: it steps down first, then takes the free Lease as a new term, so it
    # starts afresh (re-reads the books b kept meanwhile) instead of carrying on.
    assert events[-2:] == ["a stopped", "a started"]
    assert a.is_leader()
    assert stored(leases).transitions == 2


async def test_a_leader_that_sees_another_holder_steps_down_at_once() -> None:
    leases, clock, events = FakeLeases(), FakeClock(), []
    a = elector(leases, clock, "a", events)
    await a.step()
    # Someone hands the Lease to "c" by hand (kubectl edit).
    leases.put(NS, NAME, stored(leases).replace(holder="c", renew_time=clock.now()))
    clock.advance(2.0)
    await a.step()
    assert not a.is_leader()
    assert a.leader() == "c"
    assert events[-2:] == ["a stopped", "a sees c"]


async def test_a_released_lease_is_taken_at_once_by_a_follower() -> None:
    leases, clock = FakeLeases(), FakeClock()
    a = elector(leases, clock, "a")
    b = elector(leases, clock, "b")
    await a.step()
    await b.step()

    await a.release()

    assert not a.is_leader()
    lease = stored(leases)
    assert lease.holder is None and lease.duration_seconds == 1
    assert "modelplane.io/stream-url" not in lease.annotations
    clock.advance(2.0)
    await b.step()
    assert b.is_leader()
    assert stored(leases).transitions == 1


async def test_an_unreachable_apiserver_never_makes_a_candidate_leader() -> None:
    leases, clock = FakeLeases(), FakeClock()
    a = elector(leases, clock, "a")
    leases.failures = [unreachable(), OSError("connection refused"), TimeoutError()]
    for _ in range(3):
        await a.step()
        assert not a.is_leader()
    await a.step()
    assert a.is_leader()


@pytest.mark.parametrize(
    ("timings", "message"),
    [
        ({"lease_duration": 10.0, "renew_deadline": 10.0}, "lease duration (10s) must be more"),
        ({"renew_deadline": 2.0, "retry_period": 2.0}, "renew deadline (2s) must be more than"),
        ({"retry_period": 0.0}, "retry period must be positive"),
        ({"lease_duration": 15.5}, "whole seconds"),
    ],
)
def test_inconsistent_timings_are_refused(timings: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ElectionSettings(identity="a", **timings)


def test_micro_time_round_trips() -> None:
    moment = dt.datetime(2026, 3, 14, 12, 0, 1, 250000, tzinfo=dt.UTC)
    assert micro_time(moment) == "2026-03-14T12:00:01.250000Z"
    assert parse_time(micro_time(moment)) == moment
    assert parse_time("not a time") is None


# --- the safety property ---------------------------------------------------------------------

_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.floats(0.01, 8.0)),
        st.tuples(st.just("step"), st.integers(0, 2)),
        st.tuples(st.just("fail"), st.integers(1, 4)),
        # A replica's request is slow: time passes between its read and its write.
        st.tuples(st.just("slow"), st.integers(0, 2), st.floats(0.01, 12.0)),
        # A replica's read is slow: time passes and another replica acts before it is served.
        st.tuples(
            st.just("slow read"),
            st.integers(0, 2),
            st.integers(0, 2),
            st.floats(0.0, 12.0),
            st.floats(0.0, 12.0),
        ),
        # A replica's write is stored, but its answer is slow, and another replica acts.
        st.tuples(
            st.just("slow answer"),
            st.integers(0, 2),
            st.integers(0, 2),
            st.floats(0.0, 12.0),
            st.floats(0.0, 12.0),
        ),
        st.tuples(st.just("release"), st.integers(0, 2)),
    ),
    min_size=25,
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(_ACTIONS)
async def test_two_replicas_never_lead_at_the_same_moment(
    actions: list[tuple[object, ...]],
) -> None:
    leases, clock = FakeLeases(), FakeClock()
    replicas = [elector(leases, clock, name) for name in ("a", "b", "c")]

    def check() -> None:
        leading = [r.settings.identity for r in replicas if r.is_leader()]
        assert len(leading) <= 1, f"two leaders at t={clock.t}: {leading}"
        if leading:
            assert stored(leases).holder == leading[0]

    for action in actions:
        kind = action[0]
        if kind == "advance":
            clock.advance(float(action[1]))  # type: ignore[arg-type]
        elif kind == "step":
            await replicas[int(action[1])].step()  # type: ignore[call-overload]
        elif kind == "fail":
            leases.failures = [unreachable() for _ in range(int(action[1]))]  # type: ignore[call-overload]
        elif kind == "slow":
            delay = float(action[2])  # type: ignore[arg-type]

            def late(delay: float = delay) -> None:
                clock.advance(delay)
                check()

            leases.before_write = late
            await replicas[int(action[1])].step()  # type: ignore[call-overload]
            leases.before_write = None
        elif kind in ("slow read", "slow answer"):
            other = int(action[2])  # type: ignore[call-overload]
            before, after = float(action[3]), float(action[4])  # type: ignore[arg-type]

            async def meanwhile(
                other: int = other, before: float = before, after: float = after
            ) -> None:
                clock.advance(before)
                await replicas[other].step()
                check()
                clock.advance(after)
                check()

            if kind == "slow read":
                leases.before_read = meanwhile
            else:
                leases.after_write = meanwhile
            await replicas[int(action[1])].step()  # type: ignore[call-overload]
            leases.before_read = leases.after_write = None
        elif kind == "release":
            await replicas[int(action[1])].release()  # type: ignore[call-overload]
        check()
