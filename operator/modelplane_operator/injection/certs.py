"""The operator's own CA and serving certificate, made with `cryptography`; pure functions.

The CA signs one serving certificate whose names cover the webhook Service (and whatever else the
operator serves over TLS, like the config stream). The apiserver trusts it through the webhook
configuration's caBundle, sidecars through the CA file the injector projects into them.

Rotation keeps the CA's key: a renewed CA certificate has the same subject and key, so a client
still holding the previous CA certificate verifies serving certificates signed after the renewal
until that old certificate itself expires. `plan_renewal` says what is due; `renew` does it.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: A freshly issued certificate counts as valid from a little before now (clock skew).
_BACKDATE = datetime.timedelta(minutes=5)
_CA_NAME = "modelplane-operator-ca"


@dataclass(frozen=True)
class CertificatePolicy:
    """Lifetimes, and how much of a lifetime may be left before renewal."""

    ca_validity: datetime.timedelta = datetime.timedelta(days=3650)
    serving_validity: datetime.timedelta = datetime.timedelta(days=90)
    #: Renew once less than this fraction of a certificate's lifetime remains.
    renew_fraction: float = 1 / 3

    def __post_init__(self) -> None:
        if not 0 < self.renew_fraction < 1:
            raise ValueError(f"renew_fraction must be between 0 and 1, not {self.renew_fraction}")
        if self.serving_validity >= self.ca_validity:
            raise ValueError("the serving certificate must expire before its CA")


@dataclass(frozen=True)
class TLSMaterial:
    """PEM bytes: the CA (certificate and key) and the serving certificate and key."""

    ca_cert: bytes
    ca_key: bytes
    cert: bytes
    key: bytes

    @property
    def ca(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.ca_cert)

    @property
    def serving(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the operator's CA key is not an ECDSA key")
    return key


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=ca,
        crl_sign=ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, now: datetime.datetime, policy: CertificatePolicy
) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CA_NAME)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + policy.ca_validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _subject_alternative_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _serving_certificate(
    ca_cert: bytes,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    now: datetime.datetime,
    policy: CertificatePolicy,
) -> tuple[bytes, bytes]:
    if not hosts:
        raise ValueError("a serving certificate needs at least one host name or IP")
    ca = x509.load_pem_x509_certificate(ca_cert)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + policy.serving_validity, ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_subject_alternative_names(hosts)), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _renewal_due(cert: x509.Certificate, now: datetime.datetime, fraction: float) -> bool:
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < lifetime * fraction


def _covered_hosts(cert: x509.Certificate) -> set[str]:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} | set(
        names.get_values_for_type(x509.DNSName)
    )


@dataclass(frozen=True)
class RenewalPlan:
    """What `renew` will do; `reasons` is empty when nothing is due."""

    renew_ca: bool
    renew_serving: bool
    reasons: tuple[str, ...]

    @property
    def due(self) -> bool:
        return self.renew_ca or self.renew_serving


def plan_renewal(
    material: TLSMaterial | None,
    hosts: Sequence[str],
    now: datetime.datetime,
    policy: CertificatePolicy,
) -> RenewalPlan:
    if material is None:
        return RenewalPlan(True, True, ("no certificates yet",))
    try:
        ca, serving = material.ca, material.serving
        ca_key = _load_key(material.ca_key)
        serving_key = serialization.load_pem_private_key(material.key, password=None)
    except ValueError as error:
        return RenewalPlan(True, True, (f"stored certificates are unreadable ({error})",))
    reasons: list[str] = []
    renew_ca = _renewal_due(ca, now, policy.renew_fraction)
    if renew_ca:
        reasons.append(f"the CA expires at {ca.not_valid_after_utc.isoformat()}")
    if ca.public_key() != ca_key.public_key():
        renew_ca = True
        reasons.append("the CA certificate does not match its key")
    renew_serving = renew_ca
    if _renewal_due(serving, now, policy.renew_fraction):
        renew_serving = True
        reasons.append(
            f"the serving certificate expires at {serving.not_valid_after_utc.isoformat()}"
        )
    missing = set(hosts) - _covered_hosts(serving)
    if missing:
        renew_serving = True
        reasons.append(f"the serving certificate does not cover {', '.join(sorted(missing))}")
    if serving.public_key() != serving_key.public_key():
        renew_serving = True
        reasons.append("the serving certificate does not match its key")
    try:
        serving.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        renew_serving = True
        reasons.append("the serving certificate was not signed by the CA")
    return RenewalPlan(renew_ca, renew_serving, tuple(reasons))


def renew(
    material: TLSMaterial | None,
    hosts: Sequence[str],
    now: datetime.datetime,
    policy: CertificatePolicy,
    plan: RenewalPlan | None = None,
) -> TLSMaterial:
    """New material with whatever `plan` (by default `plan_renewal`) says is due."""
    plan = plan or plan_renewal(material, hosts, now, policy)
    if material is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key, now, policy)
    else:
        try:
            ca_key = _load_key(material.ca_key)
        except ValueError:
            ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key, now, policy) if plan.renew_ca else material.ca_cert
    if material is not None and not plan.renew_serving:
        return TLSMaterial(ca_cert, _pem_key(ca_key), material.cert, material.key)
    cert, key = _serving_certificate(ca_cert, ca_key, hosts, now, policy)
    return TLSMaterial(ca_cert, _pem_key(ca_key), cert, key)


def service_hosts(service: str, namespace: str, cluster_domain: str = "cluster.local") -> list[str]:
    """The names a Service is reached by, as the apiserver and Pods use them."""
    return [
        f"{service}.{namespace}.svc",
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc.{cluster_domain}",
    ]
