"""The reconcile loop behind the thin kopf handlers.

Handlers only tell the controller what the API server said (`observe`). The controller keeps
the latest body of every Modelplane object, and per namespace it debounces a burst of changes
into one reconcile: read the referenced Secrets by name, call the pure compiler, publish
the snapshot to the config hub, and write each object's status (observedGeneration, Ready,
Applied, the sidecar counts) when it differs from what is there, with an Event on every Ready
transition. Sidecar ACKs and NACKs only refresh the Applied part, at most once a second.

Secrets are not watched (that would need list/watch on every Secret of the cluster, and would
stream all their data into this process): the controller remembers the resourceVersion of each
Secret a namespace's objects reference, and `resync_secrets` reads just those again every few
seconds; a changed, created or deleted one schedules the namespace's reconcile, so a rotated API
key reaches the sidecars within one resync interval.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .budget.ledger import BudgetLedger, Threshold
from .budget.service import BudgetService
from .compile import (
    CompiledNamespace,
    NamespaceInputs,
    Resource,
    Verdict,
    compile_namespace,
    decode_secret,
    secret_names,
    wire_config,
)
from .crd_models import (
    API_VERSION,
    BUDGET,
    GROUP,
    KINDS,
    MODEL_ENDPOINT,
    ROUTING_POLICY,
    VERSION,
    Kind,
)
from .distribution.hub import ConfigHub, SidecarCounts
from .kube import KubeClient, KubeError
from .metrics import OperatorMetrics
from .selfhosted.tracker import SelfHosted, referenced_service

log = logging.getLogger("modelplane.operator")

READY = "Ready"
APPLIED = "Applied"
THRESHOLD_REACHED = "ThresholdReached"
CONFLICTED = "Conflicted"
_READY_FIELDS = ("status", "reason", "message")


@dataclass(frozen=True)
class ObjectKey:
    kind: str
    namespace: str
    name: str


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _relevant(body: Mapping[str, Any]) -> tuple[Any, ...]:
    """What of an object the compiler reads; a status-only update changes none of it.

    A Budget's spend comes from the operator's own books (`BudgetService`), which ask for a
    recompile when a budget's mode changes, so its status writes do not trigger one. Replicas
    that do not keep the books (followers) compile its mode from the status the leader wrote,
    so for them the thresholds it reached and its period count too.
    """
    meta = body.get("metadata", {})
    status = body.get("status") or {}
    return (
        meta.get("generation"),
        meta.get("creationTimestamp"),
        status.get("thresholdsReached"),
        status.get("periodStart"),
    )


def threshold_condition(ledger: BudgetLedger) -> tuple[str, str, str]:
    """(status, reason, message) of a Budget's ThresholdReached condition."""
    passed = ledger.reached()
    share = f"{ledger.percent_spent():.2f}% of ${ledger.terms.limit:g} spent"
    period = f"in the {ledger.terms.period.value} period from {ledger.epoch}"
    if not passed:
        return "False", "BelowThresholds", f"{share} {period}"
    top = passed[-1]
    reason = "Block" if top.blocks else top.action.value.capitalize()
    return "True", reason, f"{share} {period} (threshold {top.percent}%: {top.action.value})"


def conflicted_condition(verdict: Verdict) -> tuple[str, str, str]:
    """(status, reason, message) of a RoutingPolicy's Conflicted condition (spec.sidecar)."""
    if verdict.conflict:
        return "True", "SidecarSettings", verdict.conflict
    return "False", "NoConflicts", "no other RoutingPolicy sets spec.sidecar fields differently"


def applied_condition(
    in_config: bool, version: str | None, counts: SidecarCounts
) -> tuple[str, str, str]:
    """(status, reason, message) of the Applied condition."""
    if not in_config or version is None:
        return "False", "NotInConfig", "not part of the namespace's compiled config"
    summary = (
        f"{counts.current} of {counts.connected} connected sidecars run version {version}; "
        f"{counts.stale} stale, {counts.rejected} rejected"
    )
    if counts.rejected:
        return "False", "Rejected", f"{summary}; a sidecar said: {counts.rejection}"
    if counts.connected == 0:
        return "Unknown", "NoSidecars", f"no sidecar of the namespace is connected ({version})"
    if counts.stale:
        return "False", "Progressing", summary
    return "True", "AllSidecarsCurrent", summary


class Controller:
    def __init__(
        self,
        kube: KubeClient,
        hub: ConfigHub,
        debounce_seconds: float = 0.2,
        applied_interval_seconds: float = 1.0,
        budgets: BudgetService | None = None,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        self._kube = kube
        self._hub = hub
        self.budgets = budgets or BudgetService()
        self.budgets.persist = self.write_budget_status
        self.budgets.mode_changed = self.schedule
        self.budgets.threshold_passed = self._threshold_passed
        self._metrics = metrics
        self._debounce = debounce_seconds
        self._applied_interval = applied_interval_seconds
        self._objects: dict[ObjectKey, Mapping[str, Any]] = {}
        self._compiled: dict[str, CompiledNamespace] = {}
        self._written: dict[ObjectKey, dict[str, Any]] = {}
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._applied_pending: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._events: set[asyncio.Task[None]] = set()
        #: namespace -> referenced Secret -> its resourceVersion when last read (None: missing).
        self._secret_versions: dict[str, dict[str, str | None]] = {}
        self._secret_resync: asyncio.Task[None] | None = None
        self._kinds = {k.kind: k for k in KINDS}
        #: EndpointSlices of referenced Services, template Deployments, the shared load scrape.
        self.selfhosted = SelfHosted(kube, hub)
        hub.on_change = self.sidecars_changed
        #: With leader election (`ha/`): whether this replica writes (status, Events, model
        #: servers), and whether it keeps the budget books (the leader, once it has read them).
        self.leading: Callable[[], bool] = lambda: True
        self.keeps_budgets: Callable[[], bool] = lambda: True
        #: Sidecars of a namespace against a version: this replica's own, or the fleet's.
        self.sidecar_counts: Callable[[str, str | None], SidecarCounts] = (
            lambda namespace, version: self._hub.counts(namespace)
        )

    # --- what the handlers call ------------------------------------------------------------

    def observe(self, kind: Kind, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata", {})
        key = ObjectKey(kind.kind, str(meta.get("namespace")), str(meta.get("name")))
        if event_type == "DELETED":
            self._objects.pop(key, None)
            self._written.pop(key, None)
            self.schedule(key.namespace)
            return
        before = self._objects.get(key)
        self._objects[key] = body
        if before is None or _relevant(before) != _relevant(body):
            self.schedule(key.namespace)

    def slice_changed(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """An EndpointSlice changed: recompile the namespaces whose endpoints use its Service."""
        service = self.selfhosted.observe_slice(event_type, body)
        if service is None:
            return
        for key, obj in list(self._objects.items()):
            if key.kind == MODEL_ENDPOINT.kind and referenced_service(obj) == service:
                self.schedule(key.namespace)

    def deployment_changed(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A Deployment the operator runs for a template changed: refresh its endpoint's status."""
        owner = self.selfhosted.observe_deployment(event_type, body)
        if owner is not None and ObjectKey(MODEL_ENDPOINT.kind, *owner) in self._objects:
            self.schedule(owner[0])

    def sidecars_changed(self, namespace: str) -> None:
        """Called by the hub on connect, disconnect, ACK and NACK: refresh Applied, throttled."""
        if namespace in self._applied_pending or namespace not in self._compiled:
            return
        loop = asyncio.get_running_loop()
        self._applied_pending[namespace] = loop.create_task(self._applied_later(namespace))

    # --- reconcile -------------------------------------------------------------------------

    def schedule(self, namespace: str) -> None:
        if namespace in self._pending:
            return
        loop = asyncio.get_running_loop()
        self._pending[namespace] = loop.create_task(self._debounced(namespace))

    async def _debounced(self, namespace: str) -> None:
        await asyncio.sleep(self._debounce)
        # Changes that arrive from here on schedule a fresh reconcile.
        self._pending.pop(namespace, None)
        await self.reconcile(namespace)

    async def _applied_later(self, namespace: str) -> None:
        await asyncio.sleep(self._applied_interval)
        self._applied_pending.pop(namespace, None)
        compiled = self._compiled.get(namespace)
        if compiled is not None:
            async with self._lock(namespace):
                await self._write_statuses(compiled)

    def _lock(self, namespace: str) -> asyncio.Lock:
        lock = self._locks.get(namespace)
        if lock is None:
            lock = self._locks[namespace] = asyncio.Lock()
        return lock

    async def _inputs(self, namespace: str) -> NamespaceInputs:
        by_kind: dict[str, list[Resource]] = {k.kind: [] for k in KINDS}
        referenced: set[str] = set()
        for key, body in self._objects.items():
            if key.namespace != namespace:
                continue
            by_kind[key.kind].append(Resource.from_body(body))
            referenced |= secret_names(key.kind, body.get("spec") or {})
        secrets: dict[str, dict[str, str]] = {}
        versions: dict[str, str | None] = {}
        for name in sorted(referenced):
            secret = await self._kube.get_secret(namespace, name)
            versions[name] = _resource_version(secret)
            if secret is not None:
                secrets[name] = decode_secret(secret)
        if versions:
            self._secret_versions[namespace] = versions
        else:
            self._secret_versions.pop(namespace, None)
        self.budgets.sync(
            namespace,
            [
                body
                for key, body in self._objects.items()
                if key.namespace == namespace and key.kind == BUDGET.kind
            ]
            if self.keeps_budgets()
            else [],
        )
        return NamespaceInputs(
            namespace,
            endpoints=by_kind["ModelEndpoint"],
            policies=by_kind["RoutingPolicy"],
            budgets=by_kind["Budget"],
            secrets=secrets,
            slices=self.selfhosted.slices_for(
                body
                for key, body in self._objects.items()
                if key.namespace == namespace and key.kind == MODEL_ENDPOINT.kind
            ),
            spent=self.budgets.spent(namespace),
        )

    async def reconcile(self, namespace: str) -> CompiledNamespace | None:
        started = time.perf_counter()
        compiled = await self._reconcile(namespace)
        if self._metrics is not None:
            self._metrics.reconciles.labels("ok" if compiled is not None else "error").inc()
            self._metrics.reconcile_duration.observe(time.perf_counter() - started)
        return compiled

    async def _reconcile(self, namespace: str) -> CompiledNamespace | None:
        async with self._lock(namespace):
            try:
                inputs = await self._inputs(namespace)
            except (KubeError, OSError, TimeoutError) as exc:
                log.error("reading Secrets of %s failed, retrying: %s", namespace, exc)
                self._retry_later(namespace)
                return None
            compiled = compile_namespace(inputs)
            config = compiled.config
            if self._hub.publish(
                namespace, compiled.version, wire_config(config) if config is not None else None
            ):
                log.info(
                    "namespace %s: config version %s published",
                    namespace,
                    compiled.version,
                    extra={"namespace": namespace, "version": compiled.version},
                )
            self._compiled[namespace] = compiled
            self.selfhosted.published(namespace, config)
            try:
                if self.leading():
                    await self.selfhosted.ensure_workloads(
                        namespace,
                        [
                            body
                            for key, body in self._objects.items()
                            if key.namespace == namespace and key.kind == MODEL_ENDPOINT.kind
                        ],
                    )
            except (KubeError, OSError, TimeoutError):
                self._retry_later(namespace)
            if not inputs.endpoints and not inputs.policies and not inputs.budgets:
                self._compiled.pop(namespace, None)
            await self._write_statuses(compiled)
            return compiled

    # --- referenced Secrets, read again instead of watched ----------------------------------

    async def resync_secrets(self) -> list[str]:
        """Read every referenced Secret again; reconcile the namespaces where one changed.

        Returns those namespaces. A read that fails is logged and tried on the next pass.
        """
        changed: list[str] = []
        for namespace, versions in list(self._secret_versions.items()):
            for name, known in list(versions.items()):
                try:
                    current = _resource_version(await self._kube.get_secret(namespace, name))
                except (KubeError, OSError, TimeoutError) as exc:
                    log.warning(
                        "re-reading Secret %s/%s failed, trying again next resync: %s",
                        namespace,
                        name,
                        exc,
                    )
                    continue
                if current != known:
                    log.info(
                        "Secret %s/%s %s: recompiling the namespace",
                        namespace,
                        name,
                        "deleted" if current is None else "changed",
                        extra={"namespace": namespace},
                    )
                    changed.append(namespace)
                    self.schedule(namespace)
                    break
        return changed

    def start_secret_resync(self, interval_seconds: float) -> None:
        """Run `resync_secrets` every `interval_seconds` until `close`."""

        async def every_interval() -> None:
            while True:
                await asyncio.sleep(interval_seconds)
                await self.resync_secrets()

        self._secret_resync = asyncio.get_running_loop().create_task(every_interval())

    def _retry_later(self, namespace: str) -> None:
        async def later() -> None:
            await asyncio.sleep(5.0)
            self.schedule(namespace)

        asyncio.get_running_loop().create_task(later())

    # --- status ----------------------------------------------------------------------------

    def _status_for(self, key: ObjectKey, compiled: CompiledNamespace) -> dict[str, Any] | None:
        verdict = compiled.verdicts.get((key.kind, key.name))
        body = self._objects.get(key)
        if verdict is None or body is None:
            return None
        if key.kind == BUDGET.kind and not self.keeps_budgets():
            return None  # the leader writes it once it has read the books
        old_conditions = {
            c.get("type"): c for c in (body.get("status") or {}).get("conditions") or []
        }
        counts = self.sidecar_counts(key.namespace, compiled.version)
        ready = (
            "True" if verdict.ready else "False",
            verdict.reason,
            verdict.message or ("compiled" if verdict.ready else ""),
        )
        conditions = [self._condition(READY, *ready, verdict.generation, old_conditions)]
        ledger = self.budgets.ledger(key.namespace, key.name) if key.kind == "Budget" else None
        if ledger is not None:
            conditions.append(
                self._condition(
                    THRESHOLD_REACHED,
                    *threshold_condition(ledger),
                    verdict.generation,
                    old_conditions,
                )
            )
        if key.kind != "Budget":
            applied = applied_condition(verdict.in_config, compiled.version, counts)
            conditions.append(
                self._condition(APPLIED, *applied, verdict.generation, old_conditions)
            )
        if key.kind == ROUTING_POLICY.kind:
            conditions.append(
                self._condition(
                    CONFLICTED, *conflicted_condition(verdict), verdict.generation, old_conditions
                )
            )
        status: dict[str, Any] = {
            "observedGeneration": verdict.generation,
            "conditions": conditions,
        }
        status.update(verdict.status)
        if key.kind == MODEL_ENDPOINT.kind:
            served = self.selfhosted.workload_status(key.namespace, body)
            if served is not None:
                status["workload"] = served
        if ledger is not None:
            status.update(ledger.status())
        if key.kind != "Budget":
            status["configVersion"] = compiled.version if verdict.in_config else None
            status["sidecars"] = {
                "connected": counts.connected,
                "current": counts.current,
                "stale": counts.stale,
                "rejected": counts.rejected,
            }
        return status

    @staticmethod
    def _condition(
        type_: str,
        status: str,
        reason: str,
        message: str,
        generation: int,
        old: Mapping[Any, Mapping[str, Any]],
    ) -> dict[str, Any]:
        before = old.get(type_) or {}
        changed = before.get("status") != status
        return {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
            "lastTransitionTime": _now() if changed else before.get("lastTransitionTime", _now()),
        }

    async def _write_statuses(self, compiled: CompiledNamespace) -> None:
        keys = [k for k in self._objects if k.namespace == compiled.namespace]
        for key in sorted(keys, key=lambda k: (k.kind, k.name)):
            if not self.leading():
                return  # followers compile and serve, but only the leader writes
            status = self._status_for(key, compiled)
            if status is None:
                continue
            comparable = _without_times(status)
            if self._written.get(key) == comparable:
                continue
            previous = self._written.get(key) or self._objects[key].get("status")
            try:
                await self._patch_status(key, status)
            except (KubeError, OSError, TimeoutError) as exc:
                if not isinstance(exc, KubeError) or exc.status != 404:
                    log.error("status of %s %s/%s: %s", key.kind, key.namespace, key.name, exc)
                    if self._metrics is not None:
                        self._metrics.status_errors.labels(key.kind).inc()
                    self._retry_later(compiled.namespace)
                continue
            self._written[key] = comparable
            await self._ready_event(key, status, previous)

    async def _patch_status(self, key: ObjectKey, status: Mapping[str, Any]) -> None:
        """Write one object's status.

        A Budget's status (the books) is written at the resourceVersion this replica last saw,
        so a write that reaches the apiserver only after this replica's term ended cannot
        overwrite what a newer leader wrote (409). While it still keeps the books, a 409 (a spec
        edit, a lagging watch) means: read the object again and write once more.
        """
        kind = self._kinds[key.kind]
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{key.namespace}/{kind.plural}/{key.name}"
        for attempt in range(2):
            body = self._objects.get(key) or {}
            version = (body.get("metadata") or {}).get("resourceVersion")
            fenced = key.kind == BUDGET.kind and isinstance(version, str)
            try:
                stored = await self._kube.patch_status(
                    GROUP,
                    VERSION,
                    kind.plural,
                    key.namespace,
                    key.name,
                    status,
                    resource_version=version if fenced else None,
                )
            except KubeError as exc:
                if not fenced or exc.status != 409 or attempt or not self.keeps_budgets():
                    raise
                fresh = await self._kube.request("GET", path)
                if key in self._objects:
                    self._objects[key] = fresh
                continue
            if fenced and isinstance(stored, Mapping) and key in self._objects:
                self._objects[key] = stored
            return

    async def write_budget_status(self, namespace: str, name: str) -> None:
        """Write one Budget's status now; raises when the API server did not take it.

        The budget books call this before they send a spend lease (write-ahead).
        """
        key = ObjectKey(BUDGET.kind, namespace, name)
        async with self._lock(namespace):
            if not self.keeps_budgets() or not self.leading():
                raise KubeError(409, "this operator replica does not keep the budget books")
            compiled = self._compiled.get(namespace)
            status = self._status_for(key, compiled) if compiled is not None else None
            if status is None:
                raise KubeError(409, f"Budget {namespace}/{name} is not reconciled yet")
            comparable = _without_times(status)
            if self._written.get(key) == comparable:
                return
            previous = self._written.get(key) or self._objects[key].get("status")
            await self._patch_status(key, status)
            if not self.keeps_budgets():
                # The lease ran out while writing: a new leader may already have read the books,
                # so the grant this write was for must not be sent (docs/operator.md).
                raise KubeError(409, "lost the leader lease while writing the budget books")
            self._written[key] = comparable
            await self._ready_event(key, status, previous)

    def _threshold_passed(
        self, namespace: str, name: str, threshold: Threshold, ledger: BudgetLedger
    ) -> None:
        body = self._objects.get(ObjectKey(BUDGET.kind, namespace, name))
        if body is None or not self.leading():
            return
        involved = {
            "apiVersion": API_VERSION,
            "kind": BUDGET.kind,
            "namespace": namespace,
            "name": name,
            "uid": str(body.get("metadata", {}).get("uid", "")),
        }
        _, _, message = threshold_condition(ledger)
        message = f"Budget {name!r}: {message}"

        async def post() -> None:
            try:
                await self._kube.post_event(involved, "Warning", "BudgetThresholdReached", message)
            except (KubeError, OSError, TimeoutError) as exc:
                log.warning("event for Budget %s/%s: %s", namespace, name, exc)

        task = asyncio.get_running_loop().create_task(post())
        self._events.add(task)
        task.add_done_callback(self._events.discard)

    async def _ready_event(
        self, key: ObjectKey, status: Mapping[str, Any], previous: Mapping[str, Any] | None
    ) -> None:
        ready = status["conditions"][0]
        conditions = (previous or {}).get("conditions") or []
        before = next((c for c in conditions if c.get("type") == READY), None)
        if before is not None and all(before.get(f) == ready[f] for f in _READY_FIELDS):
            return
        body = self._objects.get(key)
        if body is None or (before is None and ready["status"] == "True") or not self.leading():
            return
        meta = body.get("metadata", {})
        involved = {
            "apiVersion": API_VERSION,
            "kind": key.kind,
            "namespace": key.namespace,
            "name": key.name,
            "uid": str(meta.get("uid", "")),
        }
        type_ = "Normal" if ready["status"] == "True" else "Warning"
        try:
            await self._kube.post_event(
                involved, type_, ready["reason"], ready["message"] or ready["reason"]
            )
        except KubeError as exc:
            log.warning("event for %s %s/%s: %s", key.kind, key.namespace, key.name, exc)

    # --- leadership (ha/replica.py calls these) --------------------------------------------

    async def take_over(self) -> None:
        """This replica became the leader: read the Budgets afresh from the apiserver (never
        from the watch, which may lag a write of the old leader), start their books from that,
        and write every object's status anew."""
        fresh: dict[ObjectKey, Mapping[str, Any] | None] = {}
        for key in [k for k in self._objects if k.kind == BUDGET.kind]:
            path = f"/apis/{GROUP}/{VERSION}/namespaces/{key.namespace}/{BUDGET.plural}/{key.name}"
            try:
                fresh[key] = await self._kube.request("GET", path)
            except KubeError as exc:
                if exc.status != 404:
                    raise
                fresh[key] = None
        for key, body in fresh.items():
            if body is None:
                self._objects.pop(key, None)
            elif key in self._objects:
                self._objects[key] = body
        namespaces = sorted({k.namespace for k in self._objects})
        for namespace in namespaces:
            budgets = [
                body
                for key, body in self._objects.items()
                if key.namespace == namespace and key.kind == BUDGET.kind
            ]
            self.budgets.sync(namespace, [])  # books from before (a past term) are stale
            self.budgets.sync(namespace, budgets)
        self._written.clear()
        for namespace in namespaces:
            self.schedule(namespace)

    def stand_down(self) -> None:
        """Another replica leads: drop the budget books (only the leader keeps them)."""
        for namespace in sorted({k.namespace for k in self._objects}):
            self.budgets.sync(namespace, [])
        self._written.clear()

    async def close(self) -> None:
        await self.selfhosted.close()
        tasks = [*self._pending.values(), *self._applied_pending.values(), *self._events]
        if self._secret_resync is not None:
            tasks.append(self._secret_resync)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _resource_version(secret: Mapping[str, Any] | None) -> str | None:
    """What tells a Secret changed without comparing its data (None: it does not exist)."""
    if secret is None:
        return None
    return str((secret.get("metadata") or {}).get("resourceVersion", ""))


def _without_times(status: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(status)
    out["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status["conditions"]
    ]
    return out
