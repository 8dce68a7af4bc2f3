"""Amazon Bedrock's Converse / ConverseStream API behind the OpenAI chat API.

`POST {baseUrl}/model/{modelId}/converse` (and `/converse-stream`), with `baseUrl` the regional
runtime (`https://bedrock-runtime.REGION.amazonaws.com`) and `modelId` a model or inference
profile id or ARN. Requests are signed with SigV4 (service `bedrock`; credentials from the
source `aws_credentials.py` picks: static keys, or temporary ones from IRSA or EKS Pod Identity
kept fresh off the request path; region from the `region` option, the endpoint's `region`, or
`baseUrl`), or, when the endpoint has an `apiKey`, sent with that Bedrock API key as a bearer
token. `count_tokens_request` serves the Anthropic front door's `/v1/messages/count_tokens`
with Bedrock's CountTokens (`POST /model/{modelId}/count-tokens`, input in Converse form).

Request: system/developer messages become `system`, content becomes Converse content blocks
(text, base64 images, `toolUse`, `toolResult`), sampling settings go in `inferenceConfig`, tools
in `toolConfig`, `response_format` in `outputConfig`. Response: text and tool uses, `stopReason`
(guardrail and content filters -> `content_filter`), usage with cache reads and writes. Streams
arrive in AWS event-stream framing (`eventstream.py`) and are translated message by message;
exceptions inside the stream are failures, and a stream without `messageStop` is truncated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import orjson
from yarl import URL

from ..config import ConfigError, Endpoint
from .aws_credentials import aws_credentials
from .base import (
    ChatAdapter,
    Credentials,
    FailureKind,
    Operation,
    Translated,
    UpstreamFailure,
    UpstreamRequest,
    Usage,
    estimated_usage,
    json_or_none,
    openai_error_body,
    parse_retry_after,
    raise_if_content_policy_fallback,
    status_kind,
    unsupported,
    usage_with_cache,
)
from .eventstream import EventMessage, EventStreamDecoder
from .openai_chat import (
    ChunkWriter,
    Image,
    ToolCall,
    arguments_object,
    function_tools,
    json_schema,
    max_tokens,
    merge_turn,
    messages_of,
    new_id,
    parse_json_object,
    parts,
    reject_unsupported,
    stop_sequences,
    system_text,
    text_of,
    token_count,
    tool_call_id,
    tool_calls_of,
    tool_choice,
    translated_completion,
    unknown_role,
    walk_turns,
)
from .sigv4 import sign

NAME = "bedrock"

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}
_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/gif": "gif", "image/webp": "webp"}
_REGION_IN_URL = re.compile(r"bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com")
_CONTEXT_LENGTH = re.compile(
    r"too long|too many (?:input )?tokens|context (?:window|length)|exceeds? the max", re.I
)
#: The geography prefix of a cross-region inference profile id (`us.`, `eu.`, `global.` ...).
_PROFILE_PREFIX = re.compile(r"^(?:us|eu|apac|ap|jp|au|ca|us-gov|global)\.([a-z0-9-]+\..+)$")
#: Error types that say "busy", whatever the status code says.
_THROTTLED = {"ThrottlingException", "ServiceQuotaExceededException", "ModelNotReadyException"}


class BedrockAdapter(ChatAdapter):
    name = NAME

    def credentials(self, endpoint: Endpoint, api_key: str | None) -> Credentials:
        region = region_of(endpoint)
        if region is None:
            raise ConfigError(
                f"endpoint {endpoint.name!r}: no AWS region: set options.region or region, or "
                "use a baseUrl like https://bedrock-runtime.REGION.amazonaws.com"
            )
        source = endpoint.options["credentialSource"]
        if api_key:
            if source != "auto":
                raise ConfigError(
                    f"endpoint {endpoint.name!r}: an apiKey (a Bedrock API key) and "
                    f"options.credentialSource {source!r} exclude each other; keep one"
                )
            return Credentials(api_key)
        try:
            return aws_credentials(source, endpoint.options["profile"], region)
        except ConfigError as exc:
            raise ConfigError(f"endpoint {endpoint.name!r}: {exc}") from None

    def build_request(
        self,
        endpoint: Endpoint,
        credentials: Credentials,
        op: Operation,
        body: dict[str, Any],
        stream: bool,
    ) -> UpstreamRequest:
        payload = orjson.dumps(converse_request(body, endpoint.options["maxTokens"]))
        action = "converse-stream" if stream else "converse"
        return _signed(endpoint, credentials, endpoint.model, action, payload, stream)

    def count_tokens_request(
        self, endpoint: Endpoint, credentials: Credentials, body: dict[str, Any]
    ) -> UpstreamRequest:
        converse = converse_request(body, None)
        counted = {k: converse[k] for k in ("messages", "system", "toolConfig") if k in converse}
        payload = orjson.dumps({"input": {"converse": counted}})
        model = endpoint.options["countTokensModel"] or count_tokens_model(endpoint.model)
        return _signed(endpoint, credentials, model, "count-tokens", payload, False)

    def count_tokens_result(self, body: bytes) -> int:
        return token_count(body, "inputTokens", "the Bedrock CountTokens response")

    def translate_response(
        self, endpoint: Endpoint, op: Operation, body: bytes, request_body: dict[str, Any]
    ) -> Translated:
        response = parse_json_object(body, "the Bedrock response")
        output = response.get("output")
        message = output.get("message") if isinstance(output, dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            raise UpstreamFailure(FailureKind.PROTOCOL, "the Bedrock response has no message")
        reason = str(response.get("stopReason"))
        finish = FINISH_REASONS.get(reason, "stop")
        if finish == "content_filter":
            raise_if_content_policy_fallback(endpoint, f"Bedrock stopped the answer: {reason}")
        texts: list[str] = []
        calls: list[ToolCall] = []
        for block in message["content"]:
            if not isinstance(block, dict):
                continue
            if isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif isinstance(block.get("toolUse"), dict):
                use = block["toolUse"]
                arguments = orjson.dumps(use.get("input") or {}).decode()
                calls.append(ToolCall(str(use.get("toolUseId")), str(use.get("name")), arguments))
        usage = usage_from_bedrock(response.get("usage"))
        ident = new_id("chatcmpl")
        return translated_completion(
            ident, endpoint.model, texts, calls, finish, usage, request_body
        )

    def stream_translator(
        self, endpoint: Endpoint, op: Operation, request_body: dict[str, Any]
    ) -> BedrockStreamTranslator:
        return BedrockStreamTranslator(endpoint.model, request_body)

    def classify_error(
        self, endpoint: Endpoint, status: int, headers: Mapping[str, str], body: bytes
    ) -> UpstreamFailure:
        error_type = headers.get("x-amzn-errortype", "").partition(":")[0]
        message = None
        parsed = json_or_none(body)
        if isinstance(parsed, dict):
            raw = parsed.get("message") or parsed.get("Message")
            message = raw if isinstance(raw, str) else None
            error_type = error_type or str(parsed.get("__type", "")).rpartition("#")[2]
        kind = status_kind(status)
        if error_type in _THROTTLED:
            kind = FailureKind.RATE_LIMIT
        detail = f"{error_type}: {message}" if error_type and message else message or error_type
        text = f"upstream answered HTTP {status}" + (f": {detail}" if detail else "")
        code = error_type or None
        openai_type = "invalid_request_error" if status < 500 else "server_error"
        if kind is FailureKind.RATE_LIMIT:
            openai_type, code = "requests", "rate_limit_exceeded"
        elif kind is FailureKind.CLIENT_ERROR and message and _CONTEXT_LENGTH.search(message):
            kind, code = FailureKind.CONTEXT_LENGTH, "context_length_exceeded"
        client_body = openai_error_body(message or text, openai_type, code)
        return UpstreamFailure(kind, text, status, parse_retry_after(headers), client_body)


def _signed(
    endpoint: Endpoint,
    credentials: Credentials,
    model: str,
    action: str,
    payload: bytes,
    stream: bool,
) -> UpstreamRequest:
    # Signed exactly as aiohttp (yarl) will send it: `:` in a model ARN is not re-quoted.
    url = str(URL(f"{endpoint.base_url}/model/{quote(model, safe='')}/{action}"))
    headers = {"content-type": "application/json", **endpoint.headers}
    if stream:
        headers["accept"] = "application/vnd.amazon.eventstream"
    if credentials.api_key:
        headers["authorization"] = f"Bearer {credentials.api_key}"
    elif credentials.aws is not None:
        region = region_of(endpoint) or ""
        now = datetime.now(UTC)
        headers.update(sign("POST", url, headers, payload, credentials.aws, region, NAME, now))
    return UpstreamRequest("POST", url, headers, payload)


def count_tokens_model(model: str) -> str:
    """The foundation-model id CountTokens takes for `model`, which may be a cross-region
    inference profile (`eu.anthropic.claude-...`) or its ARN: CountTokens refuses those."""
    model = model.rpartition("/")[2] if model.startswith("arn:") else model
    found = _PROFILE_PREFIX.match(model)
    return found.group(1) if found else model


def region_of(endpoint: Endpoint) -> str | None:
    region = endpoint.options.get("region") or endpoint.region
    if region:
        return str(region)
    found = _REGION_IN_URL.search(endpoint.base_url)
    return found.group(1) if found else None


def usage_from_bedrock(raw: object) -> Usage | None:
    return usage_with_cache(
        raw, "inputTokens", "outputTokens", "cacheReadInputTokens", "cacheWriteInputTokens"
    )


# -- request ---------------------------------------------------------------------------------


def converse_request(body: Mapping[str, Any], default_max_tokens: int | None) -> dict[str, Any]:
    """The Converse body for an OpenAI chat request (the model id goes in the URL)."""
    reject_unsupported(body, NAME)
    messages = messages_of(body)
    out: dict[str, Any] = {"messages": _turns(messages)}
    system = system_text(messages)
    if system:
        out["system"] = [{"text": system}]
    inference: dict[str, Any] = {}
    limit = max_tokens(body) or default_max_tokens
    if limit is not None:
        inference["maxTokens"] = limit
    if body.get("temperature") is not None:
        inference["temperature"] = body["temperature"]
    if body.get("top_p") is not None:
        inference["topP"] = body["top_p"]
    stops = stop_sequences(body)
    if stops:
        inference["stopSequences"] = stops
    if inference:
        out["inferenceConfig"] = inference
    tools = function_tools(body, NAME)
    if tools:
        config: dict[str, Any] = {
            "tools": [
                {
                    "toolSpec": {
                        "name": t.name,
                        **({"description": t.description} if t.description else {}),
                        "inputSchema": {"json": t.parameters},
                    }
                }
                for t in tools
            ]
        }
        choice = tool_choice(body)
        if choice is not None and choice[0] != "none":
            mode, name = choice
            config["toolChoice"] = (
                {"tool": {"name": name}}
                if mode == "function"
                else {mode.replace("required", "any"): {}}
            )
        out["toolConfig"] = config
    schema = json_schema(body)
    if schema is not None:
        out["outputConfig"] = {
            "textFormat": {
                "type": "json_schema",
                "structure": {
                    "jsonSchema": {"schema": orjson.dumps(schema).decode(), "name": "output"}
                },
            }
        }
    user = body.get("user")
    if isinstance(user, str) and user:
        out["requestMetadata"] = {"user": user[:256]}
    return out


def _turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    for index, message in walk_turns(messages):
        role = message["role"]
        if role in ("user", "assistant"):
            blocks = [_block(p) for p in parts(message.get("content"), NAME)]
            if role == "assistant":
                for call in tool_calls_of(message):
                    use = {"toolUseId": call.id, "name": call.name, "input": arguments_object(call)}
                    blocks.append({"toolUse": use})
        elif role == "tool":
            result = {
                "toolUseId": tool_call_id(message, index),
                "content": [{"text": text_of(message.get("content"), NAME)}],
            }
            blocks, role = [{"toolResult": result}], "user"
        else:
            raise unknown_role(message, index)
        merge_turn(turns, role, blocks)
    return turns


def _block(part: str | Image) -> dict[str, Any]:
    if isinstance(part, str):
        return {"text": part}
    if part.url is not None:
        raise unsupported(NAME, "images by URL (Converse takes inline bytes or S3 only)")
    image_format = _FORMATS.get(part.media_type or "")
    if image_format is None:
        raise unsupported(NAME, f"images of type {part.media_type!r}")
    return {"image": {"format": image_format, "source": {"bytes": part.data}}}


# -- stream ----------------------------------------------------------------------------------


class BedrockStreamTranslator:
    """ConverseStream event-stream messages in, OpenAI `chat.completion.chunk` frames out."""

    __slots__ = (
        "_decoder",
        "_done",
        "_request_body",
        "_stopped",
        "_tool_index",
        "_writer",
        "usage",
    )

    def __init__(self, model: str, request_body: dict[str, Any]) -> None:
        self._decoder = EventStreamDecoder()
        self._request_body = request_body
        self._writer = ChunkWriter(model, request_body)
        #: Converse content-block index -> OpenAI tool-call index.
        self._tool_index: dict[int, int] = {}
        self._stopped = False
        self._done = False
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        return b"".join(self._message(m) for m in self._decoder.feed(chunk))

    def _message(self, message: EventMessage) -> bytes:
        message_type = message.header(":message-type")
        if message_type != "event":
            raise _stream_failure(message)
        event = message.header(":event-type")
        data = parse_json_object(message.payload, f"the Bedrock {event} event")
        writer = self._writer
        if event == "messageStart":
            return writer.role()
        if event == "contentBlockStart":
            start = data.get("start")
            use = start.get("toolUse") if isinstance(start, dict) else None
            if isinstance(use, dict):
                index = len(self._tool_index)
                self._tool_index[int(data.get("contentBlockIndex", 0))] = index
                return writer.tool_start(index, str(use.get("toolUseId")), str(use.get("name")))
            return b""
        if event == "contentBlockDelta":
            delta = data.get("delta")
            if not isinstance(delta, dict):
                return b""
            if isinstance(delta.get("text"), str):
                return writer.text(delta["text"])
            use = delta.get("toolUse")
            tool = self._tool_index.get(int(data.get("contentBlockIndex", 0)))
            if isinstance(use, dict) and tool is not None:
                return writer.tool_arguments(tool, str(use.get("input") or ""))
            return b""
        if event == "messageStop":
            self._stopped = True
            return writer.finish(FINISH_REASONS.get(str(data.get("stopReason")), "stop"))
        if event == "metadata":
            self.usage = usage_from_bedrock(data.get("usage"))
            if self._stopped and not self._done:
                self._done = True
                return writer.done(self.usage or self._estimate())
        return b""  # contentBlockStop, and event types added later

    def _estimate(self) -> Usage:
        return estimated_usage(self._request_body, self._writer.chars)

    def finish(self) -> bytes:
        if not self._stopped or self._decoder.pending:
            raise UpstreamFailure(
                FailureKind.PROTOCOL, "upstream closed the event stream before messageStop"
            )
        if self._done:
            return b""
        self._done = True
        self.usage = self.usage or self._estimate()
        return self._writer.done(self.usage)


def _stream_failure(message: EventMessage) -> UpstreamFailure:
    if message.header(":message-type") == "exception":
        name = message.header(":exception-type") or "exception"
        try:
            detail = orjson.loads(message.payload).get("message")
        except (orjson.JSONDecodeError, AttributeError):
            detail = None
    else:
        name = message.header(":error-code") or "error"
        detail = message.header(":error-message")
    throttled = name[:1].upper() + name[1:] in _THROTTLED  # in streams: throttlingException
    kind = FailureKind.RATE_LIMIT if throttled else FailureKind.SERVER_ERROR
    return UpstreamFailure(kind, f"upstream reported {name} mid-stream: {detail}")
