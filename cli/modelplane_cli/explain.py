"""`modelplane explain`: the routing decision for one request, offline, from a config file.

Runs exactly the sidecar's pipeline (classify -> match rule -> filter -> pick) on the request body
and prints the decision trace as JSON; nothing is called. Credentials are not needed for that, so
the config's apiKey entries are ignored (no environment variable has to be set). Health state is
that of a fresh sidecar: no breaker open, nothing in flight, no latency observed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson
import yaml
from multidict import CIMultiDict, CIMultiDictProxy

from modelplane_sidecar.config import ConfigError, parse_config
from modelplane_sidecar.routing import RoutedRequest, explain, operation_for
from modelplane_sidecar.routing.classify.complexity import default_model
from modelplane_sidecar.runtime import Snapshot


class ExplainError(Exception):
    """Bad input to the command; the message says what and where."""


def _load_config(path: Path) -> Snapshot:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ExplainError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ExplainError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(data, dict):
        for endpoint in data.get("endpoints") or []:
            if isinstance(endpoint, dict):
                endpoint.pop("apiKey", None)
    try:
        return Snapshot.build(parse_config(data, str(path)))
    except ConfigError as exc:
        raise ExplainError(str(exc)) from None


def _load_request(path: str) -> dict[str, Any]:
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise ExplainError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ExplainError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ExplainError(f"{path}: expected a JSON object (a request body)")
    return body


def _headers(pairs: list[str]) -> CIMultiDictProxy[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for pair in pairs:
        name, sep, value = pair.partition(":")
        if not sep or not name.strip():
            raise ExplainError(f"--header {pair!r}: expected 'Name: value'")
        headers.add(name.strip(), value.strip())
    return CIMultiDictProxy(headers)


def run_explain(
    config_path: Path, request_path: str, headers: list[str], operation: str | None
) -> dict[str, Any]:
    """The decision trace as a JSON-ready dict; raises ExplainError on bad input."""
    snapshot = _load_config(config_path)
    body = _load_request(request_path)
    try:
        op = operation_for(body, operation)
    except ValueError as exc:
        raise ExplainError(str(exc)) from None
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ExplainError(f"{request_path}: the request needs a 'model' string")
    stream = body.get("stream") is True
    request = RoutedRequest(op, body, _headers(headers), model, stream)
    default_model()  # loaded up front, so the trace's timings are those of a warm sidecar
    trace = explain(snapshot, request)
    return {"configVersion": snapshot.version, **trace.as_json()}


def main(config: str, request: str, headers: list[str], operation: str | None) -> int:
    try:
        result = run_explain(Path(config), request, headers, operation)
    except ExplainError as exc:
        print(f"modelplane explain: {exc}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    return 0
