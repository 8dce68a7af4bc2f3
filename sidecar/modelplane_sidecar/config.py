"""RouterConfig: the versioned, public config format of the sidecar.

This schema is the one contract between the data plane and the control plane: the sidecar loads it
from a YAML file when it runs alone, and the operator compiles custom resources into exactly this
shape when it runs in a cluster. Field names are camelCase on the wire (like Kubernetes objects);
Python code uses snake_case attributes. Everything is validated once, when a config is loaded, so
the request path can trust it without re-checking.
"""

from __future__ import annotations

import hashlib
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import orjson
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from .pricing import builtin_pricing

API_VERSION = "modelplane.io/v1alpha1"
KIND = "RouterConfig"

NonEmptyName = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9._:/@-]+$")]


class ConfigError(ValueError):
    """A config that cannot be applied; the message says exactly what and where."""


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


class Provider(StrEnum):
    """Wire protocols the sidecar can speak upstream; one adapter module each (providers/)."""

    OPENAI = "openai"
    OPENAI_COMPATIBLE = "openai-compatible"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"
    AZURE_OPENAI = "azure-openai"
    BEDROCK = "bedrock"


class ContentPolicy(StrEnum):
    """What the router does when a provider's content policy refuses a prompt."""

    #: The app gets the provider's refusal (as an OpenAI-shaped error or `content_filter`).
    PASS_THROUGH = "passThrough"
    #: The next endpoint of the chain may try the prompt instead.
    FALLBACK = "fallback"


class ProviderOptions(_Model):
    """Settings every provider accepts in `Endpoint.options`."""

    content_policy: ContentPolicy = ContentPolicy.PASS_THROUGH


class OpenAIOptions(ProviderOptions):
    #: Ask streams for a final usage chunk (`stream_options.include_usage`). Turn off for servers
    #: that reject the field; usage is then estimated (and marked so) when the stream has none.
    stream_usage: bool = True


class AnthropicOptions(ProviderOptions):
    #: The `anthropic-version` header (the API version the request and response shapes follow).
    version: str = Field(default="2026-10-21", min_length=1)
    #: `max_tokens` is required by the Messages API; used when the app sets none.
    max_tokens: int = Field(default=4096, gt=0)


class GeminiOptions(ProviderOptions):
    #: `apiKey`: the key goes in `x-goog-api-key` (Google AI Studio, Vertex express mode);
    #: `bearer`: `Authorization: Bearer` with an OAuth access token (Vertex AI).
    auth: Literal["apiKey", "bearer"] = "apiKey"


class AzureOpenAIOptions(ProviderOptions):
    #: The deployment name in the URL; defaults to the endpoint's `model`.
    deployment: str | None = Field(default=None, min_length=1)
    api_version: str = Field(default="2024-10-21", min_length=1)
    #: `apiKey`: the `api-key` header; `bearer`: `Authorization: Bearer` (Entra ID token).
    auth: Literal["apiKey", "bearer"] = "apiKey"


class BedrockOptions(ProviderOptions):
    #: AWS region for SigV4; defaults to the endpoint's `region`, then to the one in `baseUrl`.
    region: str | None = Field(default=None, pattern=r"^[a-z0-9-]+$")
    #: Profile in the shared AWS config/credentials files (default: AWS_PROFILE or `default`).
    profile: str | None = Field(default=None, min_length=1)
    #: Where SigV4 keys come from (without an `apiKey`): `auto` tries, in the AWS SDKs' order,
    #: the environment keys, web identity (IRSA), the shared files, then container credentials
    #: (EKS Pod Identity); the others name one source. See docs/providers.md.
    credential_source: Literal["auto", "environment", "webIdentity", "profile", "container"] = (
        "auto"
    )
    #: `inferenceConfig.maxTokens` when the app sets none (the model's default otherwise).
    max_tokens: int | None = Field(default=None, gt=0)
    #: The model id for CountTokens (`/v1/messages/count_tokens`), which takes foundation-model
    #: ids only; default: the endpoint's `model` without its cross-region profile prefix.
    count_tokens_model: str | None = Field(default=None, min_length=1, max_length=256)


PROVIDER_OPTIONS: dict[Provider, type[ProviderOptions]] = {
    Provider.OPENAI: OpenAIOptions,
    Provider.OPENAI_COMPATIBLE: OpenAIOptions,
    Provider.ANTHROPIC: AnthropicOptions,
    Provider.GEMINI: GeminiOptions,
    Provider.AZURE_OPENAI: AzureOpenAIOptions,
    Provider.BEDROCK: BedrockOptions,
}


class ApiKeySource(_Model):
    """Where an endpoint's credential comes from. Exactly one of the three is set.

    `value` is what the operator ships (resolved from a Secret); `env` and `file` are for running
    standalone. The key itself is a SecretStr so it never shows up in a repr, log line or error.
    """

    env: str | None = None
    file: Path | None = None
    value: SecretStr | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ApiKeySource:
        given = [n for n in ("env", "file", "value") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"apiKey needs exactly one of env, file, value (got {given or 'none'})"
            )
        return self

    def resolve(self) -> str:
        if self.value is not None:
            return self.value.get_secret_value()
        if self.env is not None:
            found = os.environ.get(self.env)
            if found is None:
                raise ConfigError(f"apiKey.env: environment variable {self.env!r} is not set")
            return found
        assert self.file is not None
        try:
            return self.file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"apiKey.file: cannot read {str(self.file)!r}: {exc.strerror}"
            ) from None


class Timeouts(_Model):
    connect_seconds: float = Field(default=5.0, gt=0, le=300)
    #: Per attempt: from sending the request to the complete response (or the first stream byte).
    request_seconds: float = Field(default=60.0, gt=0, le=3600)
    #: For streams: the longest silence tolerated between two chunks once the stream has started.
    stream_idle_seconds: float = Field(default=60.0, gt=0, le=3600)


class Pricing(_Model):
    """USD per one million tokens."""

    input_per_mtok: float = Field(default=0.0, ge=0)
    output_per_mtok: float = Field(default=0.0, ge=0)
    cached_input_per_mtok: float | None = Field(default=None, ge=0)


class EndpointLimits(_Model):
    """Rate and concurrency limits of one endpoint (e.g. the provider account's quota)."""

    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    max_concurrency: int | None = Field(default=None, gt=0)


class Engine(StrEnum):
    """Model servers whose Prometheus load metrics the sidecar reads (pool/engines.py)."""

    VLLM = "vllm"
    SGLANG = "sglang"
    TGI = "tgi"
    LLAMACPP = "llamacpp"


class LoadSource(StrEnum):
    """Who reads a self-hosted endpoint's load metrics (docs/self-hosted.md)."""

    #: This sidecar scrapes each replica itself (standalone mode).
    SCRAPE = "scrape"
    #: The operator scrapes each replica once and pushes snapshots over the config stream.
    PUSH = "push"
    #: No engine metrics: replicas are balanced by this sidecar's outstanding requests only.
    OFF = "off"


class LoadMetrics(_Model):
    """How the load of a self-hosted endpoint's replicas is read."""

    source: LoadSource = LoadSource.SCRAPE
    #: Path of the Prometheus endpoint on each replica (same host and port as the API).
    path: str = Field(default="/metrics", pattern=r"^/[A-Za-z0-9._~/-]*$")
    #: Seconds between two scrapes of one replica (each tick is jittered by up to 20 %).
    scrape_interval_seconds: float = Field(default=2.0, ge=0.2, le=300)
    #: A snapshot older than this is ignored; the replica is then scored by outstanding requests.
    max_age_seconds: float = Field(default=10.0, gt=0, le=3600)


class Replica(_Model):
    """One serving instance of a self-hosted endpoint (e.g. a ready EndpointSlice address)."""

    #: Base URL of this replica's API, e.g. http://10.0.3.7:8000/v1.
    url: str = Field(min_length=1)
    #: Not-ready replicas are kept in the config (to say "0 of 3 ready") but never called.
    ready: bool = True
    zone: str | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"replica url must start with http:// or https:// (got {v!r})")
        return v.rstrip("/")


class Endpoint(_Model):
    """One callable model at one provider."""

    name: NonEmptyName
    provider: Provider = Provider.OPENAI
    base_url: str = Field(min_length=1)
    #: The model name the upstream expects (the alias the app asks for is mapped to this).
    model: str = Field(min_length=1)
    api_key: ApiKeySource | None = None
    timeouts: Timeouts = Timeouts()
    region: str | None = None
    tags: tuple[str, ...] = ()
    pricing: Pricing = Pricing()
    context_window: int | None = Field(default=None, gt=0)
    #: Client-side limits the router keeps this endpoint under (routing filters skip it when full).
    limits: EndpointLimits = EndpointLimits()
    #: Extra headers sent upstream on every call (e.g. an organisation id). Not secret.
    headers: dict[str, str] = Field(default_factory=dict)
    #: Provider-specific settings (e.g. Azure's apiVersion/deployment, Bedrock's region): see
    #: the `*Options` models above. Validated on load and stored with every default filled in.
    options: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    #: A self-hosted model server; its replicas are balanced by load (docs/self-hosted.md).
    engine: Engine | None = None
    #: The replicas to balance across (None: call `baseUrl`). With a list, `baseUrl` is only a
    #: label, and an endpoint with no ready replica is skipped by routing.
    replicas: tuple[Replica, ...] | None = None
    load_metrics: LoadMetrics = LoadMetrics()

    @model_validator(mode="before")
    @classmethod
    def _builtin_pricing(cls, data: Any) -> Any:
        # An endpoint that declares no pricing is priced from the built-in table (pricing.py).
        if isinstance(data, dict) and "pricing" not in data and isinstance(data.get("model"), str):
            found = builtin_pricing(data["model"])
            if found is not None:
                return {**data, "pricing": found}
        return data

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"baseUrl must start with http:// or https:// (got {v!r})")
        return v.rstrip("/")

    @field_validator("options")
    @classmethod
    def _provider_options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        provider = info.data.get("provider")
        if provider is None:
            return v
        model = PROVIDER_OPTIONS[provider]
        try:
            parsed = model.model_validate(v)
        except ValidationError as exc:
            raise ValueError(
                f"options for provider {provider.value}: {_format_validation_error(exc)}"
            ) from None
        return parsed.model_dump(mode="json", by_alias=True)

    def label(self) -> str:
        return self.name


class RetryOn(StrEnum):
    CONNECT = "connect"
    TIMEOUT = "timeout"
    RATE_LIMIT = "rate-limit"
    SERVER_ERROR = "server-error"


class RetryPolicy(_Model):
    #: Attempts per endpoint before falling back to the next one (1 = no retry).
    max_attempts: int = Field(default=2, ge=1, le=10)
    backoff_base_seconds: float = Field(default=0.1, ge=0, le=60)
    backoff_max_seconds: float = Field(default=2.0, ge=0, le=300)
    #: A Retry-After longer than this makes the router fall back instead of waiting.
    max_retry_after_seconds: float = Field(default=5.0, ge=0, le=300)
    retry_on: tuple[RetryOn, ...] = tuple(RetryOn)


class TimeoutPolicy(_Model):
    #: Overrides each endpoint's own request timeout for this alias when set.
    attempt_seconds: float | None = Field(default=None, gt=0, le=3600)
    #: The whole request, all retries and fallbacks included.
    total_seconds: float = Field(default=120.0, gt=0, le=7200)


class CircuitBreakerPolicy(_Model):
    enabled: bool = True
    #: Consecutive failures that open the breaker.
    failure_threshold: int = Field(default=5, ge=1, le=1000)
    #: How long an open breaker rejects calls before letting a probe through (half-open).
    open_seconds: float = Field(default=30.0, gt=0, le=3600)
    #: Successful probes needed in half-open state to close again.
    half_open_successes: int = Field(default=1, ge=1, le=100)


# -- routing: rules, strategies, data sensitivity, budget state (docs/routing.md) ----------------


class Strategy(StrEnum):
    """How a rule orders its candidate endpoints; the first is tried, the rest are fallbacks."""

    PRIORITY = "priority"
    WEIGHTED = "weighted"
    LOWEST_LATENCY = "lowest-latency"
    LOWEST_COST = "lowest-cost"
    LEAST_LOADED = "least-loaded"
    COMPLEXITY_TIERS = "complexity-tiers"


class Tier(StrEnum):
    CHEAP = "cheap"
    STANDARD = "standard"
    PREMIUM = "premium"


class Target(_Model):
    """One endpoint a rule may send to. A plain string is short for `{endpoint: NAME}`."""

    endpoint: NonEmptyName
    #: Share of traffic under the `weighted` strategy (relative to the other targets' weights).
    weight: int = Field(default=1, ge=0, le=1_000_000)
    #: The tier this endpoint serves under the `complexity-tiers` strategy.
    tier: Tier | None = None
    #: A/B arm label for metrics (`weighted`); defaults to the endpoint name.
    arm: NonEmptyName | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"endpoint": data} if isinstance(data, str) else data

    def arm_label(self) -> str:
        return self.arm or self.endpoint


class TierThresholds(_Model):
    """Complexity scores (0..1) at which `complexity-tiers` moves up a tier."""

    standard: float = Field(default=0.35, ge=0, le=1)
    premium: float = Field(default=0.65, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> TierThresholds:
        if self.standard > self.premium:
            raise ValueError(
                f"tiers.standard ({self.standard}) must not be above tiers.premium ({self.premium})"
            )
        return self


class StrategyOptions(_Model):
    #: `weighted`: request headers whose value keeps a user/session on one arm (first present
    #: wins; the body's `user` field is the last resort; with none, each request draws anew).
    sticky_headers: tuple[str, ...] = ("x-modelplane-session", "x-user-id")
    #: `lowest-latency`: share of requests sent to a random candidate so recovery is noticed.
    exploration: float = Field(default=0.05, ge=0, le=1)
    tiers: TierThresholds = TierThresholds()
    #: `lowest-cost`: output tokens assumed when the request sets no max_tokens.
    expected_output_tokens: int = Field(default=256, ge=0, le=10_000_000)
    #: Keep the other candidates as a fallback chain after the picked one.
    fallback: bool = True
    #: Let a budget in `downgrade` mode reorder this route cheapest-first.
    budget_downgrade: bool = True

    @field_validator("sticky_headers")
    @classmethod
    def _lower(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(h.lower() for h in v)


class ScoreRange(_Model):
    """`min <= score < max` (a max of 1 includes 1)."""

    min: float = Field(default=0.0, ge=0, le=1)
    max: float = Field(default=1.0, ge=0, le=1)

    def contains(self, score: float) -> bool:
        return self.min <= score and (score < self.max or (self.max >= 1.0 and score <= 1.0))


class TokenRange(_Model):
    """`min <= tokens < max` (no max: unbounded)."""

    min: int = Field(default=0, ge=0)
    max: int | None = Field(default=None, gt=0)

    def contains(self, tokens: int) -> bool:
        return self.min <= tokens and (self.max is None or tokens < self.max)


OperationName = Literal["chat", "completions", "embeddings"]


class Detector(StrEnum):
    """Sensitive-data detectors run on every request (routing/classify/sensitivity.py)."""

    EMAIL = "email"
    PHONE = "phone"
    PAYMENT_CARD = "payment-card"
    IBAN = "iban"
    US_SSN = "us-ssn"
    IP_ADDRESS = "ip-address"
    SECRET = "secret"


class RuleMatch(_Model):
    """Conditions of a rule; all given ones must hold (an empty match matches everything)."""

    #: Requested model aliases (any of).
    models: tuple[NonEmptyName, ...] = ()
    operations: tuple[OperationName, ...] = ()
    #: Data classes of the request (any of), from detectors, the declared header or the default.
    data_classes: tuple[NonEmptyName, ...] = ()
    #: Detector findings (any of).
    labels: tuple[Detector, ...] = ()
    complexity: ScoreRange | None = None
    tokens: TokenRange | None = None
    #: Header name -> accepted values (any of); `"*"` accepts any value as long as it is present.
    headers: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    #: Key of the body's `metadata` object -> accepted values (any of); `"*"` as for headers.
    metadata: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    tools: bool | None = None
    images: bool | None = None
    stream: bool | None = None

    @field_validator("headers")
    @classmethod
    def _lower_headers(cls, v: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        return {k.lower(): vals for k, vals in v.items()}


class Overflow(_Model):
    """Self-hosted first: spill to `targets` only while the route's own endpoints are saturated.

    Requests in a never-spill data class stay on the route's endpoints: they wait up to
    `sensitiveWaitSeconds` for capacity, then fail with a 503 that names the rule.
    """

    #: Endpoints that take the spill (e.g. a cloud model), in order.
    targets: tuple[Target, ...] = Field(min_length=1)
    #: Saturated when even the least-loaded ready replica has more requests queued than this.
    max_queue_depth: float | None = Field(default=None, ge=0)
    #: Saturated when the predicted wait for a slot on the least-loaded replica is longer.
    max_predicted_wait_seconds: float | None = Field(default=None, gt=0, le=3600)
    #: Data classes that never spill (None: every class with `allowedTags`).
    never_spill: tuple[NonEmptyName, ...] | None = None
    #: How long a never-spill request waits for self-hosted capacity before the 503.
    sensitive_wait_seconds: float = Field(default=5.0, ge=0, le=300)

    @model_validator(mode="after")
    def _has_threshold(self) -> Overflow:
        if self.max_queue_depth is None and self.max_predicted_wait_seconds is None:
            raise ValueError("overflow needs maxQueueDepth or maxPredictedWaitSeconds")
        return self


# -- strategy lanes: response cache and batch lane (docs/cache-and-lanes.md) --------------------


class CachePolicy(_Model):
    """Whether and how a route's answers are cached (on a model alias, or a rule to override).

    Only requests that are deterministic enough are cached unless `deterministicOnly` is off: a
    temperature of 0, an embeddings call, or an app that opts in with
    `x-modelplane-cache-control: allow`. Requests classified sensitive are never cached.
    """

    enabled: bool = False
    #: How long an answer is served from the cache.
    ttl_seconds: float = Field(default=300.0, gt=0, le=30 * 86400)
    #: Cache only temperature-0 (and embeddings) requests, or those that opt in by header.
    deterministic_only: bool = True
    #: When every candidate fails (or none can be tried), answer with the last cached response,
    #: marked `x-modelplane-cache: stale`, instead of an error.
    stale_on_error: bool = False
    #: How long past its TTL an answer is kept for `staleOnError`.
    stale_seconds: float = Field(default=86400.0, ge=0, le=30 * 86400)
    #: Larger answers are not cached.
    max_entry_bytes: int = Field(default=1024 * 1024, ge=256, le=64 * 1024 * 1024)
    #: Identical cacheable requests that arrive while one is in flight upstream wait for its
    #: answer instead of calling upstream too (request coalescing, single flight).
    coalesce: bool = True
    #: How many requests may wait for one in flight; more call upstream themselves.
    coalesce_max_waiters: int = Field(default=64, ge=1, le=10_000)


class RedisCache(_Model):
    """A Redis server that replicas of an app share cache entries through.

    An outage degrades to the local store: a failed or slow call opens a breaker for
    `retrySeconds`, during which Redis is not asked at all; requests never fail because of it.
    """

    #: `redis://host:port/db` or `rediss://...` (no password in the URL: use `password`).
    url: str = Field(min_length=1)
    password: ApiKeySource | None = None
    key_prefix: str = Field(default="modelplane:cache:", max_length=128)
    #: Per call; a lookup slower than this counts as a miss (and a Redis failure).
    timeout_seconds: float = Field(default=0.1, gt=0, le=10)
    retry_seconds: float = Field(default=5.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError(f"redis url must look like redis://host:port/db (got {v!r})")
        if parts.password:
            raise ValueError("redis url must not hold a password; set cache.redis.password")
        return v


class CacheStore(_Model):
    """The sidecar's response store, shared by every route that enables caching."""

    #: Size bound of the in-process store (least recently used entries go first).
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=16 * 1024 * 1024 * 1024)
    max_entries: int = Field(default=10_000, ge=1, le=10_000_000)
    redis: RedisCache | None = None


class LaneName(StrEnum):
    """Strategy lanes: real-time traffic, and batch traffic that never takes its capacity."""

    REALTIME = "realtime"
    BATCH = "batch"


class LaneSettings(_Model):
    """Admission of one lane: how many of its requests run at once, how many may wait."""

    #: Requests of this lane forwarded at once by this sidecar (None: no limit).
    max_concurrency: int | None = Field(default=None, ge=1, le=100_000)
    #: Requests that may wait for a slot; one more is refused with 429 `lane_queue_full`.
    max_queue: int = Field(default=0, ge=0, le=100_000)
    #: A request that waited this long is refused with 503 `lane_wait_timeout`.
    max_wait_seconds: float = Field(default=30.0, gt=0, le=86400)


class BatchLaneSettings(LaneSettings):
    max_concurrency: int | None = Field(default=4, ge=1, le=100_000)
    max_queue: int = Field(default=256, ge=0, le=100_000)
    max_wait_seconds: float = Field(default=300.0, gt=0, le=86400)
    #: Share of an endpoint's `limits.maxConcurrency` that batch requests may hold: a batch
    #: request waits while that many batch requests run there (or the endpoint is full), so the
    #: rest stays free for real-time traffic.
    endpoint_share: float = Field(default=0.5, gt=0, le=1)
    #: Order a batch request's allowed candidates cheapest first (else: the route's strategy).
    cheapest_first: bool = True
    #: Endpoint that OpenAI's Batch API (`/v1/files`, `/v1/batches`) is passed through to.
    batch_api_endpoint: NonEmptyName | None = None


class Lanes(_Model):
    #: Request header that puts a request in a lane (`realtime` or `batch`); a rule or model
    #: alias with a `lane` decides instead.
    header: str = "x-modelplane-priority"
    realtime: LaneSettings = LaneSettings()
    batch: BatchLaneSettings = BatchLaneSettings()

    @field_validator("header")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()


class Rule(_Model):
    """An ordered routing rule: the first whose match holds chooses the targets and strategy."""

    name: NonEmptyName
    description: str | None = None
    match: RuleMatch = RuleMatch()
    strategy: Strategy = Strategy.PRIORITY
    targets: tuple[Target, ...] = Field(min_length=1)
    options: StrategyOptions = StrategyOptions()
    overflow: Overflow | None = None
    #: Overrides the requested alias's cache policy for matching requests.
    cache: CachePolicy | None = None
    #: Puts matching requests in a lane (None: the alias's lane, else the request header's).
    lane: LaneName | None = None


class DataClass(_Model):
    """A class of data; requests of a restricted class only go to endpoints it allows."""

    name: NonEmptyName
    #: An endpoint may receive this class only if it has one of these tags (empty: any endpoint).
    allowed_tags: tuple[str, ...] = ()
    description: str | None = None


_DEFAULT_DETECTORS: dict[Detector, str] = {
    Detector.EMAIL: "pii",
    Detector.PHONE: "pii",
    Detector.PAYMENT_CARD: "pii",
    Detector.IBAN: "pii",
    Detector.US_SSN: "pii",
    Detector.IP_ADDRESS: "pii",
    Detector.SECRET: "secret",
}


class SensitivityPolicy(_Model):
    """Data classes, which detector puts a request in which class, and the default class."""

    default_class: NonEmptyName = "public"
    classes: tuple[DataClass, ...] = (
        DataClass(name="public"),
        DataClass(name="pii"),
        DataClass(name="secret"),
    )
    #: Detector -> the class its finding puts the request in; a detector not listed is off.
    detectors: dict[Detector, NonEmptyName] = Field(
        default_factory=lambda: dict(_DEFAULT_DETECTORS)
    )
    #: Request header in which an app declares a class; it can add a class, never remove one.
    declared_class_header: str | None = "x-modelplane-data-class"

    @model_validator(mode="after")
    def _known_classes(self) -> SensitivityPolicy:
        names = [c.name for c in self.classes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate data class names: {', '.join(dupes)}")
        if self.default_class not in names:
            raise ValueError(f"defaultClass {self.default_class!r} is not one of the classes")
        for detector, cls_name in self.detectors.items():
            if cls_name not in names:
                raise ValueError(
                    f"detector {detector.value!r} refers to unknown data class {cls_name!r}"
                )
        return self

    def data_class(self, name: str) -> DataClass | None:
        for c in self.classes:
            if c.name == name:
                return c
        return None


class BudgetMode(StrEnum):
    NORMAL = "normal"
    #: Routes with `options.budgetDowngrade` try their cheapest candidates first.
    DOWNGRADE = "downgrade"
    #: Requests are refused with 429 until the budget's period rolls over.
    STOP = "stop"


class BudgetState(_Model):
    """Spend state the operator derives from Budget resources; standalone configs may set it."""

    mode: BudgetMode = BudgetMode.NORMAL
    #: Name of the budget that set this mode (shown in errors and decision traces).
    budget: str | None = None
    #: `downgrade`: the highest tier that may serve first (targets of higher tiers move behind);
    #: None: the route's candidates go cheapest-first by price.
    tier: Tier | None = None


class SpendBudget(_Model):
    """A Budget the operator tracks over this sidecar's spend (docs/budgets.md).

    With `enforce`, every call to an endpoint in its scope first reserves its worst-case cost from
    a spend lease the operator granted over the config stream, and settles the actual cost after.
    `mode` and `tier` are the budget's state when the config was compiled.
    """

    name: NonEmptyName
    #: Endpoints whose spend the budget counts (empty: every endpoint).
    endpoints: tuple[NonEmptyName, ...] = ()
    enforce: bool = False
    #: Output tokens forced upstream (max_tokens) when the app sets none and `enforce` is on.
    max_output_tokens: int = Field(default=4096, ge=1, le=10_000_000)
    mode: BudgetMode = BudgetMode.NORMAL
    tier: Tier | None = None

    def covers(self, endpoint: str) -> bool:
        return not self.endpoints or endpoint in self.endpoints


class ModelAlias(_Model):
    """A model name apps ask for, mapped to an ordered fallback chain of endpoints.

    `endpoints` is the plain chain; `targets` with a `strategy` route the alias's requests the way
    a rule would (give one of the two). Rules may override the route for matching requests.
    """

    name: NonEmptyName
    endpoints: tuple[NonEmptyName, ...] = ()
    strategy: Strategy = Strategy.PRIORITY
    targets: tuple[Target, ...] = ()
    options: StrategyOptions = StrategyOptions()
    retry: RetryPolicy = RetryPolicy()
    timeout: TimeoutPolicy = TimeoutPolicy()
    circuit_breaker: CircuitBreakerPolicy = CircuitBreakerPolicy()
    description: str | None = None
    overflow: Overflow | None = None
    cache: CachePolicy = CachePolicy()
    lane: LaneName | None = None

    @model_validator(mode="after")
    def _one_route(self) -> ModelAlias:
        if bool(self.endpoints) == bool(self.targets):
            raise ValueError(
                f"model {self.name!r} needs exactly one of endpoints or targets "
                f"(got {'both' if self.endpoints else 'neither'})"
            )
        return self

    def route_targets(self) -> tuple[Target, ...]:
        return self.targets or tuple(Target(endpoint=e) for e in self.endpoints)


class ServerSettings(_Model):
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    #: Reload the config file when it changes on disk (standalone mode).
    watch_config: bool = True
    watch_interval_seconds: float = Field(default=1.0, gt=0, le=3600)


class Metadata(_Model):
    name: str = "default"
    namespace: str | None = None
    #: Set by the operator; standalone configs get a content hash instead.
    version: str | None = None


class RouterConfig(_Model):
    api_version: Literal["modelplane.io/v1alpha1"] = "modelplane.io/v1alpha1"
    kind: Literal["RouterConfig"] = "RouterConfig"
    metadata: Metadata = Metadata()
    server: ServerSettings = ServerSettings()
    endpoints: tuple[Endpoint, ...] = Field(min_length=1)
    models: tuple[ModelAlias, ...] = Field(min_length=1)
    #: Ordered routing rules; a request no rule matches takes its model alias's own route.
    rules: tuple[Rule, ...] = ()
    sensitivity: SensitivityPolicy = SensitivityPolicy()
    budget: BudgetState = BudgetState()
    #: Budgets the operator tracks and enforces with spend leases (empty when standalone).
    budgets: tuple[SpendBudget, ...] = ()
    #: The response store (routes enable caching with their own `cache` policy).
    cache: CacheStore = CacheStore()
    lanes: Lanes = Lanes()

    @model_validator(mode="after")
    def _references(self) -> RouterConfig:
        names = [e.name for e in self.endpoints]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate endpoint names: {', '.join(dupes)}")
        aliases = [m.name for m in self.models]
        dupes = sorted({n for n in aliases if aliases.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model alias names: {', '.join(dupes)}")
        known = set(names)
        for alias in self.models:
            missing = [t.endpoint for t in alias.route_targets() if t.endpoint not in known]
            if missing:
                raise ValueError(
                    f"model {alias.name!r} refers to unknown endpoint(s): {', '.join(missing)}"
                )
            _check_route(f"model {alias.name!r}", alias.strategy, alias.route_targets())
            _check_overflow(
                f"model {alias.name!r}",
                alias.overflow,
                alias.route_targets(),
                known,
                {c.name for c in self.sensitivity.classes},
            )
        self._check_rules(known, set(aliases))
        self._check_batch_api()
        budgets = [b.name for b in self.budgets]
        dupes = sorted({n for n in budgets if budgets.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate budget names: {', '.join(dupes)}")
        for budget in self.budgets:
            missing = [e for e in budget.endpoints if e not in known]
            if missing:
                raise ValueError(
                    f"budget {budget.name!r} refers to unknown endpoint(s): {', '.join(missing)}"
                )
        return self

    def _check_rules(self, endpoints: set[str], aliases: set[str]) -> None:
        rule_names = [r.name for r in self.rules]
        dupes = sorted({n for n in rule_names if rule_names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate rule names: {', '.join(dupes)}")
        classes = {c.name for c in self.sensitivity.classes}
        for rule in self.rules:
            where = f"rule {rule.name!r}"
            missing = [t.endpoint for t in rule.targets if t.endpoint not in endpoints]
            if missing:
                raise ValueError(f"{where} refers to unknown endpoint(s): {', '.join(missing)}")
            unknown = [m for m in rule.match.models if m not in aliases]
            if unknown:
                raise ValueError(f"{where} matches unknown model alias(es): {', '.join(unknown)}")
            unknown = [c for c in rule.match.data_classes if c not in classes]
            if unknown:
                raise ValueError(f"{where} matches unknown data class(es): {', '.join(unknown)}")
            _check_route(where, rule.strategy, rule.targets)
            _check_overflow(where, rule.overflow, rule.targets, endpoints, classes)

    def _check_batch_api(self) -> None:
        name = self.lanes.batch.batch_api_endpoint
        if name is None:
            return
        found = next((e for e in self.endpoints if e.name == name), None)
        if found is None:
            raise ValueError(f"lanes.batch.batchApiEndpoint refers to unknown endpoint {name!r}")
        if found.provider not in (Provider.OPENAI, Provider.OPENAI_COMPATIBLE):
            raise ValueError(
                f"lanes.batch.batchApiEndpoint {name!r} has provider {found.provider.value}; "
                "the Batch API pass-through needs an openai or openai-compatible endpoint"
            )

    def endpoint(self, name: str) -> Endpoint:
        for e in self.endpoints:
            if e.name == name:
                return e
        raise KeyError(name)

    def content_hash(self) -> str:
        """A stable hash of the config's content (secrets included, but only as a digest)."""
        data = self.model_dump(mode="json", by_alias=True, exclude={"metadata": {"version"}})
        for ep, raw in zip(self.endpoints, data["endpoints"], strict=True):
            if ep.api_key is not None and ep.api_key.value is not None:
                secret = ep.api_key.value.get_secret_value().encode()
                raw["apiKey"]["value"] = hashlib.sha256(secret).hexdigest()
        redis = self.cache.redis
        if redis is not None and redis.password is not None and redis.password.value is not None:
            secret = redis.password.value.get_secret_value().encode()
            data["cache"]["redis"]["password"]["value"] = hashlib.sha256(secret).hexdigest()
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]

    def version(self) -> str:
        return self.metadata.version or self.content_hash()


def _check_route(where: str, strategy: Strategy, targets: tuple[Target, ...]) -> None:
    names = [t.endpoint for t in targets]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{where} lists endpoint(s) more than once: {', '.join(dupes)}")
    if strategy is Strategy.WEIGHTED and not any(t.weight for t in targets):
        raise ValueError(f"{where}: strategy weighted needs a target with a weight above 0")
    if strategy is Strategy.COMPLEXITY_TIERS:
        untiered = [t.endpoint for t in targets if t.tier is None]
        if untiered:
            raise ValueError(
                f"{where}: strategy complexity-tiers needs a tier on every target "
                f"(missing on {', '.join(untiered)})"
            )


def _check_overflow(
    where: str,
    overflow: Overflow | None,
    targets: tuple[Target, ...],
    known: set[str],
    classes: set[str],
) -> None:
    if overflow is None:
        return
    unknown = [c for c in overflow.never_spill or () if c not in classes]
    if unknown:
        raise ValueError(
            f"{where}: overflow.neverSpill names unknown class(es): {', '.join(unknown)}"
        )
    names = [t.endpoint for t in overflow.targets]
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"{where}: overflow refers to unknown endpoint(s): {', '.join(missing)}")
    both = sorted(set(names) & {t.endpoint for t in targets})
    if both:
        raise ValueError(f"{where}: overflow targets are also route targets: {', '.join(both)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{where}: overflow lists endpoint(s) more than once: {', '.join(dupes)}")


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{where}: {err['msg']}")
    return "; ".join(lines)


def parse_config(data: object, source: str = "config") -> RouterConfig:
    """Validate a decoded document into a RouterConfig, or raise ConfigError saying why."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        config = RouterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_validation_error(exc)}") from None
    for ep in config.endpoints:
        if ep.api_key is not None:
            try:
                ep.api_key.resolve()
            except ConfigError as exc:
                raise ConfigError(f"{source}: endpoint {ep.name!r}: {exc}") from None
    redis = config.cache.redis
    if redis is not None and redis.password is not None:
        try:
            redis.password.resolve()
        except ConfigError as exc:
            raise ConfigError(f"{source}: cache.redis.password: {exc}") from None
    return config


def load_config_text(text: str, source: str = "config") -> RouterConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    return parse_config(data, source)


def load_config_file(path: Path) -> RouterConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return load_config_text(text, str(path))
