"""The audit chain detects any edit, deletion or reordering, and says where."""

from __future__ import annotations

import orjson
import pytest

from modelplane_sidecar.audit import (
    AuditChain,
    generate_key,
    load_public_key,
    public_key_text,
    verify_lines,
)


def _log(records: int = 10, every: int = 4) -> tuple[list[bytes], AuditChain]:
    chain = AuditChain(generate_key(), checkpoint_every=every)
    lines = [chain.start({"pod": "app-1", "namespace": "team-a"})]
    for i in range(records):
        lines += chain.record({"requestId": f"r{i}", "endpoint": "a", "outcome": "ok"})
    lines.append(chain.checkpoint())
    return lines, chain


def test_intact_log_verifies_with_pinned_key() -> None:
    lines, chain = _log()
    pinned = load_public_key(public_key_text(chain.key.public_key()))
    report = verify_lines(lines, pinned)
    assert report.ok, report.problems
    assert report.records == 10
    assert report.checkpoints == 3
    assert report.unsigned_tail == 0


def test_edit_is_detected_at_its_line() -> None:
    lines, _ = _log()
    entry = orjson.loads(lines[3])
    entry["endpoint"] = "b"
    lines[3] = orjson.dumps(entry) + b"\n"
    report = verify_lines(lines)
    assert not report.ok
    assert any(p.startswith("line 4 ") and "edited" in p for p in report.problems)


def test_rehashed_tail_is_caught_by_the_signed_checkpoint() -> None:
    lines, chain = _log(records=3, every=100)
    # An attacker edits record 2 and recomputes every hash after it, but cannot sign.
    forged = AuditChain(generate_key(), checkpoint_every=100, chain=chain.chain)
    rebuilt = [forged.start({"pod": "app-1", "namespace": "team-a"})]
    for i in range(3):
        rebuilt += forged.record({"requestId": f"r{i}", "endpoint": "x", "outcome": "ok"})
    rebuilt.append(lines[-1])  # the genuine signed checkpoint
    pinned = load_public_key(public_key_text(chain.key.public_key()))
    report = verify_lines(rebuilt, pinned)
    assert not report.ok
    assert any("checkpoint" in p for p in report.problems)


@pytest.mark.parametrize("index", [1, 4, 7])
def test_deletion_is_detected(index: int) -> None:
    lines, _ = _log()
    del lines[index]
    report = verify_lines(lines)
    assert not report.ok
    assert any("missing (deleted)" in p for p in report.problems), report.problems


def test_reordering_is_detected() -> None:
    lines, _ = _log()
    lines[2], lines[3] = lines[3], lines[2]
    report = verify_lines(lines)
    assert not report.ok
    assert any("reordered" in p or "does not link" in p for p in report.problems)


def test_unsigned_tail_is_reported() -> None:
    lines, _ = _log(records=6, every=4)
    lines = lines[:-1]  # drop the final checkpoint
    report = verify_lines(lines)
    assert report.ok
    assert report.unsigned_tail == 2


def test_garbage_line_is_reported() -> None:
    lines, _ = _log()
    lines[5] = b"{not json\n"
    report = verify_lines(lines)
    assert any(p.startswith("line 6: not valid JSON") for p in report.problems)
