"""The custom resources' specs and statuses as pydantic models: the one source of truth.

`crdgen` turns these models into the CRD YAML in crds/ (OpenAPI v3 schema, CEL rules, printer
columns), and the compiler validates every object it reads with the same models, so a cluster
without CEL support or an object written before a schema change is still checked. Field names are
camelCase on the wire; attribute docstrings become the schema descriptions `kubectl explain` shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue
from pydantic.alias_generators import to_camel

from modelplane_sidecar.config import Detector, Engine, LaneName, RetryOn, Strategy, Tier

GROUP = "modelplane.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

#: A Kubernetes object name (DNS-1123 subdomain).
ObjectName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    ),
]
#: A key inside a Secret's data.
SecretKey = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
#: A model name apps ask for (the `model` field of an OpenAI request).
AliasName = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9._:/@-]+$")]
#: A short free-form label such as a region, a residency zone or a compliance tag.
Tag = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9._:/-]+$")]
ShortText = Annotated[str, Field(max_length=1024)]


def _cel(*rules: tuple[str, str]) -> ConfigDict:
    """Model config carrying CEL rules (rule, message) into the generated CRD schema."""
    validations: list[JsonValue] = [{"rule": rule, "message": msg} for rule, msg in rules]
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": validations})


class _Spec(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )


# --- ModelEndpoint -----------------------------------------------------------------------------


class ProviderName(StrEnum):
    """Upstream APIs a ModelEndpoint can name (DESIGN.md). The sidecar may support fewer."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"
    AZURE_OPENAI = "azure-openai"
    BEDROCK = "bedrock"
    OPENAI_COMPATIBLE = "openai-compatible"


class SecretKeyRef(_Spec):
    name: ObjectName
    """Name of a Secret in the object's own namespace."""
    key: SecretKey
    """Key inside the Secret's data that holds the credential."""


class Credentials(_Spec):
    secret_ref: SecretKeyRef
    """The API key, read from a Secret in the same namespace (never inline)."""


class ServiceRef(_Spec):
    """An in-cluster Service serving an OpenAI-compatible API (vLLM, llama.cpp, TGI...).

    The operator watches the Service's EndpointSlices and ships their ready addresses to the
    sidecars, which balance across them by load (docs/self-hosted.md).
    """

    name: ObjectName
    """Service name."""
    namespace: ObjectName | None = None
    """Namespace of the Service (default: the ModelEndpoint's own; must be one the operator
    watches)."""
    port: int = Field(ge=1, le=65535)
    """Service port; also the replicas' port when the EndpointSlices list several ports and none
    is named portName."""
    port_name: str | None = Field(default=None, max_length=63)
    """Name of the port in the EndpointSlices (default: their only port, else the one numbered
    `port`)."""
    scheme: str = Field(default="http", pattern=r"^https?$")
    path: str = Field(default="/v1", max_length=253, pattern=r"^/[A-Za-z0-9._~/-]*$")
    """URL path prefix of the API on the Service."""
    engine: Engine | None = None
    """Model server (vllm, sglang, tgi, llamacpp): its Prometheus queue and KV-cache metrics
    drive replica choice. Unset: replicas are balanced by outstanding requests only."""


class LoadMetricsSpec(_Spec):
    """How the operator reads the replicas' Prometheus metrics (once, for every sidecar)."""

    path: str = Field(default="/metrics", max_length=253, pattern=r"^/[A-Za-z0-9._~/-]*$")
    scrape_interval_seconds: float = Field(default=2.0, ge=0.2, le=300)
    """Seconds between two scrapes of one replica."""
    max_age_seconds: float = Field(default=10.0, gt=0, le=3600)
    """Readings older than this are ignored by the sidecars."""


class Toleration(_Spec):
    key: str | None = Field(default=None, max_length=317)
    operator: str | None = Field(default=None, pattern=r"^(Exists|Equal)$")
    value: str | None = Field(default=None, max_length=63)
    effect: str | None = Field(default=None, pattern=r"^(NoSchedule|PreferNoSchedule|NoExecute)$")
    toleration_seconds: int | None = None


class ServerTemplate(_Spec):
    """A vLLM server the operator creates (Deployment + Service, owned by this ModelEndpoint)."""

    image: str = Field(default="vllm/vllm-openai:v0.11.0", min_length=1, max_length=1024)
    model: str | None = Field(default=None, max_length=253)
    """Model vLLM loads (Hugging Face id or path); default: spec.model."""
    gpus: int = Field(default=1, ge=0, le=64)
    """nvidia.com/gpu limit per replica (also vLLM's --tensor-parallel-size when above 1)."""
    replicas: int = Field(default=1, ge=0, le=1000)
    port: int = Field(default=8000, ge=1, le=65535)
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict, max_length=32
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    args: list[Annotated[str, Field(max_length=1024)]] = Field(default_factory=list, max_length=64)
    """Extra vLLM arguments, e.g. --max-model-len=8192."""
    env_from_secret: ObjectName | None = None
    """A Secret whose keys become the server's environment (e.g. HF_TOKEN)."""


class EndpointPricing(_Spec):
    """USD per one million tokens."""

    input_per_m_tok: float = Field(default=0.0, ge=0, alias="inputPerMTok")
    output_per_m_tok: float = Field(default=0.0, ge=0, alias="outputPerMTok")
    cached_input_per_m_tok: float | None = Field(default=None, ge=0, alias="cachedInputPerMTok")


class EndpointLimits(_Spec):
    """Upstream limits the sidecars of a namespace must stay under together."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    max_concurrency: int | None = Field(default=None, ge=1)
    """Requests in flight at once, per sidecar."""


class EndpointTimeouts(_Spec):
    connect_seconds: float = Field(default=5.0, gt=0, le=300)
    request_seconds: float = Field(default=60.0, gt=0, le=3600)
    """Per attempt: from sending the request to the complete response or first stream byte."""
    stream_idle_seconds: float = Field(default=60.0, gt=0, le=3600)
    """Longest silence tolerated between two chunks of a stream."""


class ModelEndpointSpec(_Spec):
    """One callable model at one provider (or one in-cluster model server)."""

    model_config = _cel(
        (
            "(has(self.baseURL) ? 1 : 0) + (has(self.serviceRef) ? 1 : 0)"
            " + (has(self.template) ? 1 : 0) == 1",
            "exactly one of baseURL, serviceRef or template must be set",
        ),
        (
            "(!has(self.serviceRef) && !has(self.template))"
            " || self.provider == 'openai-compatible'",
            "serviceRef and template need provider openai-compatible",
        ),
    )

    provider: ProviderName
    """Wire protocol of the upstream API."""
    model: str = Field(min_length=1, max_length=253)
    """Model name the upstream expects, e.g. gpt-4o-mini."""
    base_url: str | None = Field(
        default=None, max_length=2048, pattern=r"^https?://[^\s]+$", alias="baseURL"
    )
    """Base URL of the API, e.g. https://api.openai.com/v1."""
    service_ref: ServiceRef | None = None
    """In-cluster Service instead of a base URL."""
    template: ServerTemplate | None = None
    """Let the operator run the model server (vLLM) instead of naming one."""
    load_metrics: LoadMetricsSpec | None = None
    """serviceRef/template with an engine: how its metrics are read."""
    credentials: Credentials | None = None
    region: Tag | None = None
    """Where the model runs, e.g. eu-west-1."""
    residency: Tag | None = None
    """Data-residency zone, e.g. eu; shipped to the sidecar as tag residency:<zone>."""
    compliance: list[Tag] = Field(default_factory=list, max_length=32)
    """Compliance tags such as on-prem, gdpr, hipaa that sensitive traffic can require."""
    pricing: EndpointPricing = EndpointPricing()
    context_window: int | None = Field(default=None, gt=0)
    """Largest prompt plus completion in tokens."""
    limits: EndpointLimits | None = None
    timeouts: EndpointTimeouts = EndpointTimeouts()
    headers: dict[str, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict, max_length=32
    )
    """Extra, non-secret headers sent upstream on every call."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Provider-specific settings, e.g. Azure's apiVersion and deployment, or Bedrock's
    credentialSource (webIdentity: the pod's IRSA role; container: EKS Pod Identity)."""


# --- RoutingPolicy -----------------------------------------------------------------------------


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(_Spec):
    key: str = Field(min_length=1, max_length=317)
    operator: SelectorOperator
    values: list[Annotated[str, Field(max_length=63)]] = Field(default_factory=list, max_length=64)


class LabelSelector(_Spec):
    match_labels: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict, max_length=64
    )
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=32)


class Target(_Spec):
    endpoint: ObjectName
    """Name of a ModelEndpoint in the same namespace."""
    weight: int | None = Field(default=None, ge=0, le=1_000_000)
    """Share of traffic under strategy weighted, relative to the other targets (default 1)."""
    tier: Tier | None = None
    """The tier this endpoint serves under strategy complexity-tiers."""
    arm: AliasName | None = None
    """A/B arm label for metrics under strategy weighted (default: the endpoint name)."""


class TierThresholds(_Spec):
    """Complexity scores (0..1) at which complexity-tiers moves up a tier."""

    model_config = _cel(
        ("self.standard <= self.premium", "tiers.standard must not be above tiers.premium"),
    )

    standard: float = Field(default=0.35, ge=0, le=1)
    premium: float = Field(default=0.65, ge=0, le=1)


class StrategyOptions(_Spec):
    sticky_headers: list[Annotated[str, Field(max_length=256)]] | None = Field(
        default=None, max_length=8
    )
    """weighted: headers whose value keeps a user or session on one arm."""
    exploration: float | None = Field(default=None, ge=0, le=1)
    """lowest-latency: share of requests sent to a random candidate."""
    tiers: TierThresholds | None = None
    expected_output_tokens: int | None = Field(default=None, ge=0, le=10_000_000)
    """lowest-cost: output tokens assumed when the request sets no max_tokens."""
    fallback: bool | None = None
    """Keep the other candidates as a fallback chain after the picked one (default true)."""
    budget_downgrade: bool | None = None
    """Let a Budget in downgrade mode reorder this route cheapest-first (default true)."""


_TARGET_SET_RULES = _cel(
    (
        "self.strategy != 'weighted' || self.targets.exists(t, !has(t.weight) || t.weight > 0)",
        "strategy weighted needs at least one target with a weight above 0",
    ),
    (
        "self.strategy != 'complexity-tiers' || self.targets.all(t, has(t.tier))",
        "strategy complexity-tiers needs a tier on every target",
    ),
)

Targets = Annotated[list[Target], Field(min_length=1, max_length=32)]


class OverflowSpec(_Spec):
    """Self-hosted first: spill to these targets only while the route's own are saturated."""

    model_config = _cel(
        (
            "has(self.maxQueueDepth) || has(self.maxPredictedWaitSeconds)",
            "overflow needs maxQueueDepth or maxPredictedWaitSeconds",
        ),
    )

    targets: Targets
    """Endpoints that take the spill (e.g. a cloud model), in order."""
    max_queue_depth: float | None = Field(default=None, ge=0)
    """Saturated when even the least-loaded ready replica has more requests queued."""
    max_predicted_wait_seconds: float | None = Field(default=None, gt=0, le=3600)
    """Saturated when the predicted wait for a slot on the least-loaded replica is longer."""
    never_spill: list[Tag] | None = Field(default=None, max_length=16)
    """Data classes that never spill (default: every class with allowedTags)."""
    sensitive_wait_seconds: float = Field(default=5.0, ge=0, le=300)
    """How long a never-spill request waits for capacity before it fails with 503."""


class Route(_Spec):
    """A target set and how one endpoint is picked from it."""

    model_config = _TARGET_SET_RULES

    targets: Targets
    """Endpoints in order (for priority: the fallback chain)."""
    strategy: Strategy = Strategy.PRIORITY
    options: StrategyOptions | None = None
    overflow: OverflowSpec | None = None
    lane: LaneName | None = None
    """batch: the route's requests take the batch lane (cheapest allowed endpoint first, a
    bounded queue, never more than their share of an endpoint); unset: the app's
    x-modelplane-priority header decides."""


class ModelRoute(Route):
    """A model name apps ask for and the route it takes when no rule says otherwise."""

    name: AliasName
    """The model name apps send, e.g. chat or gpt-4o."""
    description: ShortText | None = None


class ScoreRange(_Spec):
    """min <= score < max, on the classifier's 0..1 complexity score."""

    model_config = _cel(
        ("self.min <= self.max", "min must not be above max"),
    )

    min: float = Field(default=0.0, ge=0, le=1)
    max: float = Field(default=1.0, ge=0, le=1)


class TokenRange(_Spec):
    """min <= estimated input tokens < max (no max: unbounded)."""

    model_config = _cel(
        ("!has(self.max) || self.min < self.max", "min must be below max"),
    )

    min: int = Field(default=0, ge=0)
    max: int | None = Field(default=None, gt=0)


class Operation(StrEnum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


Values = Annotated[list[Annotated[str, Field(max_length=1024)]], Field(min_length=1, max_length=16)]


class RuleMatch(_Spec):
    """Every condition that is set must hold; a list matches any of its entries."""

    models: list[AliasName] = Field(default_factory=list, max_length=64)
    """Requested model names (aliases of this policy)."""
    operations: list[Operation] = Field(default_factory=list, max_length=3)
    data_classes: list[Tag] = Field(default_factory=list, max_length=16)
    """Sensitivity classes of the request, e.g. public, pii, secret (see spec.sensitivity)."""
    labels: list[Detector] = Field(default_factory=list, max_length=16)
    """Findings of the sensitive-data detectors."""
    complexity: ScoreRange | None = None
    tokens: TokenRange | None = None
    """Size of the request in estimated input tokens."""
    headers: dict[str, Values] = Field(default_factory=dict, max_length=16)
    """Header name -> accepted values; "*" accepts any value that is present."""
    metadata: dict[str, Values] = Field(default_factory=dict, max_length=16)
    """Key of the body's metadata object -> accepted values; "*" as for headers."""
    tools: bool | None = None
    images: bool | None = None
    stream: bool | None = None


class Rule(Route):
    """Evaluated in order; the first rule whose match holds routes the request."""

    name: AliasName
    description: ShortText | None = None
    match: RuleMatch = RuleMatch()


class DataClass(_Spec):
    name: Tag
    allowed_tags: list[Tag] = Field(default_factory=list, max_length=16)
    """Requests of this class only go to endpoints with one of these tags (empty: any)."""
    description: ShortText | None = None


class SensitivitySettings(_Spec):
    """Data classes, which detector finding puts a request in which class, and the default."""

    default_class: Tag = "public"
    classes: list[DataClass] = Field(
        min_length=1,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    detectors: dict[str, Tag] | None = Field(default=None, max_length=16)
    """Detector (email, phone, payment-card, iban, us-ssn, ip-address, secret) -> class."""
    declared_class_header: str | None = Field(default=None, max_length=256)
    """Request header in which an app may declare a class (it can only add one)."""


class RetrySettings(_Spec):
    model_config = _cel(
        (
            "self.backoffMaxSeconds >= self.backoffBaseSeconds",
            "backoffMaxSeconds must be at least backoffBaseSeconds",
        ),
    )

    max_attempts: int = Field(default=2, ge=1, le=10)
    """Attempts per endpoint before falling back to the next one (1 = no retry)."""
    backoff_base_seconds: float = Field(default=0.1, ge=0, le=60)
    backoff_max_seconds: float = Field(default=2.0, ge=0, le=300)
    max_retry_after_seconds: float = Field(default=5.0, ge=0, le=300)
    """A Retry-After longer than this falls back instead of waiting."""
    retry_on: list[RetryOn] = Field(default_factory=lambda: list(RetryOn), max_length=4)


class TimeoutSettings(_Spec):
    attempt_seconds: float | None = Field(default=None, gt=0, le=3600)
    """Overrides each endpoint's request timeout when set."""
    total_seconds: float = Field(default=120.0, gt=0, le=7200)
    """The whole request, all retries and fallbacks included."""


class CircuitBreakerSettings(_Spec):
    enabled: bool = True
    failure_threshold: int = Field(default=5, ge=1, le=1000)
    open_seconds: float = Field(default=30.0, gt=0, le=3600)
    half_open_successes: int = Field(default=1, ge=1, le=100)


class CacheSettings(_Spec):
    """Exact-match response cache for this policy's models (sensitive requests never cached)."""

    enabled: bool = False
    ttl_seconds: int = Field(default=300, ge=1, le=86400)
    max_entries: int = Field(default=1000, ge=1, le=1_000_000)
    """Entries each sidecar keeps (the largest of the namespace's caching policies applies)."""
    deterministic_only: bool = True
    """Cache only temperature-0 and embeddings requests, and those an app marks with
    x-modelplane-cache-control: allow."""
    stale_on_error: bool = False
    """When every endpoint fails, answer with the last cached response (marked
    x-modelplane-cache: stale) instead of an error."""
    stale_seconds: int = Field(default=86400, ge=0, le=2_592_000)
    """How long past its TTL an answer is kept for staleOnError."""
    max_entry_bytes: int = Field(default=1024 * 1024, ge=256, le=64 * 1024 * 1024)
    """The largest answer cached, in bytes (a larger one is served but not stored, and a
    streamed one larger than this is not handed to coalesced requests)."""
    coalesce: bool = True
    """Identical cacheable requests that arrive while one is in flight upstream wait for its
    answer instead of calling upstream too (request coalescing)."""
    coalesce_max_waiters: int = Field(default=64, ge=1, le=10_000)
    """How many requests may wait for one in flight; more call upstream themselves."""


class RedisSettings(_Spec):
    """A Redis server the namespace's sidecars share cached answers through. An outage only
    degrades each sidecar to its own in-process store; requests never fail because of it."""

    model_config = _cel(
        (
            "!self.url.matches('^rediss?://[^/@]*:[^/@]*@')",
            "the Redis password goes in passwordSecretRef, never in the URL",
        ),
    )

    url: str = Field(min_length=1, max_length=2048, pattern=r"^rediss?://[^\s]+$")
    """redis://host:port/db or rediss://host:port/db (TLS)."""
    password_secret_ref: SecretKeyRef | None = None
    """The password, read from a Secret in the policy's namespace (never inline)."""
    key_prefix: str | None = Field(default=None, max_length=128)
    """Prefix of every key (sidecar default: modelplane:cache:)."""
    timeout_seconds: float | None = Field(default=None, gt=0, le=10)
    """Per call; a slower call counts as a failure (sidecar default: 0.1)."""
    retry_seconds: float | None = Field(default=None, gt=0, le=3600)
    """After a failure Redis is not asked for this long (sidecar default: 5)."""


class CacheStoreSettings(_Spec):
    """The response store of each sidecar, shared by every route whose spec.cache enables it."""

    max_bytes: int | None = Field(default=None, ge=1024, le=16 * 1024 * 1024 * 1024)
    """Size bound of the in-process store in bytes (sidecar default: 64 MiB)."""
    max_entries: int | None = Field(default=None, ge=1, le=10_000_000)
    """Entry bound of the in-process store (unset: the largest spec.cache.maxEntries of the
    namespace's caching policies, else the sidecar default 10000)."""
    redis: RedisSettings | None = None
    """Share entries between the sidecars through Redis (set as a whole: url, password and the
    rest come from one policy)."""


class LaneLimits(_Spec):
    """Admission of one lane on each sidecar (unset fields: the sidecar defaults)."""

    max_concurrency: int | None = Field(default=None, ge=0, le=100_000)
    """Requests of the lane forwarded at once; 0: no limit (sidecar default: none for
    realtime, 4 for batch)."""
    max_queue: int | None = Field(default=None, ge=0, le=100_000)
    """Requests that may wait for a slot; one more is refused with 429 (sidecar default: 0
    for realtime, 256 for batch)."""
    max_wait_seconds: float | None = Field(default=None, gt=0, le=86400)
    """A request that waited this long is refused with 503 (sidecar default: 30 for realtime,
    300 for batch)."""


class BatchLaneLimits(LaneLimits):
    endpoint_share: float | None = Field(default=None, gt=0, le=1)
    """Share of an endpoint's limits.maxConcurrency batch requests may hold, at least one
    (sidecar default: 0.5)."""
    cheapest_first: bool | None = None
    """Order a batch request's allowed endpoints cheapest first (sidecar default: true)."""
    batch_api_endpoint: ObjectName | None = None
    """A ModelEndpoint (provider openai or openai-compatible) that /v1/files and /v1/batches are
    passed through to, with its own credentials (unset: those routes answer 404)."""


class LanesSettings(_Spec):
    header: str | None = Field(default=None, max_length=256, pattern=r"^[A-Za-z0-9-]+$")
    """Request header naming a request's lane (sidecar default: x-modelplane-priority)."""
    realtime: LaneLimits | None = None
    batch: BatchLaneLimits | None = None


class ServerLimits(_Spec):
    max_body_bytes: int | None = Field(default=None, ge=1024, le=512 * 1024 * 1024)
    """Larger request bodies are refused with 413 (sidecar default: 10 MiB)."""


class SidecarSettings(_Spec):
    """Settings of every sidecar in the namespace: RouterConfig's server, cache and lanes.

    Any policy of the namespace may set any of them. A field two policies set to different
    values is a conflict: the older policy's value applies, and both policies say so in their
    Conflicted condition. Unset fields keep the sidecar defaults.
    """

    server: ServerLimits | None = None
    cache: CacheStoreSettings | None = None
    lanes: LanesSettings | None = None


class RoutingPolicySpec(_Spec):
    """Which pods it applies to, the model names they may ask for, and how requests route."""

    pod_selector: LabelSelector = LabelSelector()
    """Pods in this namespace whose sidecars use the policy (empty: all)."""
    models: list[ModelRoute] = Field(
        min_length=1,
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    rules: list[Rule] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Evaluated in order; the first match decides. No match: the model's own targets."""
    default: Route | None = None
    """Route for a requested model that is none of the aliases (unset: such requests get 404)."""
    sensitivity: SensitivitySettings | None = None
    """Data classes for the namespace; at most one RoutingPolicy of a namespace sets them."""
    retry: RetrySettings = RetrySettings()
    timeout: TimeoutSettings = TimeoutSettings()
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()
    cache: CacheSettings = CacheSettings()
    sidecar: SidecarSettings | None = None
    """Namespace-wide settings of the sidecars (request size limit, the cache store and its
    Redis, lane limits, the Batch API endpoint), merged over the namespace's policies."""


# --- Budget ------------------------------------------------------------------------------------


class BudgetPeriod(StrEnum):
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"


class BudgetAction(StrEnum):
    ALERT = "alert"
    DOWNGRADE = "downgrade"
    BLOCK = "block"
    #: The earlier name of `block`; still accepted.
    HARD_STOP = "hard-stop"


class BudgetThreshold(_Spec):
    model_config = _cel(
        ("!has(self.tier) || self.action == 'downgrade'", "tier is only for action downgrade"),
    )

    percent: int = Field(ge=1, le=100)
    """Share of the limit spent at which the action starts."""
    action: BudgetAction
    """alert: a Warning Event, the ThresholdReached condition and a metric; downgrade: routes
    serve from a cheaper tier; block: requests are refused with 429 until the period rolls over
    (spend leases make sure the fleet never spends past it)."""
    tier: Tier | None = None
    """downgrade: the highest tier that serves first from here on (a ladder such as premium ->
    standard at 70% and standard -> cheap at 90%); unset: the cheapest endpoints first."""


class BudgetScope(_Spec):
    """What the spend counts (all lists empty: everything in the namespace)."""

    policies: list[ObjectName] = Field(default_factory=list, max_length=64)
    """Endpoints the models and rules of these RoutingPolicies route to."""
    endpoints: list[ObjectName] = Field(default_factory=list, max_length=64)
    tags: list[Tag] = Field(default_factory=list, max_length=32)
    """Endpoints with any of these tags (compliance tags, residency:<zone>)."""


class BudgetSpec(_Spec):
    period: BudgetPeriod
    limit_usd: float = Field(gt=0, alias="limitUSD")
    scope: BudgetScope = BudgetScope()
    thresholds: list[BudgetThreshold] = Field(default_factory=list, max_length=16)
    timezone: str = Field(default="UTC", max_length=64)
    """IANA time zone in which periods start."""
    max_output_tokens: int = Field(default=4096, ge=1, le=10_000_000)
    """With a block threshold: the max_tokens sent upstream when the app sets none, so that a
    request's worst-case cost is known before it is sent."""
    lease_usd: float | None = Field(default=None, gt=0, alias="leaseUSD")
    """Largest spend lease one sidecar holds at a time (default: 2% of the blocking limit)."""


# --- Status ------------------------------------------------------------------------------------


_DATE_TIME: dict[str, JsonValue] = {"format": "date-time"}


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(_Spec):
    type: str = Field(max_length=64)
    status: ConditionStatus
    reason: str = Field(max_length=128)
    message: str = Field(default="", max_length=4096)
    last_transition_time: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}
    )
    observed_generation: int | None = None


class SidecarCounts(_Spec):
    """Sidecars of the namespace connected to the operator, by the config they run."""

    connected: int = 0
    current: int = 0
    stale: int = 0
    rejected: int = 0


class ResourceStatus(_Spec):
    observed_generation: int | None = None
    config_version: str | None = None
    """Version of the namespace's compiled config that includes this object."""
    sidecars: SidecarCounts | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


class EndpointSpend(_Spec):
    name: str = Field(max_length=253)
    spent_usd: float = Field(default=0.0, alias="spentUSD")
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    requests: int = 0


class SpendLease(_Spec):
    """One sidecar's lease: cumulative amounts in this period (written before a grant is sent)."""

    holder: str = Field(max_length=128)
    """The sidecar process (pod name and a per-process id)."""
    book: str | None = Field(default=None, max_length=64)
    """Nonce of this entry; the sidecar names it in its reports, so reports of an entry that
    was pruned are recognised and never counted twice."""
    granted_usd: float = Field(default=0.0, alias="grantedUSD")
    settled_usd: float = Field(default=0.0, alias="settledUSD")
    returned_usd: float = Field(default=0.0, alias="returnedUSD")
    connected: bool = False
    confirmed: bool = False
    """The sidecar has named the book in a report (the entry can be pruned once idle)."""
    disconnected_at: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    endpoints: list[EndpointSpend] = Field(default_factory=list, max_length=256)


class PrunedLeases(_Spec):
    """Leases of disconnected sidecar processes folded out of `leases` (cumulative amounts)."""

    holders: int = 0
    """How many were folded in this period."""
    granted_usd: float = Field(default=0.0, alias="grantedUSD")
    settled_usd: float = Field(default=0.0, alias="settledUSD")
    returned_usd: float = Field(default=0.0, alias="returnedUSD")
    leased_usd: float = Field(default=0.0, alias="leasedUSD")
    """Their leases still outstanding when folded: counted in leasedUSD until the period ends."""


class ReplicaCounts(_Spec):
    """Addresses of a serviceRef's EndpointSlices, as shipped to the sidecars."""

    ready: int = 0
    total: int = 0


class WorkloadStatus(_Spec):
    """The model server the operator runs for spec.template."""

    deployment: str = Field(max_length=253)
    service: str = Field(max_length=253)
    replicas: int = 0
    """Desired replicas."""
    ready_replicas: int = 0
    message: str = Field(default="", max_length=1024)


class ModelEndpointStatus(ResourceStatus):
    replicas: ReplicaCounts | None = None
    workload: WorkloadStatus | None = None


class BudgetStatus(ResourceStatus):
    spent_usd: float | None = Field(default=None, alias="spentUSD")
    """Settled spend of the current period that sidecars reported."""
    leased_usd: float | None = Field(default=None, alias="leasedUSD")
    """Granted to sidecars and not yet settled or returned: counted as spent until it is."""
    remaining_usd: float | None = Field(default=None, alias="remainingUSD")
    """limitUSD - spentUSD - leasedUSD."""
    period_start: str | None = Field(default=None, json_schema_extra=_DATE_TIME)
    period_end: str | None = Field(default=None, json_schema_extra=_DATE_TIME)
    thresholds_reached: list[int] = Field(default_factory=list, max_length=16)
    """Percent thresholds passed in the current period."""
    mode: str | None = Field(default=None, max_length=32)
    """normal, downgrade or block: what the budget makes the sidecars do now."""
    endpoints: list[EndpointSpend] = Field(default_factory=list, max_length=256)
    """Spend and tokens per endpoint in the current period."""
    leases: list[SpendLease] = Field(default_factory=list, max_length=4096)
    """One per sidecar process of the period; idle ones are folded into `pruned`."""
    pruned: PrunedLeases | None = None


# --- The kinds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str = "string"
    priority: int = 0
    description: str = ""


_READY = PrinterColumn("Ready", '.status.conditions[?(@.type=="Ready")].status')
_REASON = PrinterColumn("Reason", '.status.conditions[?(@.type=="Ready")].reason', priority=1)
_VERSION = PrinterColumn("Version", ".status.configVersion", priority=1)
_SIDECARS = PrinterColumn(
    "Applied", ".status.sidecars.current", "integer", description="sidecars on current config"
)
_AGE = PrinterColumn("Age", ".metadata.creationTimestamp", "date")


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    short_names: tuple[str, ...]
    spec: type[_Spec]
    status: type[_Spec]
    columns: tuple[PrinterColumn, ...]
    categories: tuple[str, ...] = field(default=("modelplane",))

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


MODEL_ENDPOINT = Kind(
    kind="ModelEndpoint",
    plural="modelendpoints",
    short_names=("mep",),
    spec=ModelEndpointSpec,
    status=ModelEndpointStatus,
    columns=(
        PrinterColumn("Provider", ".spec.provider"),
        PrinterColumn("Model", ".spec.model"),
        PrinterColumn(
            "Replicas", ".status.replicas.ready", "integer", description="ready replicas"
        ),
        PrinterColumn("Region", ".spec.region", priority=1),
        _READY,
        _REASON,
        _SIDECARS,
        _VERSION,
        _AGE,
    ),
)
ROUTING_POLICY = Kind(
    kind="RoutingPolicy",
    plural="routingpolicies",
    short_names=("rpol",),
    spec=RoutingPolicySpec,
    status=ResourceStatus,
    columns=(_READY, _REASON, _SIDECARS, _VERSION, _AGE),
)
BUDGET = Kind(
    kind="Budget",
    plural="budgets",
    short_names=("mbudget",),
    spec=BudgetSpec,
    status=BudgetStatus,
    columns=(
        PrinterColumn("Period", ".spec.period"),
        PrinterColumn("Limit", ".spec.limitUSD", "number"),
        PrinterColumn("Spent", ".status.spentUSD", "number"),
        PrinterColumn("Remaining", ".status.remainingUSD", "number"),
        PrinterColumn("Mode", ".status.mode"),
        _READY,
        _REASON,
        _AGE,
    ),
)
KINDS: tuple[Kind, ...] = (MODEL_ENDPOINT, ROUTING_POLICY, BUDGET)
