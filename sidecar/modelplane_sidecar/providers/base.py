"""The one small interface every provider adapter implements.

Apps speak OpenAI's API to the sidecar; each adapter translates one OpenAI operation into its
provider's wire format and back (like Envoy AI Gateway's translators): the request body and
headers, a complete response body, a stream of chunks, and an error response. Adding a provider
means adding one module that implements `Adapter` and registering it in `providers/__init__.py`.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import orjson

from ..config import Endpoint


class Operation(StrEnum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


class FailureKind(StrEnum):
    """Why an attempt failed; decides retry, fallback and what the client is told."""

    CONNECT = "connect"
    TIMEOUT = "timeout"
    RATE_LIMIT = "rate-limit"
    SERVER_ERROR = "server-error"
    #: The prompt does not fit this endpoint; another endpoint with a larger window may serve it.
    CONTEXT_LENGTH = "context-length"
    #: A 4xx the client caused (bad parameter, auth, content policy): passed through, no fallback.
    CLIENT_ERROR = "client-error"
    #: The upstream answered 2xx but the body or stream was not what its protocol promises.
    PROTOCOL = "protocol"
    #: The provider's content policy refused the prompt, and the endpoint is configured
    #: (`options.contentPolicy: fallback`) to let another endpoint try it.
    CONTENT_POLICY = "content-policy"
    #: This provider's API cannot express the request (e.g. `n` > 1 on Anthropic); nothing was
    #: sent, and another endpoint of the chain may serve it.
    UNSUPPORTED = "unsupported"


#: Failures that end the attempt at one endpoint without a verdict on the request: the next
#: candidate may serve it, and when none can, the app gets this endpoint's own answer.
ANOTHER_ENDPOINT_MAY_SERVE = frozenset(
    {FailureKind.CONTEXT_LENGTH, FailureKind.CONTENT_POLICY, FailureKind.UNSUPPORTED}
)


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    #: True when the provider reported nothing and these numbers are the router's estimate.
    estimated: bool = False


@dataclass(frozen=True, slots=True)
class AwsCredentials:
    """AWS keys for SigV4 signing (Bedrock), resolved once when a config is loaded."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What an adapter authenticates its requests with, resolved once per config snapshot."""

    #: An API key or bearer token, sent the way the provider expects it.
    api_key: str | None = field(default=None, repr=False)
    aws: AwsCredentials | None = None
    #: Credentials that expire (e.g. AWS keys from IRSA): the forwarder asks this for the
    #: current ones before every attempt, and hands those to `build_request`.
    refreshing: RefreshingCredentials | None = field(default=None, repr=False)

    async def current(self, wait_seconds: float) -> Credentials:
        """The credentials to sign a request with now: these, or the refreshing ones' current
        keys (waiting at most `wait_seconds` for a refresh that must finish first)."""
        if self.refreshing is None:
            return self
        return await self.refreshing.current(wait_seconds)

    def secrets(self) -> tuple[str, ...]:
        """Every secret value in here, to scrub from anything an upstream echoes back."""
        found = [self.api_key]
        if self.aws is not None:
            # The key id is not secret to AWS, but it names the key: scrubbed with it.
            found += [self.aws.access_key_id, self.aws.secret_access_key, self.aws.session_token]
        if self.refreshing is not None:
            found += self.refreshing.secrets()
        return tuple(s for s in found if s)


class RefreshingCredentials(Protocol):
    """Credentials kept fresh off the request path (`aws_credentials.TemporaryAwsCredentials`)."""

    async def current(self, wait_seconds: float) -> Credentials:
        """Credentials good for a request now (waits at most `wait_seconds` for a refresh);
        raises UpstreamFailure naming the source when there are none."""
        ...

    def secrets(self) -> tuple[str, ...]:
        """The secret values fetched so far that an upstream may still echo (the keys in hand
        and the ones they replaced), to scrub like static keys."""
        ...


@dataclass(slots=True)
class UpstreamRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class UpstreamFailure(Exception):
    """A classified failure of one attempt at one endpoint."""

    kind: FailureKind
    message: str
    #: HTTP status the upstream answered with, if it answered at all.
    status: int | None = None
    retry_after: float | None = None
    #: An OpenAI-shaped error body to hand to the client unchanged when the failure is final.
    client_body: bytes | None = None

    def __str__(self) -> str:
        return self.message


@dataclass(slots=True)
class Translated:
    """A complete upstream response turned into the OpenAI body the client receives."""

    body: bytes
    usage: Usage = field(default_factory=Usage)


class StreamTranslator(Protocol):
    """Turns upstream stream bytes into OpenAI `chat.completion.chunk` SSE frames."""

    usage: Usage | None

    def feed(self, chunk: bytes) -> bytes:
        """Consume raw upstream bytes; return SSE bytes ready for the client (maybe empty).

        Raises UpstreamFailure when the upstream reports an error inside the stream.
        """
        ...

    def finish(self) -> bytes:
        """The upstream closed: return any final frames, or raise UpstreamFailure when the
        stream ended before the protocol's end marker (a truncated stream)."""
        ...


class Adapter(Protocol):
    """Translates between the OpenAI API the app speaks and one provider's API."""

    name: str

    def supports(self, op: Operation) -> bool: ...

    def credentials(self, endpoint: Endpoint, api_key: str | None) -> Credentials:
        """Resolve the endpoint's credentials once per config (raises ConfigError if missing)."""
        ...

    def build_request(
        self,
        endpoint: Endpoint,
        credentials: Credentials,
        op: Operation,
        body: dict[str, Any],
        stream: bool,
    ) -> UpstreamRequest: ...

    def translate_response(
        self, endpoint: Endpoint, op: Operation, body: bytes, request_body: dict[str, Any]
    ) -> Translated:
        """Turn a 2xx body into the OpenAI body for the app; may raise UpstreamFailure."""
        ...

    def stream_translator(
        self, endpoint: Endpoint, op: Operation, request_body: dict[str, Any]
    ) -> StreamTranslator: ...

    def classify_error(
        self, endpoint: Endpoint, status: int, headers: Mapping[str, str], body: bytes
    ) -> UpstreamFailure: ...


@runtime_checkable
class TokenCounter(Protocol):
    """An adapter whose provider counts a prompt's tokens without running the model (the
    Anthropic front door's `/v1/messages/count_tokens`)."""

    def count_tokens_request(
        self, endpoint: Endpoint, credentials: Credentials, body: dict[str, Any]
    ) -> UpstreamRequest:
        """The upstream request counting the tokens of OpenAI chat request `body`."""
        ...

    def count_tokens_result(self, body: bytes) -> int:
        """The input token count in a 2xx answer; raises UpstreamFailure if there is none."""
        ...


class ChatAdapter:
    """Defaults for adapters of chat-only APIs that authenticate with one key or token."""

    def supports(self, op: Operation) -> bool:
        return op is Operation.CHAT

    def credentials(self, endpoint: Endpoint, api_key: str | None) -> Credentials:
        return Credentials(api_key)


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def status_kind(status: int) -> FailureKind:
    """The retry class of an HTTP status shared by most providers."""
    if status == 429:
        return FailureKind.RATE_LIMIT
    if status in (408,):
        return FailureKind.TIMEOUT
    if status >= 500:
        return FailureKind.SERVER_ERROR
    return FailureKind.CLIENT_ERROR


def usage_with_cache(
    raw: object, input_key: str, output_key: str, cache_read_key: str, cache_write_key: str
) -> Usage | None:
    """OpenAI-style usage from a provider that counts cache reads and writes apart from the
    other prompt tokens (Anthropic, Bedrock): input counts every prompt token. None when the
    provider reported no input count."""
    if not isinstance(raw, dict) or raw.get(input_key) is None:
        return None
    cache_read = int(raw.get(cache_read_key) or 0)
    cache_write = int(raw.get(cache_write_key) or 0)
    return Usage(
        input_tokens=int(raw.get(input_key) or 0) + cache_read + cache_write,
        output_tokens=int(raw.get(output_key) or 0),
        cached_input_tokens=cache_read,
        cache_write_tokens=cache_write,
    )


def estimate_tokens(text_chars: int) -> int:
    """A provider-neutral token estimate: about four characters per token for English text."""
    return (text_chars + 3) // 4


def estimate_input_tokens(request_body: Mapping[str, Any]) -> int:
    """Estimate the prompt's tokens from the OpenAI request (messages, prompt or input)."""
    for key in ("messages", "prompt", "input"):
        value = request_body.get(key)
        if isinstance(value, str):
            return estimate_tokens(len(value))
        if value is not None:
            return estimate_tokens(len(orjson.dumps(value)))
    return 0


def estimated_usage(request_body: Mapping[str, Any], output_chars: int) -> Usage:
    """Usage for a response whose provider reported none, marked as the router's estimate."""
    return Usage(
        input_tokens=estimate_input_tokens(request_body),
        output_tokens=estimate_tokens(output_chars),
        estimated=True,
    )


def json_or_none(body: bytes) -> object:
    """An error body as JSON, or None when it is empty or not JSON (errors are read leniently)."""
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None


def content_policy_failure(
    endpoint: Endpoint, message: str, status: int | None = None, client_body: bytes | None = None
) -> UpstreamFailure:
    """A content-policy refusal: passed to the app, or another endpoint tries, per endpoint."""
    fallback = endpoint.options.get("contentPolicy") == "fallback"
    kind = FailureKind.CONTENT_POLICY if fallback else FailureKind.CLIENT_ERROR
    return UpstreamFailure(kind, message, status, None, client_body)


def raise_if_content_policy_fallback(endpoint: Endpoint, message: str) -> None:
    """A refusal inside a 2xx answer: raised only when the endpoint lets another endpoint try
    (`contentPolicy: fallback`); otherwise the refusal is the answer the app receives."""
    refusal = content_policy_failure(endpoint, message)
    if refusal.kind is FailureKind.CONTENT_POLICY:
        raise refusal


def unsupported(provider: str, what: str) -> UpstreamFailure:
    """The request asks for something this provider's API cannot express."""
    return UpstreamFailure(
        FailureKind.UNSUPPORTED, f"{provider} cannot serve this request: {what}", 400
    )


def openai_error_body(message: str, type: str, code: str | None = None) -> bytes:
    """An OpenAI-shaped error body, for translating other providers' errors."""
    return orjson.dumps({"error": {"message": message, "type": type, "param": None, "code": code}})
