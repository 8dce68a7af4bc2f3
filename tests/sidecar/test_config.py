"""RouterConfig validation, reload on file change and SIGHUP, and the `modelplane serve` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from harness import Upstreams, chain_config, endpoint, http
from loopback_ports import free_port

from modelplane_sidecar.breaker import BreakerState, CircuitBreaker
from modelplane_sidecar.config import (
    CircuitBreakerPolicy,
    ConfigError,
    load_config_text,
    parse_config,
)

EXAMPLE = Path(__file__).parents[2] / "examples" / "standalone" / "router.yaml"


def _base() -> dict[str, Any]:
    return chain_config([endpoint("a", "http://127.0.0.1:1/v1")])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["models"][0].update(endpoints=["a", "nope"]), "unknown endpoint(s): nope"),
        (lambda c: c["endpoints"].append(dict(c["endpoints"][0])), "duplicate endpoint names: a"),
        (lambda c: c["endpoints"][0].update(baseUrl="ftp://x"), "baseUrl must start with http"),
        (lambda c: c["endpoints"][0].update(provider="acme"), "endpoints.0.provider"),
        (lambda c: c["endpoints"][0].update(bogus=1), "endpoints.0.bogus: Extra inputs"),
        (lambda c: c["models"][0]["retry"].update(maxAttempts=0), "models.0.retry.maxAttempts"),
        (lambda c: c.update(apiVersion="v2"), "apiVersion"),
        (lambda c: c.update(models=[]), "models: Tuple should have at least 1 item"),
        (
            lambda c: c["endpoints"][0].update(apiKey={"env": "MODELPLANE_TEST_UNSET_VAR"}),
            "environment variable 'MODELPLANE_TEST_UNSET_VAR' is not set",
        ),
        (
            lambda c: c["endpoints"][0].update(apiKey={"env": "X", "value": "y"}),
            "exactly one of env, file, value",
        ),
    ],
)
def test_invalid_configs_are_rejected_with_where_and_why(mutate: Any, message: str) -> None:
    config = _base()
    mutate(config)
    with pytest.raises(ConfigError) as caught:
        parse_config(config, "router.yaml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("router.yaml: ")


def test_yaml_errors_and_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_text("endpoints: [", "x.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config_text("- 1", "x.yaml")
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file\n")
    config = _base()
    config["endpoints"][0]["apiKey"] = {"file": str(key_file)}
    parsed = parse_config(config)
    assert parsed.endpoints[0].api_key is not None
    assert parsed.endpoints[0].api_key.resolve() == "sk-from-file"
    monkeypatch.setenv("MP_KEY", "sk-from-env")
    config["endpoints"][0]["apiKey"] = {"value": "sk-inline"}
    assert "sk-inline" not in repr(parse_config(config))


def test_version_is_a_content_hash_that_ignores_nothing_but_metadata_version() -> None:
    one = parse_config(_base())
    same = parse_config(_base())
    assert one.version() == same.version()
    changed = _base()
    changed["endpoints"][0]["model"] = "other"
    assert parse_config(changed).version() != one.version()
    pinned = _base()
    pinned["metadata"] = {"version": "v42"}
    assert parse_config(pinned).version() == "v42"


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    monkeypatch.setenv("DEEPSEEK_API_KEY", "x")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "x")
    config = load_config_text(EXAMPLE.read_text(), str(EXAMPLE))
    assert {m.name for m in config.models} >= {"chat", "embed"}


def test_breaker_state_machine_with_a_fake_clock() -> None:
    now = [0.0]
    breaker = CircuitBreaker(clock=lambda: now[0])
    policy = CircuitBreakerPolicy(failure_threshold=3, open_seconds=10, half_open_successes=2)
    for _ in range(2):
        breaker.record_failure(policy)
    breaker.record_success(policy)  # a success resets the consecutive count
    for _ in range(2):
        breaker.record_failure(policy)
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure(policy)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow(policy)
    now[0] = 10.5
    assert breaker.allow(policy)  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow(policy), "only one probe at a time"
    breaker.record_success(policy)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow(policy)
    breaker.record_success(policy)
    assert breaker.state is BreakerState.CLOSED
    # A failed probe opens the breaker again for a full period.
    for _ in range(3):
        breaker.record_failure(policy)
    now[0] = 21
    assert breaker.allow(policy)
    breaker.record_failure(policy)
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_in(policy) == pytest.approx(10)
    # A probe that ends without a verdict frees the slot for the next one.
    now[0] = 32
    assert breaker.allow(policy)
    breaker.release_probe()
    assert breaker.allow(policy)


def test_breaker_state_survives_reload_of_unchanged_endpoints(upstreams: Upstreams) -> None:
    _, url = upstreams.openai("a")
    config = chain_config([endpoint("a", url), endpoint("b", url)])
    router = upstreams.router(config)
    before = router.holder.snapshot
    assert before is not None
    config["endpoints"][1]["model"] = "changed"
    assert router.holder.apply(parse_config(config), "test")
    after = router.holder.snapshot
    assert after is not None
    assert after.endpoints["a"].state is before.endpoints["a"].state
    assert after.endpoints["b"].state is not before.endpoints["b"].state
    assert not router.holder.apply(parse_config(config), "test"), "same content: no swap"


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(1200):  # 60 s: a loaded machine starts Python processes slowly
        if proc.poll() is not None:
            raise AssertionError(f"modelplane serve exited with {proc.returncode}")
        try:
            if http("GET", url + "/readyz").status_code == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("modelplane serve did not become ready")


def _models(url: str) -> list[str]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    return sorted(m.id for m in client.models.list())


def test_serve_process_reloads_on_change_and_sighup_and_keeps_old_on_bad(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    _, url = upstreams.openai("a")
    config = chain_config([endpoint("a", url)])
    config["server"] = {"watchIntervalSeconds": 0.1}
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modelplane_cli.main",
                "serve",
                "--config",
                str(path),
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, proc)
        assert _models(base) == ["chat"]

        # A good change on disk is picked up by the watcher.
        config["models"].append({"name": "chat2", "endpoints": ["a"]})
        path.write_text(yaml.safe_dump(config))
        for _ in range(600):
            if _models(base) == ["chat", "chat2"]:
                break
            time.sleep(0.05)
        assert _models(base) == ["chat", "chat2"]

        # A broken file is rejected with a clear log line; the old config keeps serving.
        path.write_text("models: [\n")
        os.kill(proc.pid, signal.SIGHUP)
        for _ in range(600):
            if "config rejected" in log_path.read_text():
                break
            time.sleep(0.05)
        log_text = log_path.read_text()
        assert "config rejected, keeping version" in log_text
        assert "not valid YAML" in log_text
        assert _models(base) == ["chat", "chat2"]
        reply = openai.OpenAI(base_url=base + "/v1", api_key="x").chat.completions.create(
            model="chat2", messages=[{"role": "user", "content": "still up?"}]
        )
        assert reply.choices[0].message.content

        # A good file is applied again (by SIGHUP or the watcher, whichever comes first).
        config["models"] = config["models"][:1]
        path.write_text(yaml.safe_dump(config))
        os.kill(proc.pid, signal.SIGHUP)
        for _ in range(600):
            if _models(base) == ["chat"]:
                break
            time.sleep(0.05)
        assert _models(base) == ["chat"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_serve_refuses_an_invalid_file_at_start(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"endpoints": [], "models": []}))
    result = subprocess.run(
        [sys.executable, "-m", "modelplane_cli.main", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "invalid config" in result.stderr
    assert "endpoints: Tuple should have at least 1 item" in result.stderr
