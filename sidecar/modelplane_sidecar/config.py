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
    #: `inferenceConfig.maxTokens` when the app sets none (the model's default otherwise).
    max_tokens: int | None = Field(default=None, gt=0)


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
    #: Extra headers sent upstream on every call (e.g. an organisation id). Not secret.
    headers: dict[str, str] = Field(default_factory=dict)
    #: Provider-specific settings (e.g. Azure's apiVersion/deployment, Bedrock's region): see
    #: the `*Options` models above. Validated on load and stored with every default filled in.
    options: dict[str, Any] = Field(default_factory=dict, validate_default=True)

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


class ModelAlias(_Model):
    """A model name apps ask for, mapped to an ordered fallback chain of endpoints."""

    name: NonEmptyName
    endpoints: tuple[NonEmptyName, ...] = Field(min_length=1)
    retry: RetryPolicy = RetryPolicy()
    timeout: TimeoutPolicy = TimeoutPolicy()
    circuit_breaker: CircuitBreakerPolicy = CircuitBreakerPolicy()
    description: str | None = None


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
            missing = [e for e in alias.endpoints if e not in known]
            if missing:
                raise ValueError(
                    f"model {alias.name!r} refers to unknown endpoint(s): {', '.join(missing)}"
                )
        return self

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
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]

    def version(self) -> str:
        return self.metadata.version or self.content_hash()


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
