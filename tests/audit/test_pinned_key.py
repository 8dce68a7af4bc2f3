"""Verifying against a known public key: the one a platform team publishes for the signing key it
keeps in a Secret (`modelplane audit verify FILE --public-key PEM`).

The CLI runs in-process (`modelplane_cli.main.main`); files are written by the real AuditChain.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modelplane_cli.main import main
from modelplane_sidecar.audit import (
    AuditChain,
    generate_key,
    load_private_key,
    load_public_key,
    public_key_text,
    verify_lines,
)


def _pem_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _signed_file(path: Path, key: Ed25519PrivateKey, records: int = 3) -> Path:
    chain = AuditChain(key, checkpoint_every=2)
    lines = [chain.start({"namespace": "shop"})]
    for i in range(records):
        lines += chain.record({"requestId": f"req-{i}"})
    lines.append(chain.checkpoint())
    path.write_bytes(b"".join(lines))
    return path


@pytest.fixture
def platform_key(tmp_path: Path) -> tuple[Path, Path]:
    """What the platform team holds: the private key (in the Secret) and its published half."""
    key = generate_key()
    private = tmp_path / "signing-key.pem"
    private.write_bytes(_pem_private(key))
    public = tmp_path / "signing-key.pub"
    public.write_bytes(_pem_public(key))
    return private, public


def test_a_file_signed_with_the_published_key_verifies_with_its_pem(
    tmp_path: Path, platform_key: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = platform_key
    audit = _signed_file(tmp_path / "audit.jsonl", load_private_key(private))

    assert main(["audit", "verify", str(audit), "--public-key", str(public)]) == 0

    out = capsys.readouterr().out
    assert "3 record(s) in 1 chain(s), 2 signed checkpoint(s): intact" in out
    assert "checkpoints verified with the pinned key" in out


def test_pem_text_and_base64_pin_the_same_key(platform_key: tuple[Path, Path]) -> None:
    private, public = platform_key
    expected = public_key_text(load_private_key(private).public_key())

    assert public_key_text(load_public_key(public.read_text())) == expected
    assert public_key_text(load_public_key(f"{expected}\n")) == expected
    assert public_key_text(load_public_key(str(public))) == expected


def test_a_file_signed_with_another_key_fails_and_names_both_keys(
    tmp_path: Path, platform_key: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A sidecar that ran without the Secret (a key per run) or a forger: exit 1, said plainly."""
    private, public = platform_key
    other = generate_key()
    audit = _signed_file(tmp_path / "audit.jsonl", other)
    pinned = public_key_text(load_private_key(private).public_key())
    announced = public_key_text(other.public_key())

    assert main(["audit", "verify", str(audit), "--public-key", str(public)]) == 1

    out = capsys.readouterr().out
    headline, first, *rest = out.splitlines()
    assert headline.endswith(
        f": NOT SIGNED BY THE PINNED KEY (3 problem(s)); pinned {pinned}, the file announces "
        f"{announced}"
    )
    assert first == (
        f"  - line 1: chain {orjson.loads(audit.read_bytes().splitlines()[0])['chain']!r} was "
        f"signed with public key {announced}, not the pinned key {pinned}: another signer "
        "wrote it (another sidecar's key, a key generated per run, or a forged chain)"
    )
    assert rest == [
        "  - line 4: checkpoint signature is not valid",
        "  - line 6: checkpoint signature is not valid",
        # Nothing in the file is signed by the pinned key.
        "  note: the last 3 record(s) come after the last signed checkpoint (the sidecar is "
        "still running, or stopped without closing the log)",
    ]


def test_a_forger_who_copies_the_announced_key_still_fails_at_the_checkpoints(
    tmp_path: Path, platform_key: tuple[Path, Path]
) -> None:
    """The chain-start line names the pinned key, but the checkpoints are signed by another."""
    private, public = platform_key
    forged = AuditChain(load_private_key(private))
    lines = [forged.start({})]  # announces the published key, as the real one would
    forged.key = generate_key()  # but what follows is signed by the forger's own key
    lines += forged.record({"requestId": "x"})
    lines.append(forged.checkpoint())

    report = verify_lines(lines, load_public_key(str(public)))

    assert report.foreign_keys == []
    assert report.problems == ["line 3: checkpoint signature is not valid"]


def test_the_json_report_carries_the_pinned_and_the_foreign_keys(
    tmp_path: Path, platform_key: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, public = platform_key
    other = generate_key()
    audit = _signed_file(tmp_path / "audit.jsonl", other, records=1)

    assert main(["audit", "verify", str(audit), "--public-key", str(public), "--json"]) == 1

    report = orjson.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["pinnedKey"] == public_key_text(load_public_key(str(public)))
    assert report["foreignKeys"] == [public_key_text(other.public_key())]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not-a-key", "'not-a-key' is neither a PEM file nor a base64 Ed25519 public key"),
        ("AAAA", "'AAAA' is neither a PEM file nor a base64 Ed25519 public key"),
        (
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            "the PEM text is not a PEM public key",
        ),
    ],
)
def test_an_unusable_public_key_is_refused_with_exit_2(
    tmp_path: Path, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    audit = _signed_file(tmp_path / "audit.jsonl", generate_key(), records=1)

    assert main(["audit", "verify", str(audit), "--public-key", value]) == 2

    assert capsys.readouterr().err.startswith(f"modelplane audit verify: --public-key: {message}")


def test_pinning_a_private_key_file_is_refused(
    tmp_path: Path, platform_key: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    private, _ = platform_key
    audit = _signed_file(tmp_path / "audit.jsonl", load_private_key(private), records=1)

    assert main(["audit", "verify", str(audit), "--public-key", str(private)]) == 2

    assert "holds a private key: pin its public half" in capsys.readouterr().err


def test_public_key_prints_what_verifiers_pin(
    platform_key: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = platform_key

    assert main(["audit", "public-key", str(private)]) == 0
    assert capsys.readouterr().out.strip() == public_key_text(load_public_key(str(public)))
    assert main(["audit", "public-key", str(private), "--pem"]) == 0
    assert capsys.readouterr().out == public.read_text()


def test_public_key_refuses_what_is_not_an_ed25519_private_key(
    platform_key: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, public = platform_key

    assert main(["audit", "public-key", str(public)]) == 2
    assert "not an unencrypted PEM private key" in capsys.readouterr().err
