"""Two operator replicas wired as `modelplane operator --leader-election` wires them: elector, fleet
counts, controller and stream server. The Lease API and the apiserver's object and status calls
are in-memory fakes (tests/lease_fakes.py and `Apiserver` below); the controller, compiler,
budget books and election are the real ones. e2e/test_operator_ha.py runs real processes.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from lease_fakes import FakeClock, FakeLeases, unreachable

from modelplane_operator.budget.service import BudgetService
from modelplane_operator.controller import Controller
from modelplane_operator.crd_models import BUDGET, MODEL_ENDPOINT, ROUTING_POLICY
from modelplane_operator.distribution.auth import Authenticator
from modelplane_operator.distribution.hub import ConfigHub
from modelplane_operator.distribution.server import StreamServer
from modelplane_operator.ha.election import ElectionSettings
from modelplane_operator.ha.replica import STREAM_URL_ANNOTATION, Replica, ReplicaSettings
from modelplane_operator.kube import KubeError

NS = "team-a"
API = "modelplane.io/v1alpha1"
BUDGET_PATH = f"/apis/modelplane.io/v1alpha1/namespaces/{NS}/budgets/daily"
#: A time inside the Budget period the tests write ("periodStart": 2026-03-13).
IN_PERIOD = dt.datetime(2026, 3, 13, 12, tzinfo=dt.UTC)


def objects() -> list[tuple[Any, dict[str, Any]]]:
    meta = {"namespace": NS, "generation": 1, "creationTimestamp": "2026-03-14T00:00:00Z"}
    return [
        (
            MODEL_ENDPOINT,
            {
                "apiVersion": API,
                "kind": "ModelEndpoint",
                "metadata": {**meta, "name": "gpt", "uid": "u1"},
                "spec": {"provider": "openai", "model": "gpt-4o", "baseURL": "http://127.0.0.1:1"},
            },
        ),
        (
            ROUTING_POLICY,
            {
                "apiVersion": API,
                "kind": "RoutingPolicy",
                "metadata": {**meta, "name": "routes", "uid": "u2"},
                "spec": {"models": [{"name": "chat", "targets": [{"endpoint": "gpt"}]}]},
            },
        ),
        (
            BUDGET,
            {
                "apiVersion": API,
                "kind": "Budget",
                "metadata": {**meta, "name": "daily", "uid": "u3"},
                "spec": {
                    "period": "daily",
                    "limitUSD": 10.0,
                    "thresholds": [{"percent": 100, "action": "block"}],
                },
            },
        ),
    ]


class Apiserver:
    """What one replica's KubeClient would reach: object reads, status patches, Events."""

    instance = "host"

    def __init__(self, objects: Mapping[str, Mapping[str, Any]]) -> None:
        self.objects = {path: copy.deepcopy(dict(body)) for path, body in objects.items()}
        for body in self.objects.values():
            body["metadata"].setdefault("resourceVersion", "1")
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        self.events: list[str] = []
        self.during_patch: Callable[[], None] | None = None

    async def request(
        self, method: str, path: str, body: object | None = None, content_type: str = ""
    ) -> Any:
        assert method == "GET", f"unexpected {method} {path}"
        if path not in self.objects:
            raise KubeError(404, "not found")
        return copy.deepcopy(self.objects[path])

    async def get_secret(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return None

    def write(self, path: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """A status write as the apiserver stores it: merged, with a new resourceVersion."""
        stored = self.objects[path]
        stored["status"] = {**(stored.get("status") or {}), **status}
        meta = stored["metadata"]
        meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)
        return copy.deepcopy(stored)

    async def patch_status(
        self,
        group: str,
        version: str,
        plural: str,
        namespace: str,
        name: str,
        status: object,
        resource_version: str | None = None,
    ) -> Any:
        if self.during_patch is not None:
            hook, self.during_patch = self.during_patch, None
            hook()
        assert isinstance(status, dict)
        path = f"/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}"
        if path in self.objects:
            current = self.objects[path]["metadata"]["resourceVersion"]
            if resource_version is not None and resource_version != current:
                raise KubeError(409, "the object has been modified")
            self.patches.append((plural, name, status))
            return self.write(path, status)
        self.patches.append((plural, name, status))
        return {}

    async def post_event(
        self, involved: Mapping[str, str], type_: str, reason: str, message: str
    ) -> None:
        self.events.append(f"{involved['name']}: {reason}")

    async def apply(self, path: str, body: Mapping[str, Any]) -> Any:
        raise AssertionError("no model servers in these tests")


class Member:
    def __init__(self, identity: str, leases: FakeLeases, clock: FakeClock, fresh: Any) -> None:
        self.kube = Apiserver(fresh)
        self.hub = ConfigHub()
        self.books = BudgetService()
        self.controller = Controller(self.kube, self.hub, 0.0, budgets=self.books)  # type: ignore[arg-type]
        self.stream = StreamServer(self.hub, Authenticator(_no_review))
        self.stream.budgets = self.books
        settings = ReplicaSettings(
            election=ElectionSettings(identity=identity, name="mp", namespace="mp-system"),
            advertise_url=f"https://{identity}.example:8443",
        )
        self.replica = Replica(
            settings,
            self.kube,
            self.controller,
            self.stream,
            self.hub,
            leases=leases,
            clock=clock,  # type: ignore[arg-type]
        )

    def observe(self, watched: list[tuple[Any, dict[str, Any]]]) -> None:
        for kind, body in watched:
            self.controller.observe(kind, "ADDED", body)

    async def leading_with_books(self) -> Any:
        """Observe the namespace, win the election, take the books over and reconcile: the
        leader's ledger of the daily Budget."""
        self.observe(objects())
        await self.replica.elector.step()
        await self.taken_over()
        await self.controller.reconcile(NS)
        return self.books.ledger(NS, "daily")

    async def taken_over(self) -> None:
        for _ in range(6000):
            if self.replica.keeps_budgets():
                return
            await asyncio.sleep(0.005)
        raise AssertionError("the leader never took the books over")


async def _no_review(token: str, audiences: list[str]) -> Mapping[str, Any]:
    return {"authenticated": False}


def fresh_budget(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    body = copy.deepcopy(objects()[2][1])
    body["status"] = status
    return {BUDGET_PATH: body}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def close(*members: Member) -> None:
    for member in members:
        await member.controller.close()
        await member.books.close()


async def elected(leases: FakeLeases, clock: FakeClock) -> tuple[Member, Member]:
    """Two replicas that watched the same objects; a leads (books taken over), b follows."""
    a = Member("a", leases, clock, fresh_budget({}))
    b = Member("b", leases, clock, fresh_budget({}))
    for member in (a, b):
        member.observe(objects())
    await a.replica.elector.step()
    await b.replica.elector.step()
    await a.taken_over()
    return a, b


async def test_only_the_leader_writes_status_and_keeps_the_books(clock: FakeClock) -> None:
    leases = FakeLeases()
    a, b = await elected(leases, clock)
    try:
        await a.controller.reconcile(NS)
        await b.controller.reconcile(NS)

        assert {(plural, name) for plural, name, _ in a.kube.patches} == {
            ("modelendpoints", "gpt"),
            ("routingpolicies", "routes"),
            ("budgets", "daily"),
        }
        assert b.kube.patches == [] and b.kube.events == []
        assert a.books.ledger(NS, "daily") is not None
        assert b.books.ledgers(NS) == {}
        # Both compiled the same config from the same objects: sidecars on either run it.
        assert a.hub.version(NS) == b.hub.version(NS) is not None
        assert b.replica.leader_peer() is not None
        assert b.replica.leader_peer().url == "https://a.example:8443"  # type: ignore[union-attr]
        assert a.replica.leader_peer() is None
        lease = leases.record("mp-system", "mp")
        assert lease is not None and lease.annotations[STREAM_URL_ANNOTATION].startswith(
            "https://a"
        )
    finally:
        await close(a, b)


async def test_a_new_leader_starts_the_books_from_a_fresh_read_not_the_lagging_watch(
    clock: FakeClock,
) -> None:
    leases = FakeLeases()
    # The old leader's last write (a lease granted to p/1) is in the apiserver, but this
    # replica's watch has not delivered it yet.
    fresh = fresh_budget(
        {
            "periodStart": "2026-03-13T00:00:00Z",
            "spentUSD": 3.0,
            "leases": [{"holder": "p/1", "grantedUSD": 1.5, "settledUSD": 1.0}],
        }
    )
    a = Member("a", leases, clock, fresh)
    try:
        watched = objects()
        watched[2][1]["status"] = {"periodStart": "2026-03-13T00:00:00Z", "spentUSD": 1.0}
        a.observe(watched)
        a.books._clock = lambda: IN_PERIOD  # type: ignore[method-assign]
        await a.replica.elector.step()
        await a.taken_over()

        ledger = a.books.ledger(NS, "daily")
        assert ledger is not None
        assert ledger.spent == pytest.approx(3.0)
        assert ledger.holders["p/1"].outstanding == pytest.approx(0.5)
        assert ledger.free == pytest.approx(10.0 - 3.0 - 0.5)
    finally:
        await close(a)


async def test_a_leader_that_loses_its_lease_while_writing_the_books_does_not_grant(
    clock: FakeClock,
) -> None:
    leases = FakeLeases()
    a = Member("a", leases, clock, fresh_budget({}))
    try:
        ledger = await a.leading_with_books()
        assert ledger is not None
        ledger.grant("p/1", 0.2)

        # The write-ahead of a grant is slow: the renew deadline passes while it is in flight.
        a.kube.during_patch = lambda: clock.advance(10.5)
        with pytest.raises(KubeError, match="lost the leader lease"):
            await a.controller.write_budget_status(NS, "daily")
        assert not a.controller.leading()
        with pytest.raises(KubeError, match="does not keep the budget books"):
            await a.controller.write_budget_status(NS, "daily")

        # Its next round steps it down (the apiserver is away now): books dropped, no writes.
        written = len(a.kube.patches)
        leases.failures = [unreachable()]
        await a.replica.elector.step()
        assert not a.replica.keeps_budgets()
        assert a.books.ledgers(NS) == {}
        a.controller.observe(
            objects()[1][0],
            "MODIFIED",
            {**objects()[1][1], "metadata": {**objects()[1][1]["metadata"], "generation": 2}},
        )
        await a.controller.reconcile(NS)
        assert len(a.kube.patches) == written
    finally:
        await close(a)


async def test_a_books_write_that_lands_after_the_term_cannot_overwrite_the_next_leaders(
    clock: FakeClock,
) -> None:
    leases = FakeLeases()
    a = Member("a", leases, clock, fresh_budget({}))
    try:
        ledger = await a.leading_with_books()
        assert ledger is not None

        # A spec edit moved the Budget on: the leader's next write is refused once (409),
        # then read again and written.
        a.kube.write(BUDGET_PATH, {"note": "edited"})
        ledger.grant("p/1", 0.2)
        await a.controller.write_budget_status(NS, "daily")
        assert a.kube.objects[BUDGET_PATH]["status"]["leasedUSD"] == pytest.approx(0.2)

        # The next write is delayed in the network past a's term, and a new leader has written
        # its books meanwhile: a's stale write is refused, the new books stay.
        ledger.grant("p/1", 0.3)

        def meanwhile() -> None:
            clock.advance(10.5)
            a.kube.write(BUDGET_PATH, {"leasedUSD": 0.0, "note": "new leader"})

        a.kube.during_patch = meanwhile
        with pytest.raises(KubeError, match="modified"):
            await a.controller.write_budget_status(NS, "daily")
        assert a.kube.objects[BUDGET_PATH]["status"]["note"] == "new leader"
    finally:
        await close(a)


async def test_after_the_leader_goes_the_follower_takes_over_and_writes(clock: FakeClock) -> None:
    leases = FakeLeases()
    a, b = await elected(leases, clock)
    try:
        # a is gone: it never renews again.
        for _ in range(8):
            clock.advance(2.0)
            await b.replica.elector.step()
        await b.taken_over()
        assert not a.controller.leading()

        await b.controller.reconcile(NS)
        assert {name for _, name, _ in b.kube.patches} == {"gpt", "routes", "daily"}
        assert b.books.ledger(NS, "daily") is not None
        lease = leases.record("mp-system", "mp")
        assert lease is not None and lease.holder == "b" and lease.transitions == 1
    finally:
        await close(a, b)
