"""AuditLog's writing (retries, timed checkpoints, logged anchors) and files with several chains."""

from __future__ import annotations

import asyncio
import io
import logging
import threading

import orjson
import pytest

from modelplane_sidecar.audit import (
    AuditChain,
    AuditLog,
    generate_key,
    load_public_key,
    public_key_text,
    read_anchors,
    verify_lines,
)


def _chain_lines(records: int, close: bool = True, every: int = 100) -> list[bytes]:
    chain = AuditChain(generate_key(), checkpoint_every=every)
    lines = [chain.start({"pod": "p"})]
    for i in range(records):
        lines += chain.record({"requestId": f"r{i}"})
    if close:
        lines.append(chain.checkpoint())
    return lines


def test_a_restarted_sidecar_appends_a_second_chain_that_verifies() -> None:
    lines = _chain_lines(3) + _chain_lines(2)
    report = verify_lines(lines)
    assert report.ok, report.problems
    assert (report.chains, report.records, report.checkpoints) == (2, 5, 2)
    assert not report.warnings


def test_an_edit_in_the_second_chain_names_its_line() -> None:
    lines = _chain_lines(3) + _chain_lines(2)
    entry = orjson.loads(lines[6])
    entry["requestId"] = "forged"
    lines[6] = orjson.dumps(entry)
    report = verify_lines(lines)
    assert any(p.startswith("line 7 ") and "edited" in p for p in report.problems)


def test_a_chain_that_was_never_closed_is_a_warning_not_proof() -> None:
    report = verify_lines(_chain_lines(3, close=False) + _chain_lines(1))
    assert report.ok
    assert len(report.warnings) == 1 and "3 unsigned record(s)" in report.warnings[0]


def test_a_pinned_key_rejects_a_chain_signed_by_another() -> None:
    mine = AuditChain(generate_key())
    lines = [mine.start({}), *mine.record({"requestId": "a"}), mine.checkpoint()]
    lines += _chain_lines(1)
    pinned = load_public_key(public_key_text(mine.key.public_key()))
    report = verify_lines(lines, pinned)
    other = orjson.loads(lines[3])["publicKey"]
    assert report.problems == [
        f"line 4: chain {orjson.loads(lines[3])['chain']!r} was signed with public key {other}, "
        f"not the pinned key {public_key_text(mine.key.public_key())}: another signer wrote it "
        "(another sidecar's key, a key generated per run, or a forged chain)",
        "line 6: checkpoint signature is not valid",
    ]
    assert report.foreign_keys == [other]


def test_anchors_expose_a_cut_tail_and_foreign_chains_are_a_warning() -> None:
    chain = AuditChain(generate_key(), checkpoint_every=2)
    lines = [chain.start({})]
    anchors = []
    for i in range(4):
        lines += chain.record({"requestId": f"r{i}"})
        if chain.last_checkpoint is not None:
            anchors.append((chain.chain, *chain.last_checkpoint))
    assert len(set(anchors)) == 2
    cut = lines[:4]  # start, r0, r1, checkpoint over seq 3: a valid file by itself
    assert verify_lines(cut).ok
    report = verify_lines(cut, anchors=[*set(anchors), ("another-chain", 9, "00")])
    assert report.problems == [
        f"chain {chain.chain!r}: the checkpoint over seq 6 that the sidecar logged is not in "
        "the file (records cut from the end, or the checkpoint removed)"
    ]
    assert report.warnings and "not in this file" in report.warnings[0]


def test_empty_file_is_a_problem() -> None:
    assert verify_lines([]).problems == ["no audit lines in the file"]


class FlakySink(io.BytesIO):
    """A sink whose first `failures` writes fail like a full disk."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.failures:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        return super().write(data)

    def close(self) -> None:
        """Keep the bytes readable after AuditLog.close()."""


async def test_a_failed_write_is_retried_and_the_chain_stays_whole() -> None:
    sink = FlakySink(failures=1)
    errors: list[OSError] = []
    log = AuditLog(AuditChain(generate_key()), sink, {}, on_write_error=errors.append)
    log.record({"requestId": "a"})
    await log.flush()
    assert len(errors) == 1 and sink.getvalue() == b""
    log.record({"requestId": "b"})
    await log.close()
    report = verify_lines(sink.getvalue().splitlines())
    assert report.ok and report.records == 2 and report.unsigned_tail == 0


async def test_lines_beyond_the_pending_limit_are_dropped_and_show_as_missing() -> None:
    sink = FlakySink(failures=3)
    log = AuditLog(AuditChain(generate_key()), sink, {}, max_pending=3)
    for name in "abcd":
        log.record({"requestId": name})
        await log.flush()
    await log.close()
    report = verify_lines(sink.getvalue().splitlines())
    assert not report.ok
    assert any("missing (deleted)" in p for p in report.problems)


async def test_a_quiet_sidecar_signs_its_tail_after_checkpoint_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = FlakySink(failures=0)
    log = AuditLog(
        AuditChain(generate_key()), sink, {}, flush_interval=0.01, checkpoint_seconds=0.0
    )
    caplog.set_level(logging.INFO, logger="modelplane.sidecar.audit")
    log.start()
    log.record({"requestId": "a"})
    for _ in range(3000):  # bounded wait (30 s) for the background flush
        if b'"checkpoint"' in sink.getvalue():
            break
        await asyncio.sleep(0.01)
    report = verify_lines(sink.getvalue().splitlines())
    assert report.ok and report.checkpoints >= 1 and report.unsigned_tail == 0
    await log.close()
    logged = [r for r in caplog.records if r.getMessage() == "audit checkpoint signed"]
    anchors = read_anchors(
        orjson.dumps(
            {"auditChain": r.auditChain, "auditCovers": r.auditCovers, "auditHead": r.auditHead}
        )
        for r in logged
    )
    assert len(anchors) >= 2  # the timed one and the closing one
    assert verify_lines(sink.getvalue().splitlines(), anchors=anchors).ok


class _HeldSink(io.BytesIO):
    """A file whose first write waits until the test lets it go (a slow disk, or an executor
    that has not started the write yet), and that refuses writes once closed, like a file."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.go_on = threading.Event()
        self.writes = 0
        self.kept = b""

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        if self.writes == 1:
            self.entered.set()
            self.go_on.wait(30)
        return super().write(data)

    def close(self) -> None:
        self.kept = self.getvalue()
        super().close()


async def test_closing_while_a_batch_is_being_written_loses_no_line_and_keeps_the_order() -> None:
    sink = _HeldSink()
    log = AuditLog(AuditChain(generate_key()), sink, {}, flush_interval=0.01)
    log.start()
    log.record({"requestId": "a"})
    log.record({"requestId": "b"})
    for _ in range(3000):  # bounded wait (30 s) for the flush loop to be inside its write
        if sink.entered.is_set():
            break
        await asyncio.sleep(0.01)
    assert sink.entered.is_set()
    closing = asyncio.create_task(log.close())
    await asyncio.sleep(0.1)  # close() runs meanwhile; the write in flight must not be dropped
    sink.go_on.set()
    await closing
    report = verify_lines(sink.kept.splitlines())
    assert report.ok, report.problems
    assert (report.records, report.checkpoints, report.unsigned_tail) == (2, 1, 0)
