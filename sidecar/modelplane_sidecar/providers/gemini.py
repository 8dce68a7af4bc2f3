"""Google Gemini (`generateContent` / `streamGenerateContent`) behind the OpenAI chat API.

Works with Google AI Studio (`baseUrl: https://generativelanguage.googleapis.com/v1beta`) and
Vertex AI (`baseUrl: https://REGION-aiplatform.googleapis.com/v1/projects/P/locations/L/
publishers/google`): both take `{baseUrl}/models/{model}:generateContent`. The key is sent in the
`x-goog-api-key` header (option `auth: bearer` sends an OAuth token instead), never in the URL,
so it cannot leak into a logged URL or an error message.

Request: system/developer messages become `systemInstruction`; assistant turns have role `model`;
tool calls become `functionCall` parts and tool results `functionResponse` parts (named after the
call they answer); tools become `functionDeclarations` with their JSON schema as is; sampling
settings go in `generationConfig`. Response: text and function calls, `finishReason` (safety
blocks and a blocked prompt -> `content_filter`), usage (thinking tokens count as output). A
stream is SSE (`alt=sse`) of whole responses and has no end marker: it is complete once a
candidate reported its `finishReason`. Gemini's thought signatures ride along in tool-call ids so
that a later turn can hand them back.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import orjson

from ..config import Endpoint
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
)
from .openai_chat import (
    ChunkWriter,
    Image,
    ToolCall,
    arguments_object,
    function_tools,
    invalid,
    json_schema,
    max_tokens,
    merge_turn,
    messages_of,
    new_id,
    parse_json_object,
    parts,
    reject_unsupported,
    sse_json_objects,
    stop_sequences,
    system_text,
    text_of,
    tool_calls_of,
    tool_choice,
    translated_completion,
    unknown_role,
    walk_turns,
)
from .sse import SSEParser

NAME = "gemini"

FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "MODEL_ARMOR": "content_filter",
}
_ERROR_TYPES = {
    "INVALID_ARGUMENT": ("invalid_request_error", None),
    "FAILED_PRECONDITION": ("invalid_request_error", None),
    "UNAUTHENTICATED": ("invalid_request_error", "invalid_api_key"),
    "PERMISSION_DENIED": ("invalid_request_error", "permission_denied"),
    "NOT_FOUND": ("invalid_request_error", "model_not_found"),
    "RESOURCE_EXHAUSTED": ("requests", "rate_limit_exceeded"),
    "INTERNAL": ("server_error", None),
    "UNAVAILABLE": ("server_error", "overloaded"),
    "DEADLINE_EXCEEDED": ("server_error", "timeout"),
}
_CONTEXT_LENGTH = re.compile(
    r"exceeds the maximum number of tokens|input token count.*exceeds|context window", re.I
)
#: Separates a tool-call id from the Gemini thought signature carried inside it.
_SIGNATURE = "__thought__"


class GeminiAdapter(ChatAdapter):
    name = NAME

    def build_request(
        self,
        endpoint: Endpoint,
        credentials: Credentials,
        op: Operation,
        body: dict[str, Any],
        stream: bool,
    ) -> UpstreamRequest:
        headers = {"content-type": "application/json", **endpoint.headers}
        if credentials.api_key:
            if endpoint.options["auth"] == "bearer":
                headers["authorization"] = f"Bearer {credentials.api_key}"
            else:
                headers["x-goog-api-key"] = credentials.api_key
        model = endpoint.model if "/" in endpoint.model else "models/" + endpoint.model
        action = ":streamGenerateContent?alt=sse" if stream else ":generateContent"
        url = f"{endpoint.base_url}/{quote(model, safe='/')}{action}"
        return UpstreamRequest("POST", url, headers, orjson.dumps(generate_request(body)))

    def translate_response(
        self, endpoint: Endpoint, op: Operation, body: bytes, request_body: dict[str, Any]
    ) -> Translated:
        response = parse_json_object(body, "the Gemini response")
        blocked = _prompt_block(response)
        if blocked is not None:
            raise_if_content_policy_fallback(endpoint, f"Gemini blocked the prompt: {blocked}")
        texts: list[str] = []
        calls: list[ToolCall] = []
        reason = "content_filter" if blocked else "stop"
        candidates = response.get("candidates") or []
        if not candidates and not blocked:
            raise UpstreamFailure(FailureKind.PROTOCOL, "the Gemini response has no candidates")
        if candidates:
            candidate = candidates[0]
            for part in _parts(candidate):
                if isinstance(part.get("text"), str) and not part.get("thought"):
                    texts.append(part["text"])
                elif isinstance(part.get("functionCall"), dict):
                    calls.append(_tool_call(part, len(calls)))
            reason = _finish(candidate.get("finishReason"), bool(calls))
            if reason == "content_filter" and not texts:
                raise_if_content_policy_fallback(endpoint, "Gemini blocked the answer (safety)")
        usage = usage_from_gemini(response.get("usageMetadata"))
        ident = str(response.get("responseId") or new_id("chatcmpl"))
        model = str(response.get("modelVersion") or endpoint.model)
        return translated_completion(ident, model, texts, calls, reason, usage, request_body)

    def stream_translator(
        self, endpoint: Endpoint, op: Operation, request_body: dict[str, Any]
    ) -> GeminiStreamTranslator:
        return GeminiStreamTranslator(endpoint.model, request_body)

    def classify_error(
        self, endpoint: Endpoint, status: int, headers: Mapping[str, str], body: bytes
    ) -> UpstreamFailure:
        parsed = json_or_none(body)
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(parsed, list) and parsed and isinstance(parsed[0], dict):
            error = parsed[0].get("error")  # streamGenerateContent without alt=sse wraps it
        message = error.get("message") if isinstance(error, dict) else None
        grpc_status = error.get("status") if isinstance(error, dict) else None
        kind = status_kind(status)
        text = f"upstream answered HTTP {status}" + (f": {message}" if message else "")
        openai_type, code = _ERROR_TYPES.get(str(grpc_status), ("invalid_request_error", None))
        if kind is FailureKind.CLIENT_ERROR and message and _CONTEXT_LENGTH.search(message):
            kind, code = FailureKind.CONTEXT_LENGTH, "context_length_exceeded"
        client_body = openai_error_body(message or text, openai_type, code)
        return UpstreamFailure(kind, text, status, parse_retry_after(headers), client_body)


def usage_from_gemini(raw: object) -> Usage | None:
    if not isinstance(raw, dict) or raw.get("promptTokenCount") is None:
        return None
    return Usage(
        input_tokens=int(raw.get("promptTokenCount") or 0),
        output_tokens=int(raw.get("candidatesTokenCount") or 0)
        + int(raw.get("thoughtsTokenCount") or 0),
        cached_input_tokens=int(raw.get("cachedContentTokenCount") or 0),
    )


def _parts(candidate: Mapping[str, Any]) -> list[dict[str, Any]]:
    content = candidate.get("content")
    found = content.get("parts") if isinstance(content, dict) else None
    return [p for p in found if isinstance(p, dict)] if isinstance(found, list) else []


def _prompt_block(response: Mapping[str, Any]) -> str | None:
    feedback = response.get("promptFeedback")
    if isinstance(feedback, dict) and feedback.get("blockReason"):
        return str(feedback["blockReason"])
    return None


def _finish(reason: object, called: bool) -> str:
    finish = FINISH_REASONS.get(str(reason), "stop")
    return "tool_calls" if called and finish == "stop" else finish


def _tool_call(part: Mapping[str, Any], index: int) -> ToolCall:
    call = part["functionCall"]
    ident = str(call.get("id") or new_id(f"call{index}"))
    if part.get("thoughtSignature"):
        ident += _SIGNATURE + str(part["thoughtSignature"])
    arguments = orjson.dumps(call.get("args") or {}).decode()
    return ToolCall(ident, str(call.get("name")), arguments)


# -- request ---------------------------------------------------------------------------------


def generate_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """The `generateContent` body for an OpenAI chat request."""
    reject_unsupported(body, NAME)
    messages = messages_of(body)
    out: dict[str, Any] = {"contents": _contents(messages)}
    system = system_text(messages)
    if system:
        out["systemInstruction"] = {"parts": [{"text": system}]}
    tools = function_tools(body, NAME)
    if tools:
        declarations = []
        for tool in tools:
            declaration: dict[str, Any] = {
                "name": tool.name,
                "parametersJsonSchema": tool.parameters,
            }
            if tool.description:
                declaration["description"] = tool.description
            declarations.append(declaration)
        out["tools"] = [{"functionDeclarations": declarations}]
    choice = tool_choice(body)
    if choice is not None:
        mode, name = choice
        config: dict[str, Any] = {
            "mode": {"auto": "AUTO", "none": "NONE", "required": "ANY", "function": "ANY"}[mode]
        }
        if name is not None:
            config["allowedFunctionNames"] = [name]
        out["toolConfig"] = {"functionCallingConfig": config}
    generation = _generation_config(body)
    if generation:
        out["generationConfig"] = generation
    return out


def _generation_config(body: Mapping[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
        ("seed", "seed"),
    ):
        if body.get(ours) is not None:
            config[theirs] = body[ours]
    limit = max_tokens(body)
    if limit is not None:
        config["maxOutputTokens"] = limit
    stops = stop_sequences(body)
    if stops:
        config["stopSequences"] = stops
    schema = json_schema(body)
    if schema is not None:
        config["responseMimeType"] = "application/json"
        config["responseJsonSchema"] = schema
    return config


def _contents(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool-call id -> function name, for the results
    for index, message in walk_turns(messages):
        role = message["role"]
        out_parts: list[dict[str, Any]]
        if role == "user":
            out_parts = [_part(p) for p in parts(message.get("content"), NAME)]
            turn_role = "user"
        elif role == "assistant":
            out_parts = [_part(p) for p in parts(message.get("content"), NAME)]
            for call in tool_calls_of(message):
                names[call.id] = call.name
                out_parts.append(_function_call(call))
            turn_role = "model"
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in names:
                raise invalid(
                    f"messages[{index}]: tool message answers no earlier tool call", "messages"
                )
            result = text_of(message.get("content"), NAME)
            out_parts = [
                {"functionResponse": {"name": names[call_id], "response": _response(result)}}
            ]
            turn_role = "user"
        else:
            raise unknown_role(message, index)
        merge_turn(contents, turn_role, out_parts, key="parts")
    return contents


def _function_call(call: ToolCall) -> dict[str, Any]:
    part: dict[str, Any] = {"functionCall": {"name": call.name, "args": arguments_object(call)}}
    _, sep, signature = call.id.partition(_SIGNATURE)
    if sep:
        part["thoughtSignature"] = signature
    return part


def _response(result: str) -> dict[str, Any]:
    try:
        value = orjson.loads(result)
    except orjson.JSONDecodeError:
        return {"result": result}
    return value if isinstance(value, dict) else {"result": value}


def _part(part: str | Image) -> dict[str, Any]:
    if isinstance(part, str):
        return {"text": part}
    if part.url is not None:
        mime = mimetypes.guess_type(part.url.split("?")[0])[0] or "image/jpeg"
        return {"fileData": {"mimeType": mime, "fileUri": part.url}}
    return {"inlineData": {"mimeType": part.media_type, "data": part.data}}


# -- stream ----------------------------------------------------------------------------------


class GeminiStreamTranslator:
    """Gemini SSE responses in, OpenAI `chat.completion.chunk` frames out."""

    __slots__ = (
        "_calls",
        "_finished",
        "_parser",
        "_request_body",
        "_started",
        "_writer",
        "usage",
    )

    def __init__(self, model: str, request_body: dict[str, Any]) -> None:
        self._parser = SSEParser()
        self._request_body = request_body
        self._writer = ChunkWriter(model, request_body)
        self._calls = 0
        self._started = False
        self._finished = False
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        responses = sse_json_objects(self._parser, chunk, "a Gemini stream event")
        return b"".join([self._response(response) for response in responses])

    def _response(self, response: dict[str, Any]) -> bytes:
        writer = self._writer
        if "error" in response:
            error = response["error"] if isinstance(response["error"], dict) else {}
            raise UpstreamFailure(
                FailureKind.SERVER_ERROR,
                f"upstream reported an error mid-stream: {error.get('message')}",
            )
        out: list[bytes] = []
        if not self._started:
            self._started = True
            out.append(writer.role())
        usage = usage_from_gemini(response.get("usageMetadata"))
        if usage is not None:
            self.usage = usage
        if _prompt_block(response) is not None:
            self._finished = True
            out.append(writer.finish("content_filter"))
        for candidate in response.get("candidates") or []:
            for part in _parts(candidate):
                if isinstance(part.get("text"), str) and not part.get("thought"):
                    out.append(writer.text(part["text"]))
                elif isinstance(part.get("functionCall"), dict):
                    call = _tool_call(part, self._calls)
                    out.append(writer.tool_start(self._calls, call.id, call.name, call.arguments))
                    self._calls += 1
            if candidate.get("finishReason") and not self._finished:
                self._finished = True
                out.append(writer.finish(_finish(candidate["finishReason"], self._calls > 0)))
        return b"".join(out)

    def finish(self) -> bytes:
        if not self._finished:
            raise UpstreamFailure(
                FailureKind.PROTOCOL, "upstream closed the stream before any finishReason"
            )
        if self.usage is None:
            self.usage = estimated_usage(self._request_body, self._writer.chars)
        return self._writer.done(self.usage)
