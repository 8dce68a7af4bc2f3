"""Local stand-ins for where pods on EKS get temporary AWS keys, for tests.

`StsStandIn` answers STS `AssumeRoleWithWebIdentity` (IRSA) in the query protocol: a form POST
to `/`, unsigned, answered in STS's XML (`AssumeRoleWithWebIdentityResponse`, or an
`ErrorResponse` such as `InvalidIdentityToken`); the parameters are validated against botocore's
service model for STS and the token against the one the test projected into its file.
`ContainerCredentialsStandIn` is the EKS Pod Identity agent / ECS credentials endpoint: a GET
with the raw authorization token in `Authorization`, answered with the JSON `AccessKeyId`,
`SecretAccessKey`, `Token`, `AccountId`, `Expiration`. Both mint fresh keys on every call, each
valid for the next entry of `lifetimes` (then the last one), and remember them, so the Bedrock
stand-in can accept exactly the keys they issued (`KeyIssuer.lookup`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from xml.sax.saxutils import escape

import botocore.session
from aiohttp import web
from botocore.validate import ParamValidator

from ..providers.base import AwsCredentials
from .scripted import json_error

_STS_NS = "https://sts.amazonaws.com/doc/2011-06-15/"
ACCOUNT = "123456789012"


@dataclass
class Issued:
    credentials: AwsCredentials
    expires: datetime


@dataclass
class KeyIssuer:
    """Mints temporary keys with scripted lifetimes and knows which ones it issued."""

    #: Seconds each successive set of keys is valid for (the last one repeats).
    lifetimes: list[float] = field(default_factory=lambda: [3600.0])
    issued: list[Issued] = field(default_factory=list)
    #: When set, the next calls fail with this (status, code, message) instead.
    failure: tuple[int, str, str] | None = None

    def mint(self, prefix: str) -> Issued:
        lifetime = self.lifetimes[min(len(self.issued), len(self.lifetimes) - 1)]
        keys = AwsCredentials(
            f"{prefix}{os.urandom(8).hex().upper()}",
            os.urandom(20).hex(),
            f"session-{os.urandom(24).hex()}",
        )
        issued = Issued(keys, datetime.now(UTC) + timedelta(seconds=lifetime))
        self.issued.append(issued)
        return issued

    def lookup(self, access_key_id: str) -> AwsCredentials | None:
        for issued in self.issued:
            if issued.credentials.access_key_id == access_key_id:
                return issued.credentials
        return None


def _timestamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class StsStandIn(KeyIssuer):
    #: The web identity token (the projected ServiceAccount token) STS accepts.
    token: str = "eyJhbGciOiJSUzI1NiJ9.stand-in-service-account-token.c2lnbmF0dXJl"
    role_arn: str = f"arn:aws:iam::{ACCOUNT}:role/modelplane-bedrock"
    #: Every call's form parameters, as received.
    calls: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/", self._call)
        return app

    async def _call(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.calls.append(dict(form))
        action = form.pop("Action", None)
        version = form.pop("Version", None)
        if action != "AssumeRoleWithWebIdentity" or version != "2011-06-15":
            return self._error(400, "InvalidAction", f"Could not find operation {action}")
        if "authorization" in request.headers:
            return self._error(
                400, "InvalidParameterValue", "AssumeRoleWithWebIdentity is not signed"
            )
        params: dict[str, Any] = dict(form)
        if "DurationSeconds" in params:
            params["DurationSeconds"] = int(params["DurationSeconds"])
        model = botocore.session.get_session().get_service_model("sts")
        shape = model.operation_model("AssumeRoleWithWebIdentity").input_shape
        report = ParamValidator().validate(params, shape)
        if report.has_errors():
            return self._error(400, "ValidationError", report.generate_report())
        if self.failure is not None:
            return self._error(*self.failure)
        if params["WebIdentityToken"] != self.token:
            return self._error(
                400, "InvalidIdentityToken", "Couldn't verify the web identity token's signature"
            )
        if params["RoleArn"] != self.role_arn:
            return self._error(
                403, "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity"
            )
        issued = self.mint("ASIA")
        keys = issued.credentials
        session = escape(params["RoleSessionName"])
        body = f"""<AssumeRoleWithWebIdentityResponse xmlns="{_STS_NS}">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>system:serviceaccount:team:app</SubjectFromWebIdentityToken>
    <Audience>sts.amazonaws.com</Audience>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::{ACCOUNT}:assumed-role/modelplane-bedrock/{session}</Arn>
      <AssumedRoleId>AROA3XFRBF535PLBIFPI4:{session}</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>{escape(keys.session_token or "")}</SessionToken>
      <SecretAccessKey>{escape(keys.secret_access_key)}</SecretAccessKey>
      <Expiration>{_timestamp(issued.expires)}</Expiration>
      <AccessKeyId>{escape(keys.access_key_id)}</AccessKeyId>
    </Credentials>
    <Provider>arn:aws:iam::{ACCOUNT}:oidc-provider/oidc.eks.us-east-1.amazonaws.com</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata>
    <RequestId>{_request_id()}</RequestId>
  </ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>
"""
        return web.Response(body=body.encode(), content_type="text/xml")

    def _error(self, status: int, code: str, message: str) -> web.Response:
        kind = "Sender" if status < 500 else "Receiver"
        body = f"""<ErrorResponse xmlns="{_STS_NS}">
  <Error>
    <Type>{kind}</Type>
    <Code>{code}</Code>
    <Message>{escape(message)}</Message>
  </Error>
  <RequestId>{_request_id()}</RequestId>
</ErrorResponse>
"""
        return web.Response(status=status, body=body.encode(), content_type="text/xml")


def _request_id() -> str:
    raw = os.urandom(16).hex()
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


@dataclass
class ContainerCredentialsStandIn(KeyIssuer):
    #: The value the `Authorization` header must carry (what the token file holds).
    authorization: str = "stand-in-pod-identity-token"
    path: str = "/v1/credentials"
    #: The `Authorization` header of every call.
    calls: list[str | None] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(self.path, self._credentials)
        return app

    async def _credentials(self, request: web.Request) -> web.Response:
        given = request.headers.get("authorization")
        self.calls.append(given)
        if given != self.authorization:
            raise json_error(
                401, {"code": "AccessDeniedException", "message": "invalid authorization token"}
            )
        if self.failure is not None:
            status, code, message = self.failure
            raise json_error(status, {"code": code, "message": message})
        issued = self.mint("ASIA")
        keys = issued.credentials
        return web.json_response(
            {
                "AccessKeyId": keys.access_key_id,
                "SecretAccessKey": keys.secret_access_key,
                "Token": keys.session_token,
                "AccountId": ACCOUNT,
                "Expiration": _timestamp(issued.expires),
            }
        )
