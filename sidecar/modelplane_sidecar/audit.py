"""Tamper-evident audit trail: one JSON line per request, hash-chained, checkpointed with Ed25519.

Each record carries `seq`, the hash of the previous record (`prev`) and its own `hash`
(SHA-256 over `prev` and the record's canonical JSON). Every `checkpoint_every` records (and when
the log closes) a checkpoint line signs the chain head with the sidecar's Ed25519 key. Editing,
deleting or reordering any line breaks the chain at that point, and re-hashing the tail cannot be
hidden because the signed checkpoints no longer match; `verify_lines` says exactly where.

Records never hold prompt text or matched sensitive values: callers pass only labels, detector
names, endpoint names, counts and outcomes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

GENESIS = "0" * 64
RECORD = "request"
CHECKPOINT = "checkpoint"
START = "chain-start"


def _canonical(entry: dict[str, Any]) -> bytes:
    return orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)


def _link(prev: str, entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(prev.encode() + b"\n" + _canonical(body)).hexdigest()


def _checkpoint_message(chain: str, seq: int, head: str) -> bytes:
    return f"modelplane-audit-v1\n{chain}\n{seq}\n{head}".encode()


def public_key_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = path.read_bytes()
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(text_or_path: str) -> Ed25519PublicKey:
    """A base64 raw key (as printed in the chain-start line) or a PEM file."""
    candidate = Path(text_or_path)
    if candidate.exists():
        key = serialization.load_pem_public_key(candidate.read_bytes())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{text_or_path}: not an Ed25519 public key")
        return key
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text_or_path))


@dataclass
class AuditChain:
    """Builds the chained lines; pure and synchronous (the writer does the I/O)."""

    key: Ed25519PrivateKey
    checkpoint_every: int = 100
    chain: str = field(default_factory=lambda: os.urandom(8).hex())
    seq: int = 0
    head: str = GENESIS
    _since_checkpoint: int = 0

    def _append(self, entry: dict[str, Any]) -> bytes:
        self.seq += 1
        entry["seq"] = self.seq
        entry["chain"] = self.chain
        entry["prev"] = self.head
        entry["hash"] = _link(self.head, entry)
        self.head = entry["hash"]
        return _canonical(entry) + b"\n"

    def start(self, identity: dict[str, Any]) -> bytes:
        entry = {
            "type": START,
            "ts": _now(),
            "publicKey": public_key_text(self.key.public_key()),
            **identity,
        }
        return self._append(entry)

    def record(self, fields: dict[str, Any]) -> list[bytes]:
        lines = [self._append({"type": RECORD, "ts": _now(), **fields})]
        self._since_checkpoint += 1
        if self._since_checkpoint >= self.checkpoint_every:
            lines.append(self.checkpoint())
        return lines

    def checkpoint(self) -> bytes:
        self._since_checkpoint = 0
        covered = self.seq
        signature = self.key.sign(_checkpoint_message(self.chain, covered, self.head))
        entry = {
            "type": CHECKPOINT,
            "ts": _now(),
            "covers": covered,
            "head": self.head,
            "sig": base64.b64encode(signature).decode(),
        }
        return self._append(entry)


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class AuditLog:
    """Async front of an AuditChain: records are chained at once, written in batches off-loop."""

    def __init__(
        self,
        chain: AuditChain,
        sink: IO[bytes],
        identity: dict[str, Any],
        flush_interval: float = 0.2,
    ) -> None:
        self._chain = chain
        self._sink = sink
        self._pending: list[bytes] = [chain.start(identity)]
        self._interval = flush_interval
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def open(
        cls,
        destination: str,
        key: Ed25519PrivateKey,
        identity: dict[str, Any],
        checkpoint_every: int = 100,
    ) -> AuditLog:
        to_stdout = destination in ("-", "stdout")
        # The file stays open for the life of the log; close() closes it.
        sink: IO[bytes] = sys.stdout.buffer if to_stdout else Path(destination).open("ab")  # noqa: SIM115
        return cls(AuditChain(key, checkpoint_every), sink, identity)

    def record(self, fields: dict[str, Any]) -> None:
        self._pending.extend(self._chain.record(fields))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        await asyncio.get_running_loop().run_in_executor(None, self._write, batch)

    def _write(self, batch: list[bytes]) -> None:
        self._sink.write(b"".join(batch))
        self._sink.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._pending.append(self._chain.checkpoint())
        await self.flush()
        if self._sink is not sys.stdout.buffer:
            self._sink.close()


@dataclass
class VerifyReport:
    ok: bool
    records: int
    checkpoints: int
    problems: list[str]
    #: Records after the last signed checkpoint: intact-looking but not yet signed.
    unsigned_tail: int
    public_key: str | None


def verify_lines(
    lines: Iterable[bytes], public_key: Ed25519PublicKey | None = None
) -> VerifyReport:
    """Check one chain; every problem names the line number and what is wrong there."""
    problems: list[str] = []
    head = GENESIS
    expected_seq = 1
    chain_id: str | None = None
    key = public_key
    embedded: str | None = None
    records = checkpoints = 0
    last_signed = 0
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            entry = orjson.loads(raw)
        except orjson.JSONDecodeError:
            problems.append(f"line {number}: not valid JSON (edited or corrupted)")
            continue
        seq = entry.get("seq")
        if chain_id is None:
            chain_id = entry.get("chain")
        if entry.get("chain") != chain_id:
            problems.append(
                f"line {number}: belongs to chain {entry.get('chain')!r}, not {chain_id!r}"
            )
        if seq != expected_seq:
            if isinstance(seq, int) and seq > expected_seq:
                problems.append(
                    f"line {number}: seq {seq} follows {expected_seq - 1}: "
                    f"{seq - expected_seq} record(s) missing (deleted) before it"
                )
            else:
                problems.append(
                    f"line {number}: seq {seq} where {expected_seq} was expected (reordered "
                    "or duplicated)"
                )
        if entry.get("prev") != head:
            problems.append(f"line {number} (seq {seq}): does not link to the record before it")
        if _link(entry.get("prev", ""), entry) != entry.get("hash"):
            problems.append(f"line {number} (seq {seq}): content does not match its hash (edited)")
        kind = entry.get("type")
        if kind == START and embedded is None:
            embedded = entry.get("publicKey")
            if key is None and isinstance(embedded, str):
                key = Ed25519PublicKey.from_public_bytes(base64.b64decode(embedded))
        elif kind == CHECKPOINT:
            checkpoints += 1
            if key is None:
                problems.append(f"line {number}: checkpoint but no public key to check it with")
            else:
                try:
                    key.verify(
                        base64.b64decode(entry.get("sig", "")),
                        _checkpoint_message(
                            str(chain_id), int(entry.get("covers", -1)), str(entry.get("head"))
                        ),
                    )
                    if entry.get("head") != head or entry.get("covers") != expected_seq - 1:
                        problems.append(
                            f"line {number}: signed checkpoint does not cover the chain as read"
                        )
                    last_signed = records
                except (InvalidSignature, ValueError):
                    problems.append(f"line {number}: checkpoint signature is not valid")
        elif kind == RECORD:
            records += 1
        head = entry.get("hash", "")
        expected_seq = (seq if isinstance(seq, int) else expected_seq) + 1
    return VerifyReport(
        ok=not problems,
        records=records,
        checkpoints=checkpoints,
        problems=problems,
        unsigned_tail=records - last_signed,
        public_key=embedded,
    )


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()
