"""Sensitivity classifier: each detector finds its data, its checksum rejects look-alikes."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from modelplane_sidecar.config import DataClass, Detector, SensitivityPolicy
from modelplane_sidecar.errors import ApiError
from modelplane_sidecar.routing.classify.sensitivity import (
    classify_sensitivity,
    detect,
    iban_valid,
    luhn_valid,
    ssn_valid,
)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "routellm-evals"

FOUND = [
    ("mail me at jane.doe+work@example.co.uk please", Detector.EMAIL),
    ("call +44 20 7946 0958 today", Detector.PHONE),
    ("call (415) 555-2671 after five", Detector.PHONE),
    ("office: 415.555.2671", Detector.PHONE),
    ("ring 030 1234 5678", Detector.PHONE),
    ("card 4111 1111 1111 1111 exp 12/29", Detector.PAYMENT_CARD),
    ("amex 3782-822463-10005", Detector.PAYMENT_CARD),
    ("mastercard 5555555555554444", Detector.PAYMENT_CARD),
    ("IBAN DE89 3704 0044 0532 0130 00 thanks", Detector.IBAN),
    ("pay to GB82WEST12345698765432", Detector.IBAN),
    ("ssn 123-45-6789", Detector.US_SSN),
    ("my SSN is 123456789", Detector.US_SSN),
    ("the server at 10.0.0.12.", Detector.IP_ADDRESS),
    ("v6 2001:db8::8a2e:370:7334 ok", Detector.IP_ADDRESS),
    ("aws AKIAIOSFODNN7EXAMPLE", Detector.SECRET),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAA", Detector.SECRET),
    ("token ghp_" + "a1B2c3D4e5" * 4, Detector.SECRET),
    ("OPENAI_API_KEY=sk-proj-" + "Ab3dE6gH9j" * 3, Detector.SECRET),
    ('db password = "Tr0ub4dor&3x"', Detector.SECRET),
    (
        "Authorization: Bearer eyJhbGciOiJIUzI1.eyJzdWIiOiIxMjM0NTY3.SflKxwRJSMeKKF2QT4f",
        Detector.SECRET,
    ),
]

NOT_FOUND = [
    "card 4111 1111 1111 1112 (fails Luhn)",
    "IBAN DE89 3704 0044 0532 0130 01 (fails mod 97)",
    "ssn 666-45-6789 (area 666 is never issued)",
    "ssn 900-12-3456 (area 9xx is never issued)",
    "ssn 123-00-6789 (group 00 is never issued)",
    "example 078-05-1120 (the Woolworth wallet card)",
    'password = "YOUR_PASSWORD_HERE"',
    "api_key: ${OPENAI_API_KEY}",
    "Janet has 16 eggs and sells them for $2 each; 3.14; 12:30:45; std::vector; 2024-01-15",
    "version 1.2.3, 1,000,000 dollars, 555 people, ISBN 978-3-16-148410-0",
    "mail at the office, @mention, user@localhost",
    "999.1.1.1 is not an address, 256.0.0.1 neither",
]


@pytest.mark.parametrize(("text", "label"), FOUND)
def test_detector_finds(text: str, label: Detector) -> None:
    assert label in detect(text)


@pytest.mark.parametrize("text", NOT_FOUND)
def test_look_alikes_are_not_flagged(text: str) -> None:
    assert detect(text) == []


def test_checksums() -> None:
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")
    assert iban_valid("NL91 ABNA 0417 1643 00") and not iban_valid("NL91 ABNA 0417 1643 01")
    assert not iban_valid("ZZ91 ABNA 0417 1643 00")  # no such country
    assert ssn_valid("123", "45", "6789") and not ssn_valid("000", "45", "6789")


def test_disabled_detector_is_not_run() -> None:
    assert detect("jane@example.com", {Detector.PHONE: "pii"}) == []


def _headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


POLICY = SensitivityPolicy(
    default_class="internal",
    classes=(
        DataClass(name="internal"),
        DataClass(name="pii", allowed_tags=("on-prem", "gdpr")),
        DataClass(name="secret", allowed_tags=("on-prem",)),
    ),
)


def test_classes_combine_default_detected_and_declared() -> None:
    result = classify_sensitivity(
        "write to jane@example.com", _headers(x_modelplane_data_class="Secret"), POLICY
    )
    assert result.labels == (Detector.EMAIL,)
    assert result.classes == {"internal", "pii", "secret"}
    assert [c.name for c in result.restricted] == ["pii", "secret"]
    assert result.allows(("on-prem",)) is None
    blocked = result.allows(("gdpr", "cloud"))
    assert blocked is not None and blocked.name == "secret"
    # Nothing sensitive in the trace: labels and classes only.
    assert "jane" not in str(result.as_json())


def test_plain_request_gets_only_the_default_class() -> None:
    result = classify_sensitivity("What is a Pod?", _headers(), POLICY)
    assert result.classes == {"internal"} and result.restricted == ()
    assert result.allows(()) is None


def test_unknown_declared_class_is_a_clear_400() -> None:
    with pytest.raises(ApiError) as caught:
        classify_sensitivity("hi", _headers(x_modelplane_data_class="top-secret"), POLICY)
    assert caught.value.status == 400
    assert "top-secret" in caught.value.message and "internal, pii, secret" in caught.value.message


@pytest.mark.skipif(not DATA.exists(), reason="shared RouteLLM data not present")
def test_no_findings_on_benchmark_questions() -> None:
    """15k MMLU/GSM8K questions are full of numbers and contain no personal data."""
    flagged = []
    files = sorted((DATA / "mmlu" / "responses").glob("*.csv"))
    files.append(DATA / "gsm8k" / "gsm8k_responses.csv")
    for path in files:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                found = detect(row["prompt"])
                if found:
                    flagged.append((found, row["prompt"][:80]))
    assert flagged == []
