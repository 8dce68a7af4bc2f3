"""The operator's CA and serving certificate: issuance, renewal decisions, verification."""

from __future__ import annotations

import dataclasses
import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from modelplane_operator.injection.certs import (
    CertificatePolicy,
    plan_renewal,
    renew,
    service_hosts,
)

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
POLICY = CertificatePolicy()
HOSTS = [*service_hosts("modelplane-webhook", "modelplane"), "127.0.0.1"]


def verify_with(ca_pem: bytes, cert_pem: bytes, key_pem: bytes, host: str, tmp: Path) -> None:
    """A real TLS client/server handshake in memory: the client trusts only `ca_pem`."""
    (tmp / "cert.pem").write_bytes(cert_pem)
    (tmp / "key.pem").write_bytes(key_pem)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    client_context = ssl.create_default_context(cadata=ca_pem.decode())
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(client_in, client_out, server_hostname=host)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):
        done = 0
        for side, outgoing, peer_in in (
            (client, client_out, server_in),
            (server, server_out, client_in),
        ):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            peer_in.write(outgoing.read())
        if done == 2:
            return
    raise AssertionError("handshake did not finish")


def test_new_material_is_a_ca_and_a_serving_cert_for_all_hosts(tmp_path: Path) -> None:
    # Real handshakes check validity against the real clock.
    now = datetime.datetime.now(datetime.UTC)
    material = renew(None, HOSTS, now, POLICY)

    ca, serving = material.ca, material.serving
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert serving.issuer == ca.subject
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [
        "modelplane-webhook.modelplane.svc",
        "modelplane-webhook",
        "modelplane-webhook.modelplane",
        "modelplane-webhook.modelplane.svc.cluster.local",
    ]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert serving.not_valid_after_utc - now < POLICY.serving_validity
    assert ca.not_valid_after_utc - now < POLICY.ca_validity
    for host in ("modelplane-webhook.modelplane.svc", "127.0.0.1"):
        verify_with(material.ca_cert, material.cert, material.key, host, tmp_path)
    assert not plan_renewal(material, HOSTS, now, POLICY).due


def test_serving_cert_is_renewed_once_a_third_of_its_life_is_left() -> None:
    material = renew(None, HOSTS, NOW, POLICY)
    almost = NOW + POLICY.serving_validity * 0.6
    late = NOW + POLICY.serving_validity * 0.7

    assert not plan_renewal(material, HOSTS, almost, POLICY).due
    plan = plan_renewal(material, HOSTS, late, POLICY)
    assert (plan.renew_ca, plan.renew_serving) == (False, True)
    assert plan.reasons[0].startswith("the serving certificate expires at 2026-04-01")

    renewed = renew(material, HOSTS, late, POLICY)
    assert renewed.ca_cert == material.ca_cert and renewed.ca_key == material.ca_key
    assert renewed.cert != material.cert
    assert renewed.serving.not_valid_after_utc == (late + POLICY.serving_validity).replace(
        microsecond=0
    )


def test_renewed_ca_keeps_its_key_so_old_trust_still_verifies_new_certs(tmp_path: Path) -> None:
    late = datetime.datetime.now(datetime.UTC)
    material = renew(None, HOSTS, late - POLICY.ca_validity * 0.7, POLICY)

    plan = plan_renewal(material, HOSTS, late, POLICY)
    assert plan.renew_ca and plan.renew_serving
    renewed = renew(material, HOSTS, late, POLICY)

    assert renewed.ca_key == material.ca_key
    assert renewed.ca.not_valid_after_utc == (late + POLICY.ca_validity).replace(microsecond=0)
    # A sidecar created before the renewal holds only the old CA certificate.
    verify_with(material.ca_cert, renewed.cert, renewed.key, "127.0.0.1", tmp_path)
    verify_with(renewed.ca_cert, renewed.cert, renewed.key, "127.0.0.1", tmp_path)


def test_serving_cert_never_outlives_its_ca() -> None:
    policy = CertificatePolicy(
        ca_validity=datetime.timedelta(days=100), serving_validity=datetime.timedelta(days=90)
    )
    material = renew(None, HOSTS, NOW, policy)
    # 50 days in, the serving cert is due; its successor is cut off at the CA's expiry.
    later = NOW + datetime.timedelta(days=61)
    renewed = renew(material, HOSTS, later, policy)
    assert renewed.serving.not_valid_after_utc <= renewed.ca.not_valid_after_utc


def test_new_hosts_mismatched_keys_and_foreign_certs_force_renewal() -> None:
    material = renew(None, HOSTS, NOW, POLICY)
    other = renew(None, HOSTS, NOW, POLICY)

    plan = plan_renewal(material, [*HOSTS, "modelplane-stream.modelplane.svc"], NOW, POLICY)
    assert plan.reasons == (
        "the serving certificate does not cover modelplane-stream.modelplane.svc",
    )
    swapped_key = dataclasses.replace(material, key=other.key)
    assert plan_renewal(swapped_key, HOSTS, NOW, POLICY).reasons == (
        "the serving certificate does not match its key",
    )
    foreign = dataclasses.replace(material, cert=other.cert, key=other.key)
    assert plan_renewal(foreign, HOSTS, NOW, POLICY).reasons == (
        "the serving certificate was not signed by the CA",
    )
    garbage = dataclasses.replace(material, cert=b"not a certificate")
    plan = plan_renewal(garbage, HOSTS, NOW, POLICY)
    assert plan.renew_ca and plan.renew_serving
    assert plan.reasons[0].startswith("stored certificates are unreadable")
    # The CA key survives: sidecars that trust the old CA certificate keep working.
    assert renew(garbage, HOSTS, NOW, POLICY).ca_key == material.ca_key


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="renew_fraction must be between 0 and 1"):
        CertificatePolicy(renew_fraction=1.5)
    with pytest.raises(ValueError, match="must expire before its CA"):
        CertificatePolicy(ca_validity=datetime.timedelta(days=1))
