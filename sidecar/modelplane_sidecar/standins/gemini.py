"""A local stand-in for Google's Gemini API, for tests and demos.

Serves `POST .../models/{model}:generateContent` and `:streamGenerateContent?alt=sse` under the
Google AI Studio prefixes (`/v1beta`, `/v1`; key in `x-goog-api-key`) and the Vertex AI prefix
(`/v1/projects/{p}/locations/{l}/publishers/google`, OAuth bearer token). Bodies are validated
with the `google-genai` SDK's own models (unknown fields are rejected, as the API does) and
answers are built from them, dumped with the API's camelCase names. Behaviours as for the OpenAI
stand-in, plus `kind="tool"` (a functionCall of the first declared function), `kind="safety"`
(the answer is blocked: finishReason SAFETY) and `kind="blocked"` (the prompt is blocked:
promptFeedback.blockReason, no candidates).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from google.genai import types
from pydantic import BaseModel, ValidationError

from .scripted import Behaviour, ScriptedStandIn, cut_here, drop_connection, json_error

_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_MESSAGES = {
    429: "Resource has been exhausted (e.g. check quota).",
    500: "An internal error has occurred. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
}
#: Top-level request fields and the SDK model (or list of models) each must validate as.
_FIELDS: dict[str, tuple[type[BaseModel], bool]] = {
    "contents": (types.Content, True),
    "systemInstruction": (types.Content, False),
    "tools": (types.Tool, True),
    "toolConfig": (types.ToolConfig, False),
    "generationConfig": (types.GenerationConfig, False),
    "safetySettings": (types.SafetySetting, True),
}


@dataclass
class GeminiStandIn(ScriptedStandIn):
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1beta/models/{call}", self._generate)
        app.router.add_post("/v1/models/{call}", self._generate)
        app.router.add_post(
            "/v1/projects/{project}/locations/{location}/publishers/google/models/{call}",
            self._generate,
        )
        return app

    def auth_error(self, request: web.Request, raw: bytes) -> web.HTTPException | None:
        if self.api_key is None:
            return None
        if request.path.startswith("/v1/projects/"):
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                return self.error(
                    401,
                    "Request had invalid authentication credentials. Expected OAuth 2 access "
                    "token, login cookie or other valid authentication credential.",
                )
            return None
        given = request.headers.get("x-goog-api-key") or request.query.get("key")
        if given is None:
            return self.error(
                403,
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API.",
            )
        if given != self.api_key:
            return self.error(400, "API key not valid. Please pass a valid API key.")
        return None

    def error(
        self, status: int, message: str | None = None, headers: dict[str, str] | None = None
    ) -> web.HTTPException:
        body = {
            "error": {
                "code": status,
                "message": message or _MESSAGES.get(status, f"Stand-in error {status}"),
                "status": _STATUS.get(status, "UNKNOWN"),
            }
        }
        return json_error(status, body, headers)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["call"].partition(":")
        if method not in ("generateContent", "streamGenerateContent"):
            raise self.error(404, f"Method {method!r} not found for models/{model}")
        body, behaviour = await self.prelude(request)
        problems = _validate(body)
        if problems:
            raise self.error(400, "Invalid JSON payload received. " + " ".join(problems[:5]))
        response = self._answer(body, behaviour, model)
        if method == "generateContent":
            return web.Response(body=orjson.dumps(_dump(response)), content_type="application/json")
        if request.query.get("alt") != "sse":
            raise self.error(400, "This stand-in streams only with alt=sse.")
        return await self._stream(request, behaviour, response)

    def _answer(
        self, body: dict[str, Any], behaviour: Behaviour, model: str
    ) -> types.GenerateContentResponse:
        prompt_tokens = max(1, len(orjson.dumps(body.get("contents"))) // 4)
        usage = types.GenerateContentResponseUsageMetadata(
            prompt_token_count=prompt_tokens,
            candidates_token_count=0,
            total_token_count=prompt_tokens,
        )
        response = types.GenerateContentResponse(
            response_id=f"standin{os.urandom(6).hex()}", model_version=model, usage_metadata=usage
        )
        if behaviour.kind == "blocked":
            response.prompt_feedback = types.GenerateContentResponsePromptFeedback(
                block_reason=types.BlockedReason.SAFETY
            )
            return response
        parts: list[types.Part]
        finish = types.FinishReason.STOP
        declared = _declared_functions(body)
        if behaviour.kind == "tool" and declared:
            call = types.FunctionCall(name=declared[0], args=self.tool_input)
            parts = [types.Part(function_call=call, thought_signature=b"sig-standin")]
        elif behaviour.kind == "safety":
            parts, finish = [], types.FinishReason.SAFETY
        else:
            parts = [types.Part(text=self.text)]
        usage.candidates_token_count = len(self.words()) if parts else 0
        usage.total_token_count = prompt_tokens + usage.candidates_token_count
        content = types.Content(role="model", parts=parts) if parts else None
        response.candidates = [types.Candidate(content=content, finish_reason=finish, index=0)]
        return response

    async def _stream(
        self,
        request: web.Request,
        behaviour: Behaviour,
        response: types.GenerateContentResponse,
    ) -> web.StreamResponse:
        stream = web.StreamResponse(
            headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await stream.prepare(request)
        pieces = _pieces(response, self.words())
        for index, piece in enumerate(pieces):
            if cut_here(behaviour, index):
                if behaviour.kind == "cut":
                    drop_connection(request)
                    return stream
                error = self.error(503, behaviour.message)
                assert isinstance(error.body, bytes)
                await stream.write(b"data: " + error.body + b"\r\n\r\n")
                return stream
            await stream.write(b"data: " + orjson.dumps(_dump(piece)) + b"\r\n\r\n")
            await self.pace()
        await stream.write_eof()
        return stream


def _pieces(
    response: types.GenerateContentResponse, words: list[str]
) -> list[types.GenerateContentResponse]:
    """The stream of a response: its text word by word, finishReason and usage on the last."""
    candidate = response.candidates[0] if response.candidates else None
    parts = candidate.content.parts if candidate and candidate.content else None
    if candidate is None or not parts or parts[0].text is None:
        return [response]
    pieces = []
    for number, word in enumerate(words):
        last = number == len(words) - 1
        pieces.append(
            types.GenerateContentResponse(
                response_id=response.response_id,
                model_version=response.model_version,
                candidates=[
                    types.Candidate(
                        content=types.Content(role="model", parts=[types.Part(text=word)]),
                        finish_reason=candidate.finish_reason if last else None,
                        index=0,
                    )
                ],
                usage_metadata=response.usage_metadata if last else None,
            )
        )
    return pieces


def _declared_functions(body: dict[str, Any]) -> list[str]:
    names = []
    for tool in body.get("tools") or []:
        for declaration in tool.get("functionDeclarations") or []:
            names.append(str(declaration.get("name")))
    return names


def _validate(body: dict[str, Any]) -> list[str]:
    problems = [f'Unknown name "{key}": Cannot find field.' for key in body if key not in _FIELDS]
    if "contents" not in body:
        problems.append("contents is required.")
    for key, (model, repeated) in _FIELDS.items():
        if key not in body:
            continue
        values = body[key] if repeated else [body[key]]
        if not isinstance(values, list):
            problems.append(f"{key} must be a list.")
            continue
        for index, value in enumerate(values):
            try:
                model.model_validate(value)
            except ValidationError as exc:
                for err in exc.errors():
                    where = ".".join(str(p) for p in (key, index, *err["loc"]))
                    problems.append(f"{where}: {err['msg']}.")
    return problems


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)
