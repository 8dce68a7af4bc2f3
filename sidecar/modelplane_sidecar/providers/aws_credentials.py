"""Where a Bedrock endpoint's SigV4 keys come from, and keeping temporary ones fresh.

Static keys (the `AWS_ACCESS_KEY_ID` variables, or a profile in the shared files) are read once,
when a config is loaded (`sigv4.resolve_credentials`). Temporary keys, the way pods on EKS get
them, come from botocore's own credential providers: web identity (IRSA: `AWS_ROLE_ARN` and
`AWS_WEB_IDENTITY_TOKEN_FILE` -> STS `AssumeRoleWithWebIdentity`) and container credentials (EKS
Pod Identity, ECS: `AWS_CONTAINER_CREDENTIALS_FULL_URI` or `..._RELATIVE_URI`, with
`AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]`). botocore's calls block, so they run in a worker
thread, never on the event loop: the first request waits for the first keys; later requests
use the keys in hand, a refresh starts in the background 15 minutes before they expire
(botocore's advisory window) and requests wait for it only in the last 10 (its mandatory
window). One refresh runs at a time; a background one at most every `retry_seconds`, and after
a failure requests get that failure (naming the credential source, never a secret) for
`retry_seconds` before the next try. botocore honours `AWS_ENDPOINT_URL_STS` and `AWS_REGION`;
STS is called in the endpoint's region.

botocore's own log records pass through a scrubbing filter (`guard_botocore_logs`): on a failed
refresh botocore logs a WARNING with the traceback, whose last line quotes what STS or the
credentials endpoint answered; and its DEBUG records carry whole STS requests and responses
(the web identity token, the new keys), so the `botocore` logger never goes below INFO.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from ..config import ConfigError
from .base import AwsCredentials, Credentials, FailureKind, UpstreamFailure
from .sigv4 import resolve_credentials

CredentialSource = Literal["auto", "environment", "webIdentity", "profile", "container"]
TemporarySource = Literal["webIdentity", "container"]

#: botocore's refresh windows for temporary credentials (seconds before expiry).
ADVISORY_REFRESH_SECONDS = 15 * 60
MANDATORY_REFRESH_SECONDS = 10 * 60
#: Longest a credential error message may be (botocore's can quote a whole response body).
_MAX_DETAIL = 300

_ROLE_ARN = "AWS_ROLE_ARN"
_TOKEN_FILE = "AWS_WEB_IDENTITY_TOKEN_FILE"
_FULL_URI = "AWS_CONTAINER_CREDENTIALS_FULL_URI"
_RELATIVE_URI = "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"
_AUTH_TOKEN = "AWS_CONTAINER_AUTHORIZATION_TOKEN"

#: The keys whose refresh runs in this worker thread (set by `_fetch`, read by the log filter).
_REFRESHING: contextvars.ContextVar[TemporaryAwsCredentials | None] = contextvars.ContextVar(
    "modelplane_refreshing_aws_credentials", default=None
)
#: Secrets by their shape, for values not known yet (keys in a response botocore rejected):
#: access key ids and JWTs (web identity tokens)...
_SECRET_SHAPES = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{12,}\b|eyJ[\w-]+\.[\w-]+\.[\w-]*")
#: ...and the values of credential fields in JSON, XML or key=value text.
_SECRET_FIELDS = re.compile(
    r"(?i)((?:SecretAccessKey|SecretKey|secret_key|Token)[\"']?(?:\s*[:=]\s*[\"']?|>))"
    r"[^\"'\s,}&<]+"
)
_BOTOCORE_LOGGERS = ("botocore.credentials", "botocore.utils")


def aws_credentials(
    source: CredentialSource,
    profile: str | None,
    region: str,
    environ: Mapping[str, str] | None = None,
) -> Credentials:
    """The credentials `source` names, resolved without any network call (ConfigError if the
    source is not configured here): static keys, or a `TemporaryAwsCredentials` to refresh."""
    env = os.environ if environ is None else environ
    web_identity = profile is None and bool(env.get(_ROLE_ARN) and env.get(_TOKEN_FILE))
    container = bool(env.get(_FULL_URI) or env.get(_RELATIVE_URI))
    if source == "environment":
        key_id, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if not (key_id and secret):
            raise ConfigError(
                "credentialSource environment: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "are not set"
            )
        return Credentials(aws=AwsCredentials(key_id, secret, env.get("AWS_SESSION_TOKEN") or None))
    if source == "profile":
        name = profile or env.get("AWS_PROFILE") or "default"
        return Credentials(aws=resolve_credentials(name, env))
    if source == "webIdentity":
        if profile is None and not web_identity:
            raise ConfigError(
                f"credentialSource webIdentity: {_ROLE_ARN} and {_TOKEN_FILE} are not set (EKS "
                "sets them in pods whose ServiceAccount has the eks.amazonaws.com/role-arn "
                "annotation), and no profile names a role_arn and web_identity_token_file"
            )
        return Credentials(refreshing=TemporaryAwsCredentials("webIdentity", region, profile))
    if source == "container":
        if not container:
            raise ConfigError(
                f"credentialSource container: neither {_FULL_URI} nor {_RELATIVE_URI} is set "
                "(EKS Pod Identity sets them in pods with a pod identity association)"
            )
        return Credentials(refreshing=TemporaryAwsCredentials("container", region, None))
    # auto: the AWS SDKs' order, minus instance metadata (pods on EKS should not use the node's
    # role, and probing 169.254.169.254 from every sidecar is not free).
    if profile is None and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return Credentials(aws=resolve_credentials(None, env))
    if web_identity:
        return Credentials(refreshing=TemporaryAwsCredentials("webIdentity", region, None))
    try:
        return Credentials(aws=resolve_credentials(profile, env))
    except ConfigError as exc:
        if profile is not None or not container:
            raise ConfigError(
                f"{exc}; nor are web identity ({_ROLE_ARN} + {_TOKEN_FILE}) or container "
                f"credentials ({_FULL_URI} / {_RELATIVE_URI}) set up"
            ) from None
    return Credentials(refreshing=TemporaryAwsCredentials("container", region, None))


def describe_source(source: TemporarySource, profile: str | None) -> str:
    """The credential source in words for errors and logs (names and URLs, no secrets)."""
    env = os.environ
    if source == "webIdentity":
        if profile is not None:
            return f"web identity (profile {profile!r})"
        return (
            f"web identity (IRSA: role {env.get(_ROLE_ARN, '?')}, token file "
            f"{env.get(_TOKEN_FILE, '?')})"
        )
    where = env.get(_FULL_URI) or f"169.254.170.2 + {_RELATIVE_URI}"
    return f"container credentials (EKS Pod Identity / ECS, {where})"


def scrub(text: str, known: Iterable[str | None] = ()) -> str:
    """`text` without the `known` secret values nor anything shaped like an AWS secret."""
    for secret in known:
        if secret:
            text = text.replace(secret, "[REDACTED]")
    text = _SECRET_SHAPES.sub("[REDACTED]", text)
    return _SECRET_FIELDS.sub(r"\1[REDACTED]", text)


class _BotocoreScrubber(logging.Filter):
    """Scrubs botocore's credential log records (message and traceback) of secrets: those of
    the keys being refreshed in this thread, the container authorization token, and whatever
    looks like a key or token."""

    def filter(self, record: logging.LogRecord) -> bool:
        refreshing = _REFRESHING.get()
        known = [os.environ.get(_AUTH_TOKEN)]
        if refreshing is not None:
            known.extend(refreshing.secrets())
        record.msg, record.args = scrub(record.getMessage(), known), None
        if record.exc_info:
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, scrub(text, known)
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text, known)
        return True


def guard_botocore_logs() -> None:
    """Scrub botocore's credential log records and keep its DEBUG records (whole STS requests
    and responses) out of the logs; idempotent."""
    for name in _BOTOCORE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _BotocoreScrubber) for f in logger.filters):
            logger.addFilter(_BotocoreScrubber())
    botocore_logger = logging.getLogger("botocore")
    if botocore_logger.getEffectiveLevel() < logging.INFO:
        botocore_logger.setLevel(logging.INFO)


def _load_with_botocore(source: TemporarySource, region: str, profile: str | None) -> Any:
    """botocore's refreshable credentials for `source` (blocking: call in a worker thread)."""
    import botocore.session
    from botocore.config import Config
    from botocore.credentials import ContainerProvider, create_credential_resolver

    if source == "container":
        return ContainerProvider().load()
    session = botocore.session.Session(profile=profile)
    # Bounded STS calls: a hung STS must not hold requests for botocore's default 60s x 5.
    session.set_default_client_config(
        Config(connect_timeout=5, read_timeout=10, retries={"mode": "standard", "max_attempts": 3})
    )
    resolver = create_credential_resolver(session, region_name=region)
    return resolver.get_provider("assume-role-with-web-identity").load()


def _frozen(loaded: Any) -> AwsCredentials:
    """Keys that will not change under us (refreshes as botocore sees fit; blocking)."""
    frozen = loaded.get_frozen_credentials()
    return AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token or None)


class TemporaryAwsCredentials:
    """Temporary AWS keys of one endpoint, fetched and refreshed by botocore off the loop.

    `current()` answers at once while the keys in hand are good for more than the mandatory
    window; closer to expiry (or before the first keys) it waits for the one running refresh.
    """

    def __init__(
        self,
        source: TemporarySource,
        region: str,
        profile: str | None,
        *,
        load: Callable[[TemporarySource, str, str | None], Any] = _load_with_botocore,
        retry_seconds: float = 5.0,
    ) -> None:
        self.source = source
        self.description = describe_source(source, profile)
        self._region = region
        self._profile = profile
        self._load = load
        #: Least time between two refreshes that did not bring keys good for the advisory
        #: window (after a failure, requests get that failure meanwhile).
        self.retry_seconds = retry_seconds
        #: botocore's credentials object (it knows the expiry); None until the first load.
        self._loaded: Any = None
        self._current: Credentials | None = None
        #: The keys `_current` replaced: requests signed with them may still be answered.
        self._previous: Credentials | None = None
        self._refresh: asyncio.Future[Credentials] | None = None
        self._task: asyncio.Task[None] | None = None
        self._failure: UpstreamFailure | None = None
        self._attempted_at = -float("inf")
        self.refreshes = 0
        guard_botocore_logs()

    def secrets(self) -> tuple[str, ...]:
        """The keys in hand and the ones they replaced (to scrub from upstream answers)."""
        found: list[str] = []
        for keys in (self._current, self._previous):
            if keys is not None:
                found.extend(keys.secrets())
        return tuple(found)

    def __eq__(self, other: object) -> bool:
        # Two of the same source are interchangeable: a new config snapshot keeps the old one.
        if not isinstance(other, TemporaryAwsCredentials):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[str, str, str | None]:
        return (self.source, self._region, self._profile)

    def _due(self, window: float) -> bool:
        refresh_needed = getattr(self._loaded, "refresh_needed", None)
        return refresh_needed is not None and bool(refresh_needed(window))

    async def current(self, wait_seconds: float) -> Credentials:
        """Keys to sign a request with now; UpstreamFailure when there are none."""
        current = self._current
        if current is not None and not self._due(ADVISORY_REFRESH_SECONDS):
            return current
        if current is not None and not self._due(MANDATORY_REFRESH_SECONDS):
            if self._refresh is None and self._may_try():
                self._start_refresh()
            return current
        return await self.refreshed(wait_seconds)

    async def refreshed(self, wait_seconds: float) -> Credentials:
        """Wait (at most `wait_seconds`) for the running refresh, starting one if needed."""
        if self._refresh is None:
            if self._failure is not None and not self._may_try():
                raise self._failure
            self._start_refresh()
        assert self._refresh is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self._refresh), wait_seconds)
        except TimeoutError:
            raise UpstreamFailure(
                FailureKind.TIMEOUT,
                f"AWS credentials from {self.description}: no answer within {wait_seconds:.2f}s",
            ) from None

    def _may_try(self) -> bool:
        # Also after a "successful" advisory refresh that botocore let fail quietly (it keeps
        # the old keys): without this, every request of the window would call STS again.
        return time.monotonic() - self._attempted_at >= self.retry_seconds

    def _start_refresh(self) -> None:
        self._attempted_at = time.monotonic()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Credentials] = loop.create_future()
        self._refresh = future
        # Held here: the loop keeps only a weak reference to a task.
        self._task = loop.create_task(self._run_refresh(future))

    async def _run_refresh(self, future: asyncio.Future[Credentials]) -> None:
        try:
            credentials = await asyncio.to_thread(self._fetch)
        except Exception as exc:
            verb = "loaded" if self._current is None else "refreshed"
            failure = UpstreamFailure(
                FailureKind.SERVER_ERROR,
                f"AWS credentials from {self.description} could not be {verb}: "
                f"{self._safe_detail(exc)}",
            )
            self._failure = failure
            if not future.done():
                future.set_exception(failure)
                # Nobody may be waiting (a background refresh): the exception is not lost,
                # it is kept in `_failure` for the requests to come.
                future.exception()
        else:
            if credentials != self._current:
                self._previous, self._current = self._current, credentials
            self._failure = None
            self.refreshes += 1
            if not future.done():
                future.set_result(credentials)
        finally:
            self._refresh = None

    def _fetch(self) -> Credentials:
        """In a worker thread: load once, then let botocore refresh (it locks around that)."""
        # botocore's log records of this refresh are scrubbed of these keys (`guard_...`).
        _REFRESHING.set(self)
        if self._loaded is None:
            loaded = self._load(self.source, self._region, self._profile)
            if loaded is None:
                raise ConfigError(f"{self.description} is not configured in this environment")
            self._loaded = loaded
        return Credentials(aws=_frozen(self._loaded))

    def _safe_detail(self, exc: Exception) -> str:
        detail = scrub(
            f"{type(exc).__name__}: {exc}", [os.environ.get(_AUTH_TOKEN), *self.secrets()]
        )
        if len(detail) > _MAX_DETAIL:
            detail = detail[:_MAX_DETAIL] + "..."
        return detail
