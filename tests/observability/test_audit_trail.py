"""The audit trail end to end: `modelplane serve --audit-log` as a real process, then
`modelplane audit verify` on the file it wrote, intact and tampered with.

The app is the official `openai` SDK; the providers are OpenAI stand-ins. One prompt carries an
e-mail address and a card number: its records must name the detectors and data classes, and the
file must not hold the text anywhere. Any edit, deletion or reordering of a line, and a forged
re-hash of the chain, must make `audit verify` exit 1 and say at which line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from harness import Upstreams
from loopback_ports import free_port

from modelplane_sidecar.audit import AuditChain, generate_key, public_key_text
from modelplane_sidecar.standins.openai import Behaviour

MODELPLANE = str(Path(sys.executable).with_name("modelplane"))
EMAIL = "jane.roe@example.org"
CARD = "4111 1111 1111 1111"
PII_PROMPT = f"Please refund card {CARD} and send the receipt to {EMAIL} today"
UNKNOWN_MODEL = "gpt-typo-by-the-app"
IDENTITY = {
    "MODELPLANE_POD_NAMESPACE": "team-a",
    "MODELPLANE_POD_NAME": "billing-7d9f-x2x",
    "MODELPLANE_POD_SERVICE_ACCOUNT": "billing",
}

CONFIG = """
apiVersion: modelplane.io/v1alpha1
kind: RouterConfig
metadata: {{name: team-a-policy}}
endpoints:
  - {{name: cloud, provider: openai, baseUrl: "{cloud}", model: gpt-4o-mini, region: us-east-1,
     pricing: {{inputPerMtok: 0.15, outputPerMtok: 0.6}}}}
  - {{name: onprem, provider: openai, baseUrl: "{onprem}", model: llama-3-70b, region: dc-1,
     tags: [on-prem]}}
models:
  - name: chat
    endpoints: [cloud, onprem]
    retry: {{maxAttempts: 1}}
  - name: private
    endpoints: [cloud, onprem]
  - name: cloud-only
    endpoints: [cloud]
sensitivity:
  classes:
    - {{name: public}}
    - {{name: pii, allowedTags: [on-prem]}}
    - {{name: secret, allowedTags: [on-prem]}}
"""


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    """Until `modelplane serve` answers /readyz with 200 (bounded: 60 s; a loaded machine starts
    Python processes slowly)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if _get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    process.kill()
    _, err = process.communicate()
    pytest.fail(f"sidecar did not start: {(err or b'').decode()[-3000:]}")


def _modelplane(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MODELPLANE, *args], capture_output=True, text=True, timeout=60, check=False
    )


@dataclass
class Run:
    """What one `modelplane serve` run left behind."""

    audit: Path
    public_key: str
    stderr: str
    metrics: str
    lines: list[bytes]

    def records(self) -> list[dict[str, Any]]:
        entries = [orjson.loads(line) for line in self.lines]
        return [e for e in entries if e["type"] == "request"]

    def record(self, **match: Any) -> dict[str, Any]:
        found = [r for r in self.records() if match.items() <= r.items()]
        assert len(found) == 1, (match, found)
        return found[0]


def _serve_and_call(upstreams: Upstreams, tmp_path: Path) -> Run:
    cloud, cloud_url = upstreams.openai("cloud")
    _, onprem_url = upstreams.openai("onprem")
    config = tmp_path / "router.yaml"
    config.write_text(CONFIG.format(cloud=cloud_url, onprem=onprem_url))
    key = tmp_path / "audit-key.pem"
    keygen = _modelplane("audit", "keygen", "--out", str(key))
    assert keygen.returncode == 0, keygen.stderr
    public_key = keygen.stdout.strip()
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    audit = tmp_path / "audit.jsonl"
    port = free_port()
    process = subprocess.Popen(
        [
            MODELPLANE,
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--audit-log",
            str(audit),
            "--audit-key",
            str(key),
            "--audit-checkpoint-every",
            "3",
        ],
        env={**os.environ, **IDENTITY, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_ready(port, process)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="placeholder", max_retries=0
        )
        hello = [{"role": "user", "content": "hello"}]
        pii = [{"role": "user", "content": PII_PROMPT}]
        client.chat.completions.with_raw_response.create(
            model="chat", messages=hello, extra_headers={"x-request-id": "req-plain"}
        )
        client.chat.completions.create(
            model="private", messages=pii, extra_headers={"x-request-id": "req-pii"}
        )
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(
                model="cloud-only", messages=pii, extra_headers={"x-request-id": "req-refused"}
            )
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model=UNKNOWN_MODEL, messages=pii, extra_headers={"x-request-id": "req-unknown"}
            )
        cloud.then(Behaviour("status", 503))
        with client.chat.completions.create(
            model="chat", messages=hello, stream=True, extra_headers={"x-request-id": "req-stream"}
        ) as stream:
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        metrics = _get(f"http://127.0.0.1:{port}/metrics")[1].decode()
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err.decode()[-3000:]
    return Run(audit, public_key, err.decode(), metrics, audit.read_bytes().splitlines())


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    from harness import ServerThread

    servers = ServerThread()
    try:
        yield _serve_and_call(Upstreams(servers), tmp_path_factory.mktemp("audit"))
    finally:
        servers.close()


def _verify(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _modelplane("audit", "verify", str(path), *extra)


def _tampered(run: Run, tmp_path: Path, lines: list[bytes]) -> Path:
    path = tmp_path / "tampered.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _index(run: Run, request_id: str) -> int:
    return next(i for i, line in enumerate(run.lines) if request_id.encode() in line)


def test_pii_request_is_recorded_with_labels_and_without_its_text(run: Run) -> None:
    record = run.record(requestId="req-pii")
    assert record["classification"] == {
        "labels": ["email", "payment-card"],
        "classes": ["pii", "public"],
        "declared": None,
    }
    assert record["namespace"] == "team-a"
    assert record["pod"] == "billing-7d9f-x2x"
    assert record["serviceAccount"] == "billing"
    assert record["policy"] == "team-a-policy"
    assert record["configVersion"]
    assert record["api"] == "/v1/chat/completions"
    assert record["model"] == "private"
    assert record["rule"] == "model:private"
    assert record["removed"] == [
        {
            "endpoint": "cloud",
            "step": "compliance",
            "reason": "data class 'pii' needs a tag in [on-prem]; endpoint has [no tags]",
        }
    ]
    assert (record["endpoint"], record["provider"], record["region"]) == (
        "onprem",
        "openai",
        "dc-1",
    )
    assert record["upstreamModel"] == "llama-3-70b"
    assert record["attempts"] == [
        {"endpoint": "onprem", "attempt": 1, "result": "ok", "status": 200}
    ]
    assert record["tokens"]["input"] > 0 and record["tokens"]["output"] > 0
    assert (record["outcome"], record["status"], record["error"]) == ("ok", 200, None)


def test_the_file_never_holds_the_sensitive_text(run: Run) -> None:
    raw = run.audit.read_bytes()
    # (Short digit runs could occur in hashes by chance; these cannot.)
    for text in (EMAIL, "jane.roe", "example.org", CARD, CARD.replace(" ", ""), "refund"):
        assert text.encode() not in raw.lower(), text
    assert UNKNOWN_MODEL.encode() not in raw


def test_refusals_are_recorded(run: Run) -> None:
    refused = run.record(requestId="req-refused")
    assert (refused["outcome"], refused["status"]) == ("refused", 403)
    assert refused["error"] == "no_compliant_endpoint"
    assert refused["classification"]["labels"] == ["email", "payment-card"]
    assert refused["rule"] == "model:cloud-only"
    assert refused["removed"][0]["step"] == "compliance"
    assert refused["endpoint"] is None and refused["attempts"] == []
    unknown = run.record(requestId="req-unknown")
    assert (unknown["outcome"], unknown["status"], unknown["error"]) == (
        "refused",
        404,
        "model_not_found",
    )
    assert unknown["model"] is None


def test_attempts_fallback_and_cost_are_recorded(run: Run) -> None:
    plain = run.record(requestId="req-plain")
    assert plain["endpoint"] == "cloud" and plain["costUsd"] > 0
    assert plain["classification"]["labels"] == []
    streamed = run.record(requestId="req-stream")
    assert streamed["stream"] is True and streamed["ttftMs"] > 0
    assert streamed["attempts"] == [
        {"endpoint": "cloud", "attempt": 1, "result": "server-error", "status": 503},
        {"endpoint": "onprem", "attempt": 1, "result": "ok", "status": 200},
    ]
    assert streamed["endpoint"] == "onprem"


def test_chain_start_names_the_sidecar_and_its_key(run: Run) -> None:
    start = orjson.loads(run.lines[0])
    assert start["type"] == "chain-start"
    assert start["publicKey"] == run.public_key
    assert (start["namespace"], start["pod"], start["serviceAccount"]) == (
        "team-a",
        "billing-7d9f-x2x",
        "billing",
    )
    kinds = [orjson.loads(line)["type"] for line in run.lines]
    assert kinds.count("request") == 5
    # Every 3 records, and one more when the sidecar closed the log on SIGTERM.
    assert kinds.count("checkpoint") == 2
    assert kinds[-1] == "checkpoint"


def test_logs_are_json_lines_with_the_public_key_and_no_private_key(run: Run) -> None:
    entries = [orjson.loads(line) for line in run.stderr.splitlines() if line.strip()]
    assert entries and all({"ts", "level", "logger", "msg"} <= e.keys() for e in entries)
    announced = [e for e in entries if "auditPublicKey" in e]
    assert [e["auditPublicKey"] for e in announced] == [run.public_key]
    assert "PRIVATE KEY" not in run.stderr


def test_metrics_of_the_real_process(run: Run) -> None:
    assert 'modelplane_config_sync_state{state="standalone"} 1.0' in run.metrics
    assert 'modelplane_config_sync_state{state="synced"} 0.0' in run.metrics
    written = next(
        float(line.split()[-1])
        for line in run.metrics.splitlines()
        if line.startswith("modelplane_audit_records_total ")
    )
    # The stream's record may land just after the scrape.
    assert written >= 4
    assert "_created" not in run.metrics


def test_intact_file_verifies_with_the_pinned_key(run: Run) -> None:
    result = _verify(run.audit, "--public-key", run.public_key)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 record(s) in 1 chain(s), 2 signed checkpoint(s): intact" in result.stdout
    assert _verify(run.audit, "--strict").returncode == 0
    report = orjson.loads(_verify(run.audit, "--json").stdout)
    assert report["ok"] and report["records"] == 5 and report["unsignedTail"] == 0


def test_edited_record_is_detected_at_its_line(run: Run, tmp_path: Path) -> None:
    lines = list(run.lines)
    at = _index(run, "req-pii")
    entry = orjson.loads(lines[at])
    entry["endpoint"] = "cloud"
    lines[at] = orjson.dumps(entry)
    result = _verify(_tampered(run, tmp_path, lines), "--public-key", run.public_key)
    assert result.returncode == 1
    assert f"line {at + 1} (seq {entry['seq']}): content does not match its hash" in result.stdout


def test_deleted_record_is_detected(run: Run, tmp_path: Path) -> None:
    lines = list(run.lines)
    at = _index(run, "req-refused")
    del lines[at]
    result = _verify(_tampered(run, tmp_path, lines), "--public-key", run.public_key)
    assert result.returncode == 1
    assert f"line {at + 1}: seq" in result.stdout and "missing (deleted)" in result.stdout


def test_reordered_records_are_detected(run: Run, tmp_path: Path) -> None:
    lines = list(run.lines)
    a, b = _index(run, "req-plain"), _index(run, "req-pii")
    lines[a], lines[b] = lines[b], lines[a]
    result = _verify(_tampered(run, tmp_path, lines), "--public-key", run.public_key)
    assert result.returncode == 1
    assert f"line {a + 1}" in result.stdout and "TAMPERED" in result.stdout


def test_dropped_tail_and_checkpoint_are_reported(run: Run, tmp_path: Path) -> None:
    # Cutting the last record and the closing checkpoint leaves a chain that links, but whose
    # last record is not covered by any signature: --strict fails on it.
    path = _tampered(run, tmp_path, run.lines[:-1])
    assert _verify(path, "--strict", "--public-key", run.public_key).returncode == 1
    lenient = _verify(path, "--public-key", run.public_key)
    assert lenient.returncode == 0
    assert "the last 2 record(s) come after the last signed checkpoint" in lenient.stdout


def test_tail_cut_at_a_checkpoint_is_caught_by_the_logged_anchors(run: Run, tmp_path: Path) -> None:
    """Cut right after a checkpoint, the file is a valid signed chain on its own; the
    checkpoints the sidecar also wrote to its log show that a later one is missing."""
    first_checkpoint = next(
        i for i, line in enumerate(run.lines) if orjson.loads(line)["type"] == "checkpoint"
    )
    cut = _tampered(run, tmp_path, run.lines[: first_checkpoint + 1])
    assert _verify(cut, "--strict", "--public-key", run.public_key).returncode == 0
    log = tmp_path / "sidecar.log"
    log.write_text(run.stderr)
    result = _verify(cut, "--public-key", run.public_key, "--anchors", str(log))
    assert result.returncode == 1
    assert "the checkpoint over seq 7 that the sidecar logged is not in the file" in result.stdout
    intact = _verify(run.audit, "--public-key", run.public_key, "--anchors", str(log))
    assert intact.returncode == 0, intact.stdout


def test_rehashed_forgery_fails_the_pinned_key(run: Run, tmp_path: Path) -> None:
    """An attacker who edits a record and re-hashes the whole chain must sign with a key of
    their own, and the pinned key exposes that."""
    entries = [orjson.loads(line) for line in run.lines]
    forger = AuditChain(generate_key(), checkpoint_every=3, chain=entries[0]["chain"])
    forged = [forger.start({k: entries[0][k] for k in ("namespace", "pod", "serviceAccount")})]
    for entry in entries[1:]:
        if entry["type"] != "request":
            continue
        fields = {k: v for k, v in entry.items() if k not in ("seq", "chain", "prev", "hash")}
        fields.pop("type")
        fields.pop("ts")
        if fields["requestId"] == "req-pii":
            fields["endpoint"] = "cloud"
        forged += forger.record(fields)
    forged.append(forger.checkpoint())
    path = _tampered(run, tmp_path, [line.rstrip(b"\n") for line in forged])
    # Self-consistent without a pinned key...
    assert _verify(path).returncode == 0
    # ...but not signed by the sidecar's key.
    result = _verify(path, "--public-key", run.public_key)
    assert result.returncode == 1
    assert "checkpoint signature is not valid" in result.stdout


def test_wrong_pinned_key_fails(run: Run) -> None:
    other = public_key_text(generate_key().public_key())
    result = _verify(run.audit, "--public-key", other)
    assert result.returncode == 1
    assert "checkpoint signature is not valid" in result.stdout


def test_audit_on_stdout_verifies_from_the_whole_container_log(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    """In a Pod the audit goes to stdout and the logs to stderr; the container log holds both,
    as `kubectl logs` prints it. That one file is the audit, its anchors and its key."""
    _, url = upstreams.openai("cloud")
    config = tmp_path / "router.yaml"
    config.write_text(CONFIG.format(cloud=url, onprem=url))
    container_log = tmp_path / "container.log"
    port = free_port()
    with container_log.open("wb") as out:
        process = subprocess.Popen(
            [
                *(MODELPLANE, "serve", "--config", str(config), "--port", str(port)),
                *("--audit-log", "-", "--audit-checkpoint-every", "1"),
            ],
            env={**os.environ, **IDENTITY, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_ready(port, process)
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="placeholder", max_retries=0
            )
            client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}]
            )
            client.chat.completions.create(
                model="private", messages=[{"role": "user", "content": PII_PROMPT}]
            )
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)
    raw = container_log.read_bytes()
    assert EMAIL.encode() not in raw and CARD.encode() not in raw
    logged = [orjson.loads(line) for line in raw.splitlines() if b"auditPublicKey" in line]
    public_key = logged[0]["auditPublicKey"]

    def verify(data: bytes, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MODELPLANE, "audit", "verify", "-", "--container-log", "--anchors", "-", *extra],
            input=data.decode(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    result = verify(raw, "--public-key", public_key, "--strict")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stdin: 2 record(s) in 1 chain(s), 3 signed checkpoint(s)" in result.stdout
    assert "3 logged checkpoint(s) checked: intact" in result.stdout
    lines = raw.splitlines()
    pii_line = next(i for i, line in enumerate(lines) if b'"model":"private"' in line)
    del lines[pii_line]
    tampered = verify(b"\n".join(lines) + b"\n", "--public-key", public_key)
    assert tampered.returncode == 1
    assert "missing (deleted)" in tampered.stdout
