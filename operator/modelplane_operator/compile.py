"""Compile one namespace's custom resources into the sidecar's RouterConfig: a pure function.

Input: the namespace's ModelEndpoints, RoutingPolicies and Budgets as the API server returns them,
plus the decoded data of the Secrets they reference. Output: one RouterConfig snapshot (or none,
when nothing in the namespace routes anywhere), its content-hash version, and a verdict per object
(Ready or not, with a reason and a precise message) that the handlers write into status. Errors
are contained: an invalid object, a missing reference or an unsatisfiable rule marks that object
(and drops the broken part), never the rest of the namespace's config.

Fields the CRDs offer but the RouterConfig of this sidecar version cannot express yet are not
dropped silently: each one is named in the owning object's Ready message (see `_unsupported`).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr, ValidationError

from modelplane_sidecar import config as rc

from . import sidecar_settings
from .budget.ledger import Terms, mode_for, reached
from .budget.period import PeriodError, zone
from .crd_models import (
    BUDGET,
    MODEL_ENDPOINT,
    ROUTING_POLICY,
    BudgetAction,
    BudgetSpec,
    CacheSettings,
    ModelEndpointSpec,
    ModelRoute,
    Route,
    RoutingPolicySpec,
    Rule,
    SecretKeyRef,
    ServiceRef,
    SidecarSettings,
    Target,
)
from .selfhosted import discovery, workload

#: Reasons written into the Ready condition.
COMPILED = "Compiled"
INVALID_SPEC = "InvalidSpec"
UNSUPPORTED_PROVIDER = "UnsupportedProvider"
SECRET_NOT_FOUND = "SecretNotFound"
SECRET_KEY_NOT_FOUND = "SecretKeyNotFound"
ENDPOINT_INVALID = "EndpointInvalid"
INVALID_REFERENCES = "InvalidReferences"
NOTHING_ROUTABLE = "NothingRoutable"
COMPILE_ERROR = "CompileError"
#: A policy whose only problem is spec.sidecar settings an older policy sets differently.
SETTINGS_CONFLICT = "SettingsConflict"


@dataclass(frozen=True)
class Resource:
    """The parts of one custom resource the compiler reads."""

    name: str
    spec: Mapping[str, Any]
    generation: int = 1
    #: RFC 3339; older objects win conflicts (ties broken by name).
    created: str = ""
    status: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Resource:
        meta = body.get("metadata", {})
        return cls(
            name=str(meta["name"]),
            spec=body.get("spec") or {},
            generation=int(meta.get("generation") or 1),
            created=str(meta.get("creationTimestamp") or ""),
            status=body.get("status") or {},
        )


def decode_secret(body: Mapping[str, Any]) -> dict[str, str]:
    """A core/v1 Secret's `data` (base64) and `stringData`, decoded; undecodable keys skipped."""
    out: dict[str, str] = {}
    for key, value in (body.get("data") or {}).items():
        try:
            out[key] = base64.b64decode(value, validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            continue
    for key, value in (body.get("stringData") or {}).items():
        out[key] = str(value)
    return out


@dataclass(frozen=True)
class NamespaceInputs:
    namespace: str
    endpoints: Sequence[Resource] = ()
    policies: Sequence[Resource] = ()
    budgets: Sequence[Resource] = ()
    #: Secret name -> key -> decoded value, for the Secrets the endpoints reference.
    secrets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: Budget name -> settled spend this period from the operator's books (else: its status).
    spent: Mapping[str, float] = field(default_factory=dict)
    #: (namespace, Service) -> its EndpointSlices, for the Services the endpoints reference.
    slices: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]] = field(default_factory=dict)


@dataclass
class Verdict:
    """The outcome for one object: what its Ready condition says."""

    ready: bool
    reason: str
    message: str
    generation: int
    #: Whether the object contributes to the namespace's compiled config.
    in_config: bool = False
    #: Kind-specific status fields (a ModelEndpoint's `replicas`).
    status: dict[str, Any] = field(default_factory=dict)
    #: RoutingPolicy: spec.sidecar fields another policy sets differently (its Conflicted
    #: condition); "" when there are none.
    conflict: str = ""


@dataclass(frozen=True)
class CompiledBudget:
    """A validated Budget: its terms for the ledger and what the sidecars get of it."""

    name: str
    spec: BudgetSpec
    #: RouterConfig endpoint names the budget counts; empty means every endpoint.
    endpoints: tuple[str, ...]
    #: Settled spend in the current period (None: nothing measured yet).
    spent_usd: float | None = None
    #: Whether any endpoint at all is in its scope (a scope matching nothing counts nothing).
    scoped: bool = False

    @property
    def terms(self) -> Terms:
        return Terms.from_spec(self.spec)

    def reached_actions(self) -> list[BudgetAction]:
        """Actions of the thresholds the spend has passed."""
        return [t.action for t in reached(self.terms, self.spent_usd or 0.0)]

    def mode(self) -> tuple[rc.BudgetMode, rc.Tier | None]:
        return mode_for(self.terms, self.spent_usd or 0.0)


@dataclass(frozen=True)
class CompiledNamespace:
    namespace: str
    config: rc.RouterConfig | None
    #: (kind, name) -> verdict, for every object given to the compiler.
    verdicts: Mapping[tuple[str, str], Verdict]
    budgets: tuple[CompiledBudget, ...] = ()

    @property
    def version(self) -> str | None:
        return self.config.version() if self.config is not None else None

    def verdict(self, kind: str, name: str) -> Verdict:
        return self.verdicts[(kind, name)]


def wire_config(config: rc.RouterConfig) -> dict[str, Any]:
    """The config as JSON-ready data with credential values revealed, for the config stream.

    Credentials are SecretStr in the model (masked in every dump); the sidecar needs them in
    clear: every endpoint's key and the cache's Redis password.
    """
    data: dict[str, Any] = config.model_dump(mode="json", by_alias=True, exclude_none=True)
    for ep, raw in zip(config.endpoints, data["endpoints"], strict=True):
        if ep.api_key is not None and ep.api_key.value is not None:
            raw["apiKey"]["value"] = ep.api_key.value.get_secret_value()
    redis = config.cache.redis
    if redis is not None and redis.password is not None and redis.password.value is not None:
        data["cache"]["redis"]["password"]["value"] = redis.password.value.get_secret_value()
    return data


def secret_names(kind: str, spec: Mapping[str, Any]) -> set[str]:
    """Names of the Secrets an object's spec references (what the controller reads for it)."""
    refs: list[Any] = []
    if kind == MODEL_ENDPOINT.kind:
        refs.append((spec.get("credentials") or {}).get("secretRef"))
    elif kind == ROUTING_POLICY.kind:
        cache = (spec.get("sidecar") or {}).get("cache") or {}
        refs.append((cache.get("redis") or {}).get("passwordSecretRef"))
    return {r["name"] for r in refs if isinstance(r, dict) and isinstance(r.get("name"), str)}


def _spec_error(kind: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        parts.append(f"spec.{where}: {err['msg']}")
    return f"invalid {kind} spec: " + "; ".join(parts)


def _join(items: Sequence[str]) -> str:
    return ", ".join(items)


# --- ModelEndpoint ---------------------------------------------------------------------------


@dataclass
class _Endpoint:
    resource: Resource
    spec: ModelEndpointSpec | None
    compiled: rc.Endpoint | None
    verdict: Verdict

    @property
    def tags(self) -> frozenset[str]:
        return frozenset(self.compiled.tags) if self.compiled is not None else frozenset()


def _service_ref(name: str, spec: ModelEndpointSpec) -> ServiceRef | None:
    """The Service the endpoint routes to: its serviceRef, or the one its template creates."""
    if spec.template is not None:
        return workload.template_service_ref(name, spec.template)
    return spec.service_ref


def _base_url(spec: ModelEndpointSpec, ref: ServiceRef | None, namespace: str) -> str:
    if spec.base_url is not None:
        return spec.base_url
    assert ref is not None
    host = f"{ref.name}.{ref.namespace or namespace}.svc"
    return f"{ref.scheme}://{host}:{ref.port}{ref.path.rstrip('/')}"


def _self_hosted(
    spec: ModelEndpointSpec, ref: ServiceRef | None, inputs: NamespaceInputs
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(rc.Endpoint fields, status fields) for a Service-backed endpoint: the ready addresses
    of its EndpointSlices as replicas, its engine, and metrics read once by the operator."""
    if ref is None:
        return {}, {}
    slices = inputs.slices.get(discovery.service_key(ref, inputs.namespace), ())
    replicas = discovery.replicas(ref, slices)
    source = rc.LoadSource.PUSH if ref.engine is not None else rc.LoadSource.OFF
    metrics = spec.load_metrics
    load = rc.LoadMetrics(source=source)
    if metrics is not None:
        load = rc.LoadMetrics(
            source=source,
            path=metrics.path,
            scrape_interval_seconds=metrics.scrape_interval_seconds,
            max_age_seconds=metrics.max_age_seconds,
        )
    fields: dict[str, Any] = {"engine": ref.engine, "replicas": replicas, "load_metrics": load}
    ready = sum(1 for r in replicas if r.ready)
    return fields, {"replicas": {"ready": ready, "total": len(replicas)}}


def _secret_value(
    ref: SecretKeyRef, field_path: str, inputs: NamespaceInputs
) -> rc.ApiKeySource | tuple[str, str]:
    """The referenced Secret value as a credential, or (reason, message) naming what is missing.

    Messages name the Secret and key, never a value.
    """
    secret = inputs.secrets.get(ref.name)
    if secret is None:
        return (
            SECRET_NOT_FOUND,
            f"Secret {ref.name!r} ({field_path}) not found in namespace {inputs.namespace!r}",
        )
    if ref.key not in secret:
        keys = _join(sorted(secret)) or "none"
        return SECRET_KEY_NOT_FOUND, f"Secret {ref.name!r} has no key {ref.key!r} (keys: {keys})"
    value = secret[ref.key].strip()
    if not value:
        return SECRET_KEY_NOT_FOUND, f"Secret {ref.name!r} key {ref.key!r} is empty"
    return rc.ApiKeySource(value=SecretStr(value))


def _compile_endpoint(res: Resource, inputs: NamespaceInputs) -> _Endpoint:
    def fail(reason: str, message: str, spec: ModelEndpointSpec | None = None) -> _Endpoint:
        return _Endpoint(res, spec, None, Verdict(False, reason, message, res.generation))

    try:
        spec = ModelEndpointSpec.model_validate(res.spec)
    except ValidationError as exc:
        return fail(INVALID_SPEC, _spec_error(MODEL_ENDPOINT.kind, exc))
    given = [spec.base_url, spec.service_ref, spec.template]
    if sum(x is not None for x in given) != 1:
        return fail(
            INVALID_SPEC,
            "exactly one of spec.baseURL, spec.serviceRef or spec.template must be set",
            spec,
        )
    service_ref = _service_ref(res.name, spec)
    self_hosted, status = _self_hosted(spec, service_ref, inputs)
    supported = {p.value for p in rc.Provider}
    if spec.provider.value not in supported:
        return fail(
            UNSUPPORTED_PROVIDER,
            f"provider {spec.provider.value!r} is not supported by this sidecar version "
            f"(supported: {_join(sorted(supported))})",
            spec,
        )
    api_key: rc.ApiKeySource | None = None
    if spec.credentials is not None:
        found = _secret_value(spec.credentials.secret_ref, "spec.credentials.secretRef", inputs)
        if isinstance(found, tuple):
            return fail(found[0], found[1], spec)
        api_key = found
    tags = list(spec.compliance)
    if spec.residency is not None:
        tags.append(f"residency:{spec.residency}")
    limits = rc.EndpointLimits()
    if spec.limits is not None:
        limits = rc.EndpointLimits(
            requests_per_minute=spec.limits.requests_per_minute,
            tokens_per_minute=spec.limits.tokens_per_minute,
            max_concurrency=spec.limits.max_concurrency,
        )
    # Without spec.pricing the sidecar's built-in price table prices well-known models.
    pricing: dict[str, Any] = {}
    if "pricing" in res.spec:
        pricing["pricing"] = rc.Pricing(
            input_per_mtok=spec.pricing.input_per_m_tok,
            output_per_mtok=spec.pricing.output_per_m_tok,
            cached_input_per_mtok=spec.pricing.cached_input_per_m_tok,
        )
    try:
        compiled = rc.Endpoint(
            name=res.name,
            provider=rc.Provider(spec.provider.value),
            base_url=_base_url(spec, service_ref, inputs.namespace),
            model=spec.model,
            api_key=api_key,
            timeouts=rc.Timeouts(
                connect_seconds=spec.timeouts.connect_seconds,
                request_seconds=spec.timeouts.request_seconds,
                stream_idle_seconds=spec.timeouts.stream_idle_seconds,
            ),
            region=spec.region,
            tags=tuple(dict.fromkeys(tags)),
            context_window=spec.context_window,
            headers=dict(spec.headers),
            options=dict(spec.options),
            limits=limits,
            **pricing,
            **self_hosted,
        )
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'endpoint'}: {e['msg']}" for e in exc.errors()
        )
        return fail(ENDPOINT_INVALID, f"the sidecar would reject this endpoint: {detail}", spec)
    verdict = Verdict(True, COMPILED, "", res.generation, status=status)
    if service_ref is not None:
        counts = status["replicas"]
        verdict.message = (
            f"Service {service_ref.namespace or inputs.namespace}/{service_ref.name}: "
            f"{counts['ready']} of {counts['total']} replicas ready"
        )
    return _Endpoint(res, spec, compiled, verdict)


# --- RoutingPolicy ---------------------------------------------------------------------------


@dataclass
class _PolicyResult:
    aliases: list[rc.ModelAlias]
    rules: list[rc.Rule]
    #: Endpoints its aliases and rules route to (what its budgets count).
    used_endpoints: set[str]
    errors: list[str]
    notes: list[str]


@dataclass
class _Namespace:
    """What the policies of a namespace claim, in age order (older wins)."""

    endpoints: Mapping[str, _Endpoint]
    sensitivity: rc.SensitivityPolicy
    aliases: dict[str, str] = field(default_factory=dict)
    rules: dict[str, str] = field(default_factory=dict)
    #: Entries each sidecar's response cache keeps (the largest of the caching policies).
    cache_entries: int = 0


def _usable(
    where: str,
    targets: Sequence[Target],
    ns: _Namespace,
    errors: list[str],
    none_left: str = "no usable target, so no endpoint can serve it",
) -> list[Target]:
    """The targets whose endpoint is ready; a message in `errors` for every other one."""
    usable: list[Target] = []
    for target in targets:
        ep = ns.endpoints.get(target.endpoint)
        if ep is None:
            errors.append(f"{where}: ModelEndpoint {target.endpoint!r} not found")
        elif ep.compiled is None:
            errors.append(
                f"{where}: ModelEndpoint {target.endpoint!r} is not ready ({ep.verdict.reason})"
            )
        elif target.endpoint not in {t.endpoint for t in usable}:
            usable.append(target)
    if not usable:
        errors.append(f"{where}: {none_left}")
    return usable


def _rc_targets(targets: Sequence[Target]) -> tuple[rc.Target, ...]:
    return tuple(
        rc.Target(
            endpoint=t.endpoint,
            weight=1 if t.weight is None else t.weight,
            tier=t.tier,
            arm=t.arm,
        )
        for t in targets
    )


def _rc_options(route: Route) -> rc.StrategyOptions:
    if route.options is None:
        return rc.StrategyOptions()
    return rc.StrategyOptions.model_validate(
        route.options.model_dump(mode="json", by_alias=True, exclude_none=True)
    )


def _validation_detail(exc: ValidationError) -> str:
    return "; ".join(
        (".".join(str(p) for p in e["loc"]) + ": " if e["loc"] else "") + str(e["msg"])
        for e in exc.errors()
    )


def _rc_overflow(
    where: str, route: Route, targets: Sequence[Target], ns: _Namespace, errors: list[str]
) -> rc.Overflow | None:
    """The route's overflow with its usable targets; None (and a message) when it has none."""
    spec = route.overflow
    if spec is None:
        return None
    where = f"{where} overflow"
    primary = {t.endpoint for t in targets}
    for target in spec.targets:
        if target.endpoint in primary:
            errors.append(f"{where}: {target.endpoint!r} is already a target of the route")
    others = [t for t in spec.targets if t.endpoint not in primary]
    known = {c.name for c in ns.sensitivity.classes}
    unknown = [c for c in spec.never_spill or () if c not in known]
    if unknown:
        errors.append(
            f"{where}: neverSpill names {_join(unknown)}, not a data class of the namespace "
            f"(classes: {_join(sorted(known))}); overflow dropped"
        )
        return None
    usable = _usable(where, others, ns, errors, "no usable target; overflow dropped")
    if not usable:
        return None
    try:
        return rc.Overflow(
            targets=_rc_targets(usable),
            max_queue_depth=spec.max_queue_depth,
            max_predicted_wait_seconds=spec.max_predicted_wait_seconds,
            never_spill=tuple(spec.never_spill) if spec.never_spill is not None else None,
            sensitive_wait_seconds=spec.sensitive_wait_seconds,
        )
    except ValidationError as exc:
        errors.append(f"{where}: the sidecar would reject it: {_validation_detail(exc)}")
        return None


def _overflow_endpoints(aliases: Sequence[rc.ModelAlias], rules: Sequence[rc.Rule]) -> set[str]:
    routes = [*(a.overflow for a in aliases), *(r.overflow for r in rules)]
    return {t.endpoint for o in routes if o is not None for t in o.targets}


def _alias(
    route: ModelRoute,
    targets: Sequence[Target],
    spec: RoutingPolicySpec,
    overflow: rc.Overflow | None = None,
) -> rc.ModelAlias:
    return rc.ModelAlias(
        name=route.name,
        overflow=overflow,
        cache=_rc_cache(spec.cache),
        lane=route.lane,
        description=route.description,
        strategy=route.strategy,
        targets=_rc_targets(targets),
        options=_rc_options(route),
        retry=rc.RetryPolicy(
            max_attempts=spec.retry.max_attempts,
            backoff_base_seconds=spec.retry.backoff_base_seconds,
            backoff_max_seconds=spec.retry.backoff_max_seconds,
            max_retry_after_seconds=spec.retry.max_retry_after_seconds,
            retry_on=tuple(spec.retry.retry_on),
        ),
        timeout=rc.TimeoutPolicy(
            attempt_seconds=spec.timeout.attempt_seconds,
            total_seconds=spec.timeout.total_seconds,
        ),
        circuit_breaker=rc.CircuitBreakerPolicy(
            enabled=spec.circuit_breaker.enabled,
            failure_threshold=spec.circuit_breaker.failure_threshold,
            open_seconds=spec.circuit_breaker.open_seconds,
            half_open_successes=spec.circuit_breaker.half_open_successes,
        ),
    )


def _rc_cache(settings: CacheSettings) -> rc.CachePolicy:
    return rc.CachePolicy(
        enabled=settings.enabled,
        ttl_seconds=settings.ttl_seconds,
        deterministic_only=settings.deterministic_only,
        stale_on_error=settings.stale_on_error,
        stale_seconds=settings.stale_seconds,
        max_entry_bytes=settings.max_entry_bytes,
        coalesce=settings.coalesce,
        coalesce_max_waiters=settings.coalesce_max_waiters,
    )


def _satisfiable(
    where: str, rule: Rule, targets: list[Target], ns: _Namespace, errors: list[str]
) -> list[Target]:
    """Narrow the targets to those that can serve what the rule matches; error when none can."""
    names = [t.endpoint for t in targets]
    for class_name in rule.match.data_classes:
        data_class = ns.sensitivity.data_class(class_name)
        if data_class is None or not data_class.allowed_tags:
            continue
        allowed = set(data_class.allowed_tags)
        if not any(allowed & ns.endpoints[t.endpoint].tags for t in targets):
            errors.append(
                f"{where}: no endpoint can satisfy it: data class {class_name!r} may only go to "
                f"endpoints tagged {_join(sorted(allowed))}, and none of {_join(names)} is"
            )
            return []
    tokens = rule.match.tokens
    if tokens is not None and tokens.min > 0:
        fitting = []
        for t in targets:
            compiled = ns.endpoints[t.endpoint].compiled
            window = compiled.context_window if compiled is not None else None
            if window is None or window >= tokens.min:
                fitting.append(t)
        if not fitting:
            errors.append(
                f"{where}: no endpoint can satisfy it: requests of at least {tokens.min} tokens "
                f"exceed the context window of every target ({_join(names)})"
            )
            return []
        targets = fitting
    return targets


def _compile_rule(
    rule: Rule,
    own_aliases: list[str],
    ns: _Namespace,
    policy: str,
    errors: list[str],
) -> rc.Rule | None:
    where = f"rule {rule.name!r}"
    owner = ns.rules.get(rule.name)
    if owner is not None:
        errors.append(f"{where} is already defined by RoutingPolicy {owner!r} (older wins)")
        return None
    unknown = [m for m in rule.match.models if m not in own_aliases]
    if unknown:
        errors.append(
            f"{where}: match.models names {_join(unknown)}, not a model of this policy "
            f"(models: {_join(own_aliases) or 'none usable'})"
        )
        return None
    known_classes = {c.name for c in ns.sensitivity.classes}
    unknown = [c for c in rule.match.data_classes if c not in known_classes]
    if unknown:
        errors.append(
            f"{where}: match.dataClasses names {_join(unknown)}, not a data class of the "
            f"namespace (classes: {_join(sorted(known_classes))})"
        )
        return None
    targets = _usable(where, rule.targets, ns, errors)
    if targets:
        targets = _satisfiable(where, rule, targets, ns, errors)
    if not targets or not own_aliases:
        return None
    match = rule.match.model_dump(mode="json", by_alias=True, exclude_none=True)
    # A policy's rules route only its own models, never another policy's.
    match["models"] = list(rule.match.models) or list(own_aliases)
    try:
        compiled = rc.Rule(
            name=rule.name,
            description=rule.description,
            match=rc.RuleMatch.model_validate(match),
            strategy=rule.strategy,
            targets=_rc_targets(targets),
            options=_rc_options(rule),
            overflow=_rc_overflow(where, rule, targets, ns, errors),
            lane=rule.lane,
        )
    except ValidationError as exc:
        errors.append(f"{where}: the sidecar would reject it: {_validation_detail(exc)}")
        return None
    ns.rules[rule.name] = policy
    return compiled


def _compile_policy(spec: RoutingPolicySpec, ns: _Namespace, policy: str) -> _PolicyResult:
    errors: list[str] = []
    notes: list[str] = []
    aliases: list[rc.ModelAlias] = []
    for route in spec.models:
        where = f"model {route.name!r}"
        owner = ns.aliases.get(route.name)
        if owner is not None:
            errors.append(f"{where} is already defined by RoutingPolicy {owner!r} (older wins)")
            continue
        targets = _usable(where, route.targets, ns, errors)
        if not targets:
            continue
        try:
            alias = _alias(route, targets, spec, _rc_overflow(where, route, targets, ns, errors))
        except ValidationError as exc:
            errors.append(f"{where}: the sidecar would reject it: {_validation_detail(exc)}")
            continue
        ns.aliases[route.name] = policy
        aliases.append(alias)
    own = [a.name for a in aliases]
    rules = []
    for rule in spec.rules:
        compiled = _compile_rule(rule, own, ns, policy, errors)
        if compiled is not None:
            rules.append(compiled)
    if spec.default is not None:
        _usable("default", spec.default.targets, ns, errors)
        notes.append("default route")
    if spec.cache.enabled:
        ns.cache_entries = max(ns.cache_entries, spec.cache.max_entries)
    if spec.pod_selector.match_labels or spec.pod_selector.match_expressions:
        notes.append("podSelector (every sidecar in the namespace gets this policy)")
    used = {t.endpoint for a in aliases for t in a.route_targets()}
    used |= {t.endpoint for r in rules for t in r.targets}
    used |= _overflow_endpoints(aliases, rules)
    return _PolicyResult(aliases, rules, used, errors, notes)


def _sensitivity(
    policies: Sequence[tuple[Resource, RoutingPolicySpec]],
    errors: dict[str, list[str]],
) -> rc.SensitivityPolicy:
    """The namespace's data classes: from the oldest policy that sets them, else the default."""
    chosen: str | None = None
    result = rc.SensitivityPolicy()
    for res, spec in policies:
        if spec.sensitivity is None:
            continue
        if chosen is not None:
            errors[res.name].append(
                f"spec.sensitivity is already set by RoutingPolicy {chosen!r} (older wins)"
            )
            continue
        raw = spec.sensitivity.model_dump(mode="json", by_alias=True, exclude_none=True)
        try:
            result = rc.SensitivityPolicy.model_validate(raw)
        except ValidationError as exc:
            errors[res.name].append(f"spec.sensitivity: {_validation_detail(exc)}")
            continue
        chosen = res.name
    return result


@dataclass
class _SidecarSettings:
    """spec.sidecar merged over the namespace's policies, and the Redis password it needs."""

    merged: sidecar_settings.Merged
    redis_password: rc.ApiKeySource | None = None

    @property
    def batch_api_endpoint(self) -> str | None:
        name = self.merged.values.get(sidecar_settings.BATCH_API_ENDPOINT)
        return name if isinstance(name, str) else None

    def owns_any(self, policy: str) -> bool:
        return policy in self.merged.owners.values()


def _redis_problem(
    settings: SidecarSettings, inputs: NamespaceInputs
) -> tuple[str | None, rc.ApiKeySource | None]:
    """(what is wrong with the policy's Redis, else None; the password from its Secret)."""
    redis = settings.cache.redis if settings.cache is not None else None
    assert redis is not None
    where = sidecar_settings.field_name(sidecar_settings.REDIS)
    dropped = "this policy's Redis settings are not applied"
    if urlsplit(redis.url).password:
        return (
            f"{where}.url: the Redis password goes in passwordSecretRef, never in the URL; "
            f"{dropped}",
            None,
        )
    try:
        rc.RedisCache(url=redis.url)
    except ValidationError as exc:
        return f"{where}: {_validation_detail(exc)}; {dropped}", None
    if redis.password_secret_ref is None:
        return None, None
    found = _secret_value(redis.password_secret_ref, f"{where}.passwordSecretRef", inputs)
    if isinstance(found, tuple):
        return f"{where}: {found[1]}; {dropped}", None
    return None, found


def _batch_api_problem(name: str, endpoints: Mapping[str, _Endpoint]) -> str | None:
    where = sidecar_settings.field_name(sidecar_settings.BATCH_API_ENDPOINT)
    ep = endpoints.get(name)
    if ep is None:
        return f"{where}: ModelEndpoint {name!r} not found"
    if ep.compiled is None:
        return f"{where}: ModelEndpoint {name!r} is not ready ({ep.verdict.reason})"
    if ep.compiled.provider not in (rc.Provider.OPENAI, rc.Provider.OPENAI_COMPATIBLE):
        return (
            f"{where}: ModelEndpoint {name!r} has provider {ep.compiled.provider.value}; the "
            f"Batch API pass-through needs openai or openai-compatible"
        )
    return None


def _sidecar_settings(
    policies: Sequence[tuple[Resource, RoutingPolicySpec]],
    endpoints: Mapping[str, _Endpoint],
    inputs: NamespaceInputs,
    errors: dict[str, list[str]],
) -> _SidecarSettings:
    """Merge spec.sidecar over the policies (oldest first); a unit with a broken reference (a
    missing password Secret, an unusable Batch API endpoint) is dropped with an error."""
    claims: list[tuple[str, dict[sidecar_settings.Path, Any]]] = []
    passwords: dict[str, rc.ApiKeySource | None] = {}
    for res, spec in policies:
        if spec.sidecar is None:
            continue
        claimed = sidecar_settings.units(spec.sidecar)
        if sidecar_settings.REDIS in claimed:
            problem, passwords[res.name] = _redis_problem(spec.sidecar, inputs)
            if problem is not None:
                errors[res.name].append(problem)
                del claimed[sidecar_settings.REDIS]
        batch_api = claimed.get(sidecar_settings.BATCH_API_ENDPOINT)
        if isinstance(batch_api, str):
            problem = _batch_api_problem(batch_api, endpoints)
            if problem is not None:
                errors[res.name].append(problem)
                del claimed[sidecar_settings.BATCH_API_ENDPOINT]
        claims.append((res.name, claimed))
    merged = sidecar_settings.merge(claims)
    owner = merged.owners.get(sidecar_settings.REDIS)
    return _SidecarSettings(merged, passwords.get(owner) if owner is not None else None)


# --- Budget ----------------------------------------------------------------------------------


def _compile_budget(
    res: Resource,
    endpoints: Mapping[str, _Endpoint],
    policies: Mapping[str, _PolicyResult | None],
    spent: Mapping[str, float],
) -> tuple[Verdict, CompiledBudget | None]:
    try:
        spec = BudgetSpec.model_validate(res.spec)
    except ValidationError as exc:
        return Verdict(False, INVALID_SPEC, _spec_error(BUDGET.kind, exc), res.generation), None
    try:
        zone(spec.timezone)
    except PeriodError as exc:
        return Verdict(False, INVALID_SPEC, f"spec.timezone: {exc}", res.generation), None
    errors = []
    for name in spec.scope.policies:
        if name not in policies:
            errors.append(f"scope.policies: RoutingPolicy {name!r} not found")
    for name in spec.scope.endpoints:
        if name not in endpoints:
            errors.append(f"scope.endpoints: ModelEndpoint {name!r} not found")
    if errors:
        return Verdict(False, INVALID_REFERENCES, "; ".join(errors), res.generation), None
    counted: set[str] = set(spec.scope.endpoints)
    for name in spec.scope.policies:
        result = policies.get(name)
        if result is not None:
            counted.update(result.used_endpoints)
    if spec.scope.tags:
        wanted = set(spec.scope.tags)
        counted.update(name for name, ep in endpoints.items() if wanted & ep.tags)
    scoped = bool(spec.scope.endpoints or spec.scope.policies or spec.scope.tags)
    measured = spent.get(res.name)
    if measured is None:
        from_status = res.status.get("spentUSD")
        measured = float(from_status) if isinstance(from_status, int | float) else None
    compiled = CompiledBudget(
        res.name,
        spec,
        tuple(sorted(counted)) if scoped else (),
        measured,
        scoped,
    )
    terms = compiled.terms
    if terms.enforced:
        message = f"enforced with spend leases up to ${terms.cap:g} per {spec.period.value} period"
    else:
        message = "tracked (no block threshold, so spend is never refused)"
    if scoped and not counted:
        message += "; its scope matches no endpoint"
    return Verdict(True, COMPILED, message, res.generation), compiled


def _spend_budgets(budgets: Sequence[CompiledBudget], used: set[str]) -> tuple[rc.SpendBudget, ...]:
    """What the sidecars get of each budget: scope (shipped endpoints only), enforcement, mode."""
    out = []
    for budget in budgets:
        endpoints = tuple(e for e in budget.endpoints if e in used)
        if budget.scoped and not endpoints:
            continue  # nothing it counts is shipped; an empty list would mean "everything"
        mode, tier = budget.mode()
        out.append(
            rc.SpendBudget(
                name=budget.name,
                endpoints=endpoints,
                enforce=budget.terms.enforced,
                max_output_tokens=budget.spec.max_output_tokens,
                mode=mode,
                tier=tier,
            )
        )
    return tuple(out)


# --- The namespace ---------------------------------------------------------------------------


def _ready_message(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    return "not applied by this sidecar version: " + "; ".join(notes)


def compile_namespace(inputs: NamespaceInputs) -> CompiledNamespace:
    """The namespace's RouterConfig (None when nothing routes) and a verdict for every object."""
    verdicts: dict[tuple[str, str], Verdict] = {}
    endpoints = {
        res.name: _compile_endpoint(res, inputs)
        for res in sorted(inputs.endpoints, key=lambda r: r.name)
    }

    policy_results: dict[str, _PolicyResult | None] = {}
    parsed: list[tuple[Resource, RoutingPolicySpec]] = []
    for res in sorted(inputs.policies, key=lambda r: (r.created, r.name)):
        try:
            parsed.append((res, RoutingPolicySpec.model_validate(res.spec)))
        except ValidationError as exc:
            policy_results[res.name] = None
            verdicts[(ROUTING_POLICY.kind, res.name)] = Verdict(
                False, INVALID_SPEC, _spec_error(ROUTING_POLICY.kind, exc), res.generation
            )
    early_errors: dict[str, list[str]] = {res.name: [] for res, _ in parsed}
    ns = _Namespace(endpoints, _sensitivity(parsed, early_errors))
    settings = _sidecar_settings(parsed, endpoints, inputs, early_errors)
    aliases: list[rc.ModelAlias] = []
    rules: list[rc.Rule] = []
    for res, spec in parsed:
        result = _compile_policy(spec, ns, res.name)
        result.errors[:0] = early_errors[res.name]
        overruled = settings.merged.overruled.get(res.name, [])
        result.errors.extend(overruled)
        policy_results[res.name] = result
        aliases.extend(result.aliases)
        rules.extend(result.rules)
        routes = bool(result.aliases)
        in_config = routes or settings.owns_any(res.name)
        if result.errors:
            reason = INVALID_REFERENCES if routes else NOTHING_ROUTABLE
            if routes and len(overruled) == len(result.errors):
                reason = SETTINGS_CONFLICT
            verdict = Verdict(False, reason, "; ".join(result.errors), res.generation, in_config)
        else:
            message = _ready_message(result.notes)
            verdict = Verdict(True, COMPILED, message, res.generation, in_config)
        verdict.conflict = "; ".join(settings.merged.conflicts.get(res.name, []))
        verdicts[(ROUTING_POLICY.kind, res.name)] = verdict
    used = {t.endpoint for a in aliases for t in a.route_targets()}
    used |= {t.endpoint for r in rules for t in r.targets}
    used |= _overflow_endpoints(aliases, rules)
    if settings.batch_api_endpoint is not None:
        used.add(settings.batch_api_endpoint)  # shipped for the Batch API pass-through

    for name, ep in endpoints.items():
        v = ep.verdict
        if ep.compiled is not None:
            v.in_config = name in used
            if not v.in_config:
                v.message = "valid, but no RoutingPolicy routes to it"
        verdicts[(MODEL_ENDPOINT.kind, name)] = v

    budgets: list[CompiledBudget] = []
    for res in sorted(inputs.budgets, key=lambda r: r.name):
        verdict, compiled_budget = _compile_budget(res, endpoints, policy_results, inputs.spent)
        verdicts[(BUDGET.kind, res.name)] = verdict
        if compiled_budget is not None:
            budgets.append(compiled_budget)

    config = None
    if aliases:
        config = _assemble(
            inputs.namespace, endpoints, used, aliases, rules, ns, settings, budgets, verdicts
        )
    return CompiledNamespace(inputs.namespace, config, verdicts, tuple(budgets))


def _assemble(
    namespace: str,
    endpoints: Mapping[str, _Endpoint],
    used: set[str],
    aliases: list[rc.ModelAlias],
    rules: list[rc.Rule],
    ns: _Namespace,
    settings: _SidecarSettings,
    budgets: list[CompiledBudget],
    verdicts: dict[tuple[str, str], Verdict],
) -> rc.RouterConfig | None:
    values = settings.merged.values
    try:
        config = rc.RouterConfig(
            metadata=rc.Metadata(name=namespace, namespace=namespace),
            endpoints=tuple(
                ep.compiled
                for name, ep in endpoints.items()
                if ep.compiled is not None and name in used
            ),
            models=tuple(aliases),
            rules=tuple(rules),
            sensitivity=ns.sensitivity,
            budgets=_spend_budgets(budgets, used),
            server=sidecar_settings.server(values),
            cache=sidecar_settings.cache_store(values, settings.redis_password, ns.cache_entries),
            lanes=sidecar_settings.lanes(values),
        )
    except ValidationError as exc:
        # The per-object checks above should make this unreachable; if they miss a case, say so
        # on every policy instead of shipping a config the sidecars would NACK.
        message = f"the combined config is invalid: {_validation_detail(exc)}"
        for (kind, _), verdict in verdicts.items():
            if kind == ROUTING_POLICY.kind and verdict.in_config:
                verdict.ready, verdict.reason, verdict.message = False, COMPILE_ERROR, message
                verdict.in_config = False
        return None
    metadata = rc.Metadata(name=namespace, namespace=namespace, version=config.content_hash())
    return config.model_copy(update={"metadata": metadata})
