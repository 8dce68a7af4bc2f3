"""AWS Signature Version 4 request signing, and AWS credentials from the usual places.

The signer is the standard algorithm (canonical request -> string to sign -> HMAC chain over
date, region and service) in a few lines of stdlib code, so the request path pays no botocore
import; the tests check it byte for byte against botocore's own `SigV4Auth` for fixed inputs.
Credentials are resolved once, when a config is loaded, in the order the AWS SDKs use for
static keys: the `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN` environment
variables (unless a profile is named), then the profile (option `profile`, else `AWS_PROFILE`,
else `default`) in the shared credentials file and then the config file
(`AWS_SHARED_CREDENTIALS_FILE`, `AWS_CONFIG_FILE`, default `~/.aws/`).
"""

from __future__ import annotations

import configparser
import hashlib
import hmac
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, urlsplit

from ..config import ConfigError
from .base import AwsCredentials

#: Headers botocore never signs (proxies may change them).
_UNSIGNED = {"expect", "transfer-encoding", "user-agent", "x-amzn-trace-id"}
_DEFAULT_PORTS = {"http": 80, "https": 443}


def sign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    credentials: AwsCredentials,
    region: str,
    service: str,
    now: datetime,
) -> dict[str, str]:
    """The headers to add to the request: `x-amz-date`, the session token, `authorization`."""
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    added = {"x-amz-date": amz_date}
    if credentials.session_token:
        added["x-amz-security-token"] = credentials.session_token
    parts = urlsplit(url)
    signed: dict[str, str] = {}
    for name, value in {**headers, **added}.items():
        if name.lower() not in _UNSIGNED:
            signed[name.lower()] = " ".join(value.split())
    signed.setdefault("host", _host(parts.scheme, parts.hostname or "", parts.port))
    names = sorted(signed)
    canonical = "\n".join(
        [
            method.upper(),
            quote(parts.path or "/", safe="/~"),
            _canonical_query(parts.query),
            "".join(f"{n}:{signed[n]}\n" for n in names),
            ";".join(names),
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = ("AWS4" + credentials.secret_access_key).encode()
    for part in (amz_date[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    added["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return added


def _host(scheme: str, hostname: str, port: int | None) -> str:
    if port is None or _DEFAULT_PORTS.get(scheme) == port:
        return hostname
    return f"{hostname}:{port}"


def _canonical_query(query: str) -> str:
    if not query:
        return ""
    pairs = sorted(tuple(p.partition("=")[::2]) for p in query.split("&"))
    return "&".join(f"{k}={v}" for k, v in pairs)


def resolve_credentials(
    profile: str | None, environ: Mapping[str, str] | None = None
) -> AwsCredentials:
    """Static AWS credentials from the environment or the shared files; ConfigError if none."""
    env = os.environ if environ is None else environ
    if profile is None:
        key_id, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if key_id and secret:
            return AwsCredentials(key_id, secret, env.get("AWS_SESSION_TOKEN") or None)
    name = profile or env.get("AWS_PROFILE") or "default"
    home = Path(env.get("HOME") or Path.home())
    files = (
        (Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws/credentials"), name),
        (
            Path(env.get("AWS_CONFIG_FILE") or home / ".aws/config"),
            name if name == "default" else f"profile {name}",
        ),
    )
    for path, section in files:
        found = _from_file(path, section)
        if found is not None:
            return found
    raise ConfigError(
        f"no AWS credentials for profile {name!r}: set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, or add the profile to the shared credentials or config file "
        "(or give the endpoint an apiKey holding a Bedrock API key)"
    )


def _from_file(path: Path, section: str) -> AwsCredentials | None:
    parser = configparser.RawConfigParser()
    try:
        parser.read_string(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, configparser.Error) as exc:
        raise ConfigError(f"cannot read AWS credentials from {str(path)!r}: {exc}") from None
    if not parser.has_section(section):
        return None
    key_id = parser.get(section, "aws_access_key_id", fallback=None)
    secret = parser.get(section, "aws_secret_access_key", fallback=None)
    if not key_id or not secret:
        return None
    token = parser.get(section, "aws_session_token", fallback=None)
    return AwsCredentials(key_id.strip(), secret.strip(), token.strip() if token else None)
