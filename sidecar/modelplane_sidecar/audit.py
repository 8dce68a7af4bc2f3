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
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )
# cryptography (about 6 MB resident) is imported where a key is made, read or checked: a sidecar
# without an audit log never loads it.

log = logging.getLogger("modelplane.sidecar.audit")

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
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = path.read_bytes()
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def _public_key_from_pem(pem: bytes, where: str) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if b"PRIVATE KEY" in pem:
        raise ValueError(
            f"{where} holds a private key: pin its public half (`modelplane audit public-key "
            "FILE`), and keep the private key out of the verifier's hands"
        )
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise ValueError(f"{where} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{where} is not an Ed25519 public key")
    return key


def load_public_key(text_or_path: str) -> Ed25519PublicKey:
    """A base64 raw key (as printed in the chain-start line), a PEM file, or PEM text."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if text_or_path.lstrip().startswith("-----BEGIN"):
        return _public_key_from_pem(text_or_path.encode(), "the PEM text")
    candidate = Path(text_or_path)
    if candidate.is_file():
        return _public_key_from_pem(candidate.read_bytes(), text_or_path)
    try:
        raw = base64.b64decode(text_or_path.strip(), validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ValueError(
            f"{text_or_path!r} is neither a PEM file nor a base64 Ed25519 public key "
            "(32 bytes, as `modelplane audit keygen` prints it)"
        )
    return Ed25519PublicKey.from_public_bytes(raw)


@dataclass
class AuditChain:
    """Builds the chained lines; pure and synchronous (the writer does the I/O)."""

    key: Ed25519PrivateKey
    checkpoint_every: int = 100
    chain: str = field(default_factory=lambda: os.urandom(8).hex())
    seq: int = 0
    head: str = GENESIS
    #: (seq covered, chain head) of the last checkpoint signed.
    last_checkpoint: tuple[int, str] | None = None
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

    @property
    def unsigned(self) -> int:
        """Records appended since the last checkpoint."""
        return self._since_checkpoint

    def checkpoint(self) -> bytes:
        self._since_checkpoint = 0
        covered = self.seq
        self.last_checkpoint = (covered, self.head)
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
    """Async front of an AuditChain: records are chained at once, written in batches off-loop.

    A checkpoint is signed every `checkpoint_every` records and, when records are waiting for
    one, every `checkpoint_seconds`, so a quiet sidecar's tail does not stay unsigned for long.
    A failed write keeps the lines and tries again on the next flush (up to `max_pending`
    lines; beyond that the oldest are dropped, which `verify_lines` then reports as missing).
    """

    def __init__(
        self,
        chain: AuditChain,
        sink: IO[bytes],
        identity: dict[str, Any],
        flush_interval: float = 0.2,
        checkpoint_seconds: float = 60.0,
        on_write_error: Callable[[OSError], None] | None = None,
        max_pending: int = 100_000,
    ) -> None:
        self._chain = chain
        self._sink = sink
        self._pending: list[bytes] = [chain.start(identity)]
        self._interval = flush_interval
        self._checkpoint_seconds = checkpoint_seconds
        self._last_checkpoint = time.monotonic()
        self._on_write_error = on_write_error
        self._max_pending = max_pending
        self._task: asyncio.Task[None] | None = None
        #: The flush loop is writing a batch (close() must let it finish, not cancel it).
        self._flushing = False
        self._closing = False

    @property
    def chain(self) -> AuditChain:
        return self._chain

    @classmethod
    def open(
        cls,
        destination: str,
        key: Ed25519PrivateKey,
        identity: dict[str, Any],
        checkpoint_every: int = 100,
        checkpoint_seconds: float = 60.0,
        on_write_error: Callable[[OSError], None] | None = None,
    ) -> AuditLog:
        to_stdout = destination in ("-", "stdout")
        # The file stays open for the life of the log; close() closes it.
        sink: IO[bytes] = sys.stdout.buffer if to_stdout else Path(destination).open("ab")  # noqa: SIM115
        return cls(
            AuditChain(key, checkpoint_every),
            sink,
            identity,
            checkpoint_seconds=checkpoint_seconds,
            on_write_error=on_write_error,
        )

    def record(self, fields: dict[str, Any]) -> None:
        lines = self._chain.record(fields)
        self._pending.extend(lines)
        if len(lines) > 1:
            self._checkpointed()

    def _checkpointed(self) -> None:
        """Log every checkpoint: the log pipeline's copy is an anchor that a cut file lacks."""
        self._last_checkpoint = time.monotonic()
        if self._chain.last_checkpoint is not None:
            covers, head = self._chain.last_checkpoint
            log.info(
                "audit checkpoint signed",
                extra={"auditChain": self._chain.chain, "auditCovers": covers, "auditHead": head},
            )

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while not self._closing:
            await asyncio.sleep(self._interval)
            if (
                self._chain.unsigned
                and time.monotonic() - self._last_checkpoint >= self._checkpoint_seconds
            ):
                self._pending.append(self._chain.checkpoint())
                self._checkpointed()
            self._flushing = True
            try:
                await self.flush()
            finally:
                self._flushing = False

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._write, batch)
        except OSError as exc:
            self._pending[:0] = batch
            overflow = len(self._pending) - self._max_pending
            if overflow > 0:
                del self._pending[:overflow]
                log.error(
                    "audit log: dropped the %d oldest lines that could not be written", overflow
                )
            log.error("audit log write failed, will retry: %s", exc.strerror or exc)
            if self._on_write_error is not None:
                self._on_write_error(exc)

    def _write(self, batch: list[bytes]) -> None:
        self._sink.write(b"".join(batch))
        self._sink.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._closing = True
            # A batch being written is let finish: cancelled, it would be lost (the executor
            # may not have started its write yet) or land after the closing checkpoint.
            if not self._flushing:
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._pending.append(self._chain.checkpoint())
        self._checkpointed()
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
    #: Chains in the file: a sidecar that restarts appends a new chain to the same file.
    chains: int = 0
    #: Things that are not proof of tampering but limit what the file proves (see docs).
    warnings: list[str] = field(default_factory=list)
    #: Lines that are not audit entries, skipped in container-log mode.
    skipped: int = 0
    #: Public keys chains announce that are not the pinned one (signed by another key).
    foreign_keys: list[str] = field(default_factory=list)


@dataclass
class _ChainState:
    """Where one chain stands while its lines are read."""

    chain_id: str | None
    key: Ed25519PublicKey | None
    start_line: int
    head: str = GENESIS
    expected_seq: int = 1
    records: int = 0
    last_signed: int = 0

    @property
    def unsigned(self) -> int:
        return self.records - self.last_signed


def _check_checkpoint(
    state: _ChainState, entry: dict[str, Any], number: int, problems: list[str]
) -> bool:
    """True when the checkpoint is signed by the chain's key and covers the chain as read."""
    from cryptography.exceptions import InvalidSignature

    if state.key is None:
        problems.append(f"line {number}: checkpoint but no public key to check it with")
        return False
    try:
        covers = int(entry.get("covers", -1))
        state.key.verify(
            base64.b64decode(entry.get("sig", "")),
            _checkpoint_message(str(state.chain_id), covers, str(entry.get("head"))),
        )
    except (InvalidSignature, ValueError, TypeError):
        problems.append(f"line {number}: checkpoint signature is not valid")
        return False
    if entry.get("head") != state.head or covers != state.expected_seq - 1:
        problems.append(f"line {number}: signed checkpoint does not cover the chain as read")
        return False
    state.last_signed = state.records
    return True


def verify_lines(
    lines: Iterable[bytes],
    public_key: Ed25519PublicKey | None = None,
    anchors: Iterable[tuple[str, int, str]] = (),
    container_log: bool = False,
) -> VerifyReport:
    """Check every chain in a file; each problem names the line number and what is wrong there.

    A `chain-start` line with seq 1 begins a new chain (the sidecar restarted and appended).
    With `public_key`, every checkpoint must be signed by that key; without it, each chain's
    checkpoints are checked against the key its own start line announces, which proves the
    chain is intact but not who wrote it (pin the key for that). `anchors` are the
    (chain, covers, head) of checkpoints the sidecar logged elsewhere (`read_anchors`): each
    one of a chain in the file must be in the file, which exposes a tail cut at a checkpoint.
    With `container_log`, lines that are not audit entries are skipped: the input may be a
    container's whole output, the sidecar's JSON logs (stderr) interleaved with the audit
    (stdout), as `kubectl logs` prints it.
    """
    signed: set[tuple[str, int, str]] = set()
    pinned = public_key_text(public_key) if public_key is not None else None
    foreign_keys: list[str] = []
    problems: list[str] = []
    warnings: list[str] = []
    chains: list[_ChainState] = []
    state: _ChainState | None = None
    embedded: str | None = None
    records = checkpoints = 0

    def ended(current: _ChainState) -> None:
        """A later chain starts: this one should have ended with its closing checkpoint."""
        if current.unsigned:
            warnings.append(
                f"chain {current.chain_id!r} (from line {current.start_line}) ends with "
                f"{current.unsigned} unsigned record(s): the sidecar stopped without closing it "
                "(crash or kill), or its tail was cut"
            )

    skipped = 0
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            entry = orjson.loads(raw)
        except orjson.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict) or "hash" not in entry or "chain" not in entry:
            if container_log:
                # A log line between the audit lines. An audit line mangled into something
                # else is skipped too, and then shows as a gap in the seq numbers.
                skipped += 1
            elif entry is None:
                problems.append(f"line {number}: not valid JSON (edited or corrupted)")
            else:
                problems.append(f"line {number}: not an audit entry (edited or corrupted)")
            continue
        seq = entry.get("seq")
        kind = entry.get("type")
        if state is None or (kind == START and seq == 1):
            if state is not None:
                ended(state)
            state = _ChainState(entry.get("chain"), public_key, number)
            chains.append(state)
        if entry.get("chain") != state.chain_id:
            problems.append(
                f"line {number}: belongs to chain {entry.get('chain')!r}, not {state.chain_id!r}"
            )
        expected = state.expected_seq
        if seq != expected:
            if isinstance(seq, int) and seq > expected:
                problems.append(
                    f"line {number}: seq {seq} follows {expected - 1}: "
                    f"{seq - expected} record(s) missing (deleted) before it"
                )
            else:
                problems.append(
                    f"line {number}: seq {seq} where {expected} was expected (reordered "
                    "or duplicated)"
                )
        if entry.get("prev") != state.head:
            problems.append(f"line {number} (seq {seq}): does not link to the record before it")
        if _link(str(entry.get("prev", "")), entry) != entry.get("hash"):
            problems.append(f"line {number} (seq {seq}): content does not match its hash (edited)")
        if kind == START:
            announced = entry.get("publicKey")
            if embedded is None and isinstance(announced, str):
                embedded = announced
            if pinned is not None and announced != pinned:
                # Said once, at the chain's start: its checkpoints then fail one by one too.
                foreign_keys.append(str(announced))
                problems.append(
                    f"line {number}: chain {state.chain_id!r} was signed with public key "
                    f"{announced}, not the pinned key {pinned}: another signer wrote it (another "
                    "sidecar's key, a key generated per run, or a forged chain)"
                )
            if public_key is None and isinstance(announced, str):
                try:
                    state.key = _public_key_from_raw(base64.b64decode(announced))
                except ValueError:
                    problems.append(f"line {number}: chain-start has an unreadable public key")
        elif kind == CHECKPOINT:
            checkpoints += 1
            if _check_checkpoint(state, entry, number, problems):
                signed.add((str(state.chain_id), state.expected_seq - 1, state.head))
        elif kind == RECORD:
            records += 1
            state.records += 1
        else:
            problems.append(f"line {number} (seq {seq}): unknown entry type {kind!r}")
        state.head = str(entry.get("hash", ""))
        state.expected_seq = (seq if isinstance(seq, int) else expected) + 1
    if state is None:
        problems.append("no audit lines in the file")
    in_file = {str(c.chain_id) for c in chains}
    foreign = 0
    for chain, covers, head in anchors:
        if chain not in in_file:
            foreign += 1
        elif (chain, covers, head) not in signed:
            problems.append(
                f"chain {chain!r}: the checkpoint over seq {covers} that the sidecar logged is "
                "not in the file (records cut from the end, or the checkpoint removed)"
            )
    if foreign:
        warnings.append(
            f"{foreign} logged checkpoint(s) belong to chains not in this file (other sidecars' "
            "logs, or a whole chain removed from the file)"
        )
    return VerifyReport(
        ok=not problems,
        records=records,
        checkpoints=checkpoints,
        problems=problems,
        unsigned_tail=state.unsigned if state is not None else 0,
        public_key=embedded,
        chains=len(chains),
        warnings=warnings,
        skipped=skipped,
        foreign_keys=foreign_keys,
    )


def read_anchors(log_lines: Iterable[bytes]) -> list[tuple[str, int, str]]:
    """The checkpoints a sidecar logged ("audit checkpoint signed"), from its JSON log lines."""
    found: list[tuple[str, int, str]] = []
    for raw in log_lines:
        if b"auditHead" not in raw:
            continue
        try:
            entry = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        chain, covers, head = (
            entry.get("auditChain"),
            entry.get("auditCovers"),
            entry.get("auditHead"),
        )
        if isinstance(chain, str) and isinstance(covers, int) and isinstance(head, str):
            found.append((chain, covers, head))
    return found


def generate_key() -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def _public_key_from_raw(raw: bytes) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(raw)
