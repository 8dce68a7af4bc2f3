"""A local stand-in for Amazon Bedrock's Converse and ConverseStream, for tests and demos.

`POST /model/{modelId}/converse` and `/converse-stream`. Every request must be signed with SigV4
for service `bedrock` (checked with botocore's own signer against the stand-in's credentials, as
AWS does: a wrong signature is a 403 `InvalidSignatureException`) or carry the Bedrock API key as
a bearer token. Bodies are validated against botocore's service model for Converse (unknown or
misspelt fields are a 400 `ValidationException`). Streams use AWS event-stream framing with
Bedrock's headers (`:event-type`, `:message-type`, `:exception-type`). Behaviours as for the
OpenAI stand-in, plus `kind="tool"` (a toolUse of the first tool) and `kind="guardrail"`
(stopReason `guardrail_intervened`); `stream-error` sends a `throttlingException` event.
`POST /model/{modelId}/count-tokens` (CountTokens) answers `inputTokens` and, like Bedrock,
refuses cross-region inference profile ids. Temporary keys (from the STS or container
credentials stand-in, `issuer`) must carry their session token in `x-amz-security-token`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import botocore.session
import orjson
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from botocore.model import OperationModel
from botocore.validate import ParamValidator

from ..providers.base import AwsCredentials
from ..providers.eventstream import encode_message
from .scripted import Behaviour, ScriptedStandIn, cut_here, drop_connection

_ERROR_TYPES = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}
_MESSAGES = {
    429: "Too many requests, please wait before trying again.",
    500: "The server encountered an internal error while processing the request.",
    503: "The service is temporarily unable to handle the request.",
}
#: CountTokens takes foundation-model ids; cross-region inference profiles are refused.
_CROSS_REGION = re.compile(r"^(?:us|eu|apac|jp|au|ca|us-gov|global)\.")
_BAD_SIGNATURE = (
    "The request signature we calculated does not match the signature you provided. Check your "
    "AWS Secret Access Key and signing method. Consult the service documentation for details."
)


def _operations() -> dict[str, OperationModel]:
    model = botocore.session.get_session().get_service_model("bedrock-runtime")
    return {
        "converse": model.operation_model("Converse"),
        "converse-stream": model.operation_model("ConverseStream"),
        "count-tokens": model.operation_model("CountTokens"),
    }


@dataclass
class BedrockStandIn(ScriptedStandIn):
    #: Keys requests must be signed with (None: SigV4 is not checked, unless `issuer` is set).
    credentials: AwsCredentials | None = None
    region: str = "us-east-1"
    operations: dict[str, OperationModel] = field(default_factory=_operations, repr=False)
    #: Temporary keys accepted too, looked up by access key id (e.g. `KeyIssuer.lookup` of the
    #: STS stand-in); their session token must come in `x-amz-security-token`.
    issuer: Callable[[str], AwsCredentials | None] | None = None
    #: Input tokens CountTokens answers (None: about four characters per token).
    counted_tokens: int | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/model/{model_id}/{action}", self._converse)
        return app

    def auth_error(self, request: web.Request, raw: bytes) -> web.HTTPException | None:
        authorization = request.headers.get("authorization", "")
        if authorization.startswith("Bearer ") and self.api_key is not None:
            if authorization.removeprefix("Bearer ") == self.api_key:
                return None
            return self._error(403, "UnrecognizedClientException", "Invalid API Key format")
        if self.credentials is None and self.issuer is None:
            return None
        if not authorization.startswith("AWS4-HMAC-SHA256 "):
            return self._error(
                403, "MissingAuthenticationTokenException", "Missing Authentication Token"
            )
        fields = dict(
            item.strip().split("=", 1)
            for item in authorization[len("AWS4-HMAC-SHA256 ") :].split(",")
        )
        key_id, _, region, service, _ = fields["Credential"].split("/")
        expected = self._keys(key_id)
        token = request.headers.get("x-amz-security-token")
        if expected is None or token != expected.session_token:
            return self._error(
                403,
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        if (region, service) != (self.region, "bedrock"):
            return self._error(
                403,
                "InvalidSignatureException",
                f"Credential should be scoped to a valid "
                f"region and service; got {region}/{service}.",
            )
        signature = self._signature(request, raw, fields["SignedHeaders"], expected)
        if fields["Signature"] != signature:
            return self._error(403, "InvalidSignatureException", _BAD_SIGNATURE)
        return None

    def _keys(self, key_id: str) -> AwsCredentials | None:
        if self.credentials is not None and key_id == self.credentials.access_key_id:
            return self.credentials
        return self.issuer(key_id) if self.issuer is not None else None

    def _signature(
        self, request: web.Request, body: bytes, signed_headers: str, keys: AwsCredentials
    ) -> str:
        """botocore's signature for the request as received (the server side of SigV4)."""
        names = signed_headers.split(";")
        headers = {name: request.headers.get(name, "") for name in names}
        url = f"{request.scheme}://{request.host}{request.raw_path}"
        aws = AWSRequest(method=request.method, url=url, headers=headers, data=body)
        aws.context["timestamp"] = request.headers.get("x-amz-date", "")
        signer = SigV4Auth(
            BotoCredentials(keys.access_key_id, keys.secret_access_key, keys.session_token),
            "bedrock",
            self.region,
        )
        canonical = signer.canonical_request(aws)
        return str(signer.signature(signer.string_to_sign(aws, canonical), aws))

    def error(
        self, status: int, message: str | None = None, headers: dict[str, str] | None = None
    ) -> web.HTTPException:
        kind = _ERROR_TYPES.get(status, "InternalServerException")
        return self._error(status, kind, message or _MESSAGES.get(status, f"Stand-in {status}"))

    def _error(
        self, status: int, kind: str, message: str, headers: dict[str, str] | None = None
    ) -> web.HTTPException:
        exc = web.HTTPException(
            headers={
                "x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/",
                "x-amzn-RequestId": os.urandom(16).hex(),
                **(headers or {}),
            }
        )
        exc.set_status(status)
        exc.body = orjson.dumps({"message": message})
        exc.content_type = "application/json"
        return exc

    async def _converse(self, request: web.Request) -> web.StreamResponse:
        action = request.match_info["action"]
        if action not in self.operations:
            raise self._error(404, "UnknownOperationException", "Unknown operation")
        body, behaviour = await self.prelude(request)
        operation = self.operations[action]
        params = {**body, "modelId": request.match_info["model_id"]}
        report = ParamValidator().validate(params, operation.input_shape)
        if report.has_errors():
            raise self._error(400, "ValidationException", report.generate_report())
        if action == "count-tokens":
            return self._count_tokens(request.match_info["model_id"], body)
        output, stop_reason = self._output(body, behaviour)
        tokens_in = max(1, len(orjson.dumps(body.get("messages"))) // 4)
        tokens_out = len(self.words()) if output else 0
        usage = {"inputTokens": tokens_in, "outputTokens": tokens_out}
        usage["totalTokens"] = tokens_in + tokens_out
        if action == "converse":
            answer = {
                "output": {"message": {"role": "assistant", "content": output}},
                "stopReason": stop_reason,
                "usage": usage,
                "metrics": {"latencyMs": 12},
            }
            return web.Response(body=orjson.dumps(answer), content_type="application/json")
        return await self._stream(request, behaviour, output, stop_reason, usage)

    def _count_tokens(self, model_id: str, body: dict[str, Any]) -> web.Response:
        if _CROSS_REGION.match(model_id) or model_id.startswith("arn:"):
            raise self._error(
                400, "ValidationException", "The provided model doesn't support counting tokens."
            )
        counted = self.counted_tokens
        if counted is None:
            counted = max(1, len(orjson.dumps(body["input"])) // 4)
        return web.Response(
            body=orjson.dumps({"inputTokens": counted}), content_type="application/json"
        )

    def _output(
        self, body: dict[str, Any], behaviour: Behaviour
    ) -> tuple[list[dict[str, Any]], str]:
        tools = (body.get("toolConfig") or {}).get("tools") or []
        if behaviour.kind == "tool" and tools:
            name = tools[0]["toolSpec"]["name"]
            use = {"toolUseId": f"tooluse_{os.urandom(8).hex()}", "name": name}
            return [{"toolUse": {**use, "input": self.tool_input}}], "tool_use"
        if behaviour.kind == "guardrail":
            return [{"text": "Sorry, the model cannot answer this question."}], (
                "guardrail_intervened"
            )
        return [{"text": self.text}], "end_turn"

    async def _stream(
        self,
        request: web.Request,
        behaviour: Behaviour,
        output: list[dict[str, Any]],
        stop_reason: str,
        usage: dict[str, int],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"content-type": "application/vnd.amazon.eventstream"}
        )
        await response.prepare(request)
        events: list[tuple[str, dict[str, Any]]] = [("messageStart", {"role": "assistant"})]
        for index, block in enumerate(output):
            if "toolUse" in block:
                use = block["toolUse"]
                start = {"toolUse": {"toolUseId": use["toolUseId"], "name": use["name"]}}
                events.append(("contentBlockStart", {"contentBlockIndex": index, "start": start}))
                arguments = orjson.dumps(use["input"]).decode()
                half = len(arguments) // 2
                for piece in (arguments[:half], arguments[half:]):
                    delta = {"toolUse": {"input": piece}}
                    events.append(
                        ("contentBlockDelta", {"contentBlockIndex": index, "delta": delta})
                    )
            else:
                for word in self.words():
                    events.append(
                        (
                            "contentBlockDelta",
                            {"contentBlockIndex": index, "delta": {"text": word}},
                        )
                    )
            events.append(("contentBlockStop", {"contentBlockIndex": index}))
        events.append(("messageStop", {"stopReason": stop_reason}))
        events.append(("metadata", {"usage": usage, "metrics": {"latencyMs": 12}}))
        for index, (event, payload) in enumerate(events):
            if cut_here(behaviour, index):
                if behaviour.kind == "cut":
                    drop_connection(request)
                    return response
                message = behaviour.message or "Too many requests, please wait."
                await response.write(
                    encode_message(
                        {
                            ":exception-type": "throttlingException",
                            ":content-type": "application/json",
                            ":message-type": "exception",
                        },
                        orjson.dumps({"message": message}),
                    )
                )
                return response
            frame = encode_message(
                {
                    ":event-type": event,
                    ":content-type": "application/json",
                    ":message-type": "event",
                },
                orjson.dumps({**payload, "p": "abcdefghij"[: index % 10]}),
            )
            await response.write(frame)
            await self.pace()
        await response.write_eof()
        return response
