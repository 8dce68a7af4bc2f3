"""`modelplane audit verify|keygen` and the `--audit-*` flags of `modelplane serve`.

`verify` reads an audit file line by line and reports every edit, deletion and reordering with
the line where the chain breaks (exit 1), so a compliance team can prove a log is complete and
unaltered; with `--public-key` it also proves the sidecar holding that key wrote it. `keygen`
writes the Ed25519 private key a sidecar signs its checkpoints with (mode 0600) and prints the
public key to pin.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from modelplane_sidecar.auditing import AuditSettings


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("audit trail (docs/observability.md)")
    group.add_argument(
        "--audit-log",
        metavar="PATH|-",
        help="append one hash-chained audit record per request here ('-': stdout)",
    )
    group.add_argument(
        "--audit-key",
        metavar="KEYFILE",
        help="Ed25519 private key (PEM) for the checkpoints (default: a new key per run, "
        "its public key logged at start)",
    )
    group.add_argument(
        "--audit-checkpoint-every",
        type=int,
        default=100,
        metavar="N",
        help="sign a checkpoint every N records (default: 100)",
    )
    group.add_argument(
        "--audit-checkpoint-seconds",
        type=float,
        default=60.0,
        metavar="S",
        help="and at least every S seconds while records wait for one (default: 60)",
    )


def settings_from_args(args: argparse.Namespace) -> AuditSettings | None:
    """AuditSettings for `modelplane serve`, None without --audit-log; ValueError when invalid."""
    from modelplane_sidecar.audit import load_private_key
    from modelplane_sidecar.auditing import AuditSettings, Identity

    if args.audit_log is None:
        if args.audit_key is not None:
            raise ValueError("--audit-key needs --audit-log")
        return None
    if args.audit_checkpoint_every < 1:
        raise ValueError("--audit-checkpoint-every must be at least 1")
    if args.audit_checkpoint_seconds <= 0:
        raise ValueError("--audit-checkpoint-seconds must be more than 0")
    key_file = Path(args.audit_key) if args.audit_key else None
    if key_file is not None:
        try:
            load_private_key(key_file)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"--audit-key {key_file}: {exc}") from None
    if args.audit_log not in ("-", "stdout"):
        try:  # fail at start with a clear message, not at the first record
            Path(args.audit_log).open("ab").close()
        except OSError as exc:
            raise ValueError(f"--audit-log {args.audit_log}: {exc.strerror or exc}") from None
    return AuditSettings(
        args.audit_log,
        key_file,
        args.audit_checkpoint_every,
        args.audit_checkpoint_seconds,
        Identity.from_environment(os.environ),
    )


class _Inputs:
    """Files by name, "-" being stdin (read once, so it can be the file and the anchors)."""

    def __init__(self) -> None:
        self._stdin: list[bytes] | None = None

    def lines(self, name: str) -> Iterator[bytes]:
        if name != "-":
            with Path(name).open("rb") as file:
                yield from file
            return
        if self._stdin is None:
            self._stdin = sys.stdin.buffer.read().splitlines()
        yield from self._stdin


def verify(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from modelplane_sidecar.audit import (
        load_public_key,
        public_key_text,
        read_anchors,
        verify_lines,
    )

    path = args.file
    inputs = _Inputs()
    pinned: Ed25519PublicKey | None = None
    if args.public_key is not None:
        try:
            pinned = load_public_key(args.public_key)
        except (OSError, ValueError, TypeError) as exc:
            print(f"modelplane audit verify: --public-key: {exc}", file=sys.stderr)
            return 2
    anchors: list[tuple[str, int, str]] = []
    try:
        for log_file in args.anchors or ():
            anchors += read_anchors(inputs.lines(log_file))
        report = verify_lines(inputs.lines(path), pinned, anchors, args.container_log)
    except OSError as exc:
        print(f"modelplane audit verify: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    unsigned = report.unsigned_tail > 0
    failed = not report.ok or (args.strict and (unsigned or bool(report.warnings)))
    if args.json:
        out = {
            "file": path,
            "ok": not failed,
            "records": report.records,
            "chains": report.chains,
            "checkpoints": report.checkpoints,
            "unsignedTail": report.unsigned_tail,
            "publicKey": report.public_key,
            "pinned": pinned is not None,
            "pinnedKey": public_key_text(pinned) if pinned is not None else None,
            "foreignKeys": sorted(set(report.foreign_keys)),
            "anchors": len(anchors),
            "skippedLines": report.skipped,
            "problems": report.problems,
            "warnings": report.warnings,
        }
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 1 if failed else 0
    name = "stdin" if path == "-" else path
    summary = (
        f"{name}: {report.records} record(s) in {report.chains} chain(s), "
        f"{report.checkpoints} signed checkpoint(s)"
    )
    if report.skipped:
        summary += f", {report.skipped} other line(s) skipped"
    if anchors:
        summary += f", {len(anchors)} logged checkpoint(s) checked"
    signer = "the pinned key" if pinned is not None else "the key each chain announces"
    if report.ok:
        print(f"{summary}: intact; checkpoints verified with {signer}")
    elif report.foreign_keys:
        print(
            f"{summary}: NOT SIGNED BY THE PINNED KEY ({len(report.problems)} problem(s)); "
            f"pinned {public_key_text(pinned) if pinned is not None else '-'}, the file "
            f"announces {', '.join(sorted(set(report.foreign_keys)))}"
        )
    else:
        print(f"{summary}: TAMPERED ({len(report.problems)} problem(s))")
    if not report.ok:
        for problem in report.problems:
            print(f"  - {problem}")
    for warning in report.warnings:
        print(f"  warning: {warning}")
    if unsigned:
        print(
            f"  note: the last {report.unsigned_tail} record(s) come after the last signed "
            "checkpoint (the sidecar is still running, or stopped without closing the log)"
        )
    if pinned is None and report.ok:
        print(
            "  note: no --public-key given: this proves the file is unaltered since it was "
            "written, not who wrote it"
        )
    return 1 if failed else 0


def keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    from modelplane_sidecar.audit import generate_key, public_key_text

    out = Path(args.out)
    key = generate_key()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"modelplane audit keygen: {out} exists; not overwriting a key", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"modelplane audit keygen: {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    public = key.public_key()
    if args.public_out:
        Path(args.public_out).write_bytes(
            public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    print(public_key_text(public))
    return 0


def public_key(args: argparse.Namespace) -> int:
    """Print the public half of a signing key, e.g. one read back from its Secret."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from modelplane_sidecar.audit import public_key_text

    name = "stdin" if args.key == "-" else args.key
    try:
        pem = sys.stdin.buffer.read() if args.key == "-" else Path(args.key).read_bytes()
        key = serialization.load_pem_private_key(pem, password=None)
    except OSError as exc:
        print(f"modelplane audit public-key: {name}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError):
        print(
            f"modelplane audit public-key: {name}: not an unencrypted PEM private key",
            file=sys.stderr,
        )
        return 2
    if not isinstance(key, Ed25519PrivateKey):
        print(f"modelplane audit public-key: {name}: not an Ed25519 key", file=sys.stderr)
        return 2
    public = key.public_key()
    if args.pem:
        sys.stdout.write(
            public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode()
        )
    else:
        print(public_key_text(public))
    return 0


def add_audit_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="verify an audit log, or make a signing key")
    commands = audit.add_subparsers(dest="audit_command", required=True)
    check = commands.add_parser(
        "verify", help="check an audit file's hash chain and signed checkpoints"
    )
    check.add_argument("file", help="the audit log (JSON lines); '-': stdin")
    check.add_argument(
        "--container-log",
        action="store_true",
        help="the file is a container's output (kubectl logs): skip lines that are not audit "
        "entries, such as the sidecar's own JSON logs",
    )
    check.add_argument(
        "--public-key",
        metavar="KEY",
        help="the sidecar's public key to pin: base64 (as logged at start) or a PEM file",
    )
    check.add_argument(
        "--anchors",
        action="append",
        metavar="LOGFILE",
        help="the sidecar's JSON log (repeatable; may be the same container log, or '-'): "
        "every checkpoint it logged must be in the file, which exposes records cut from the end",
    )
    check.add_argument(
        "--strict",
        action="store_true",
        help="also fail on records not covered by a signed checkpoint and on unclosed chains",
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=verify)
    make = commands.add_parser("keygen", help="write a new Ed25519 signing key (PEM, mode 0600)")
    make.add_argument("--out", required=True, help="private key file to create")
    make.add_argument("--public-out", help="also write the public key here (PEM)")
    make.set_defaults(func=keygen)
    show = commands.add_parser(
        "public-key", help="print the public key of a signing key (the value verifiers pin)"
    )
    show.add_argument("key", help="PEM private key file; '-': stdin (e.g. from kubectl)")
    show.add_argument("--pem", action="store_true", help="print PEM instead of base64")
    show.set_defaults(func=public_key)
