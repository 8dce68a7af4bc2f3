"""Sensitivity classifier: each detector finds its data, its checksum rejects look-alikes."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import re2
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from modelplane_sidecar.config import DataClass, Detector, SensitivityPolicy
from modelplane_sidecar.errors import ApiError
from modelplane_sidecar.routing.classify import sensitivity
from modelplane_sidecar.routing.classify.sensitivity import (
    _PLACEHOLDER,
    _S,
    _UNICODE_DIGITS,
    classify_sensitivity,
    detect,
    iban_valid,
    is_placeholder,
    luhn_valid,
    reference_detect,
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


# --- The fast path (RE2 candidates, exact checks at their starts) against the specification ------

#: Pieces of findings and of their look-alikes; joined at random they make near-misses of every
#: detector: digits around separators, partial keys, words next to numbers, other scripts.
FRAGMENTS = [
    *("0", "00", "1", "12", "123", "2", "45", "555", "1234", "5678", "9999", "4111", "1111"),
    *("3782", "822463", "10005", "5555", "4444", "2671", "415", "030", "0044", "0532", "0130"),
    *(" ", "  ", "-", ".", "/", "(", ")", "+", ":", "::", ",", "\n", "\t", "_", "=", '"', "'"),
    *("a", "x", "b.c", "com", "@", "jane", "@example.co", ".uk", "ffff", "db8", "fe80", "10"),
    *("255", "256", "999", "SSN", "ssn ", "Social Security", " number", "DE89", "GB82", "WEST"),
    *("3704", "AKIA", "IOSFODNN7EXAMPLE", "ghp_", "a1B2c3D4e5", "sk-proj-", "eyJhbGciOiJIUzI1"),
    *("password", "api_key", "Tr0ub4dor&3x", "YOUR_KEY", "xxxx", "-----BEGIN ", "PRIVATE KEY"),
    *("os.environ", "OS.", "${", "%", "{{", "getenv", "env[", "process.env", "$x", "o", "e"),
    # Other scripts: digits Python's \d accepts, letters its (?i) folds, spaces its \s accepts.
    *("\u0663\u0664", "\uff14", "\u017f", "\u0130", "\u0131", "\u212a", "\u00a0", "\u3000"),
    *("\u4e00\u4e8c", "\u00e9", "\U0001f600", "\ud800"),
]


near_misses = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=30).map("".join)


def _within_the_specification(text: str) -> list[Detector]:
    """detect() finds all that one pass of each exact pattern finds, and only true findings."""
    found = detect(text)
    assert set(reference_detect(text, every_start=False)) <= set(found)
    assert set(found) <= set(reference_detect(text))
    return found


@settings(max_examples=400, deadline=None)
@given(near_misses)
def test_detect_is_the_exact_patterns_tried_at_every_start(text: str) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sensitivity, "LOOKALIKE_BUDGET", 10**9)
        assert detect(text) == reference_detect(text)


@settings(max_examples=200, deadline=None)
@given(near_misses, st.sampled_from([0, 1, 3]))
def test_past_the_lookalike_budget_nothing_one_pass_finds_is_lost(text: str, budget: int) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sensitivity, "LOOKALIKE_BUDGET", budget)
        _within_the_specification(text)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(["x", "X", "your_", "EXAMPLE", "*", ".", "$", "os.", "\u017f", "a", "0"]),
        min_size=20,
        max_size=80,
    ).map("".join)
)
def test_placeholder_literals_find_what_the_placeholder_pattern_finds(value: str) -> None:
    assert is_placeholder(value) == (_PLACEHOLDER.search(value) is not None)


@pytest.mark.parametrize(("text", "label"), FOUND)
def test_reference_finds_what_detect_finds(text: str, label: Detector) -> None:
    assert label in reference_detect(text)


OTHER_SCRIPTS = [
    ("\u65e5\u672c\u8a9e\u306e\u6587\u7ae0 jane@example.com \u3067\u3059", Detector.EMAIL),
    ("\U0001f600\U0001f600 card 4111 1111 1111 1111", Detector.PAYMENT_CARD),
    # Eastern Arabic digits are digits to Python's \d, and people write phone numbers in them.
    (
        "\u0627\u062a\u0635\u0644 +\u0669\u0666\u0666 \u0665\u0660 \u0661\u0662\u0663 "
        "\u0664\u0665\u0666\u0667",
        Detector.PHONE,
    ),
    ("\u017fsn 123-45-6789", Detector.US_SSN),
    ("\u017fsn: 123456789", Detector.US_SSN),
    ("PASSWORD\u00a0=\u3000Tr0ub4dor&3x", Detector.SECRET),
    ("pr\u0131vate_key: Zm9vYmFyYmF6cXV4", Detector.SECRET),
    ("\u00e9t\u00e9 \u2014 10.1.2.3 \u2014 fin", Detector.IP_ADDRESS),
]


@pytest.mark.parametrize(("text", "label"), OTHER_SCRIPTS)
def test_findings_in_other_scripts_and_next_to_them(text: str, label: Detector) -> None:
    assert label in detect(text)
    assert detect(text) == reference_detect(text)


def test_a_rejected_lookalike_does_not_hide_a_finding_that_starts_inside_it() -> None:
    """'0 4111 ...' matches the card pattern from the 0 (and fails the issuer check); the card
    starting at 4111 is still found. One `finditer` pass, as the detectors used to read, misses it.
    """
    text = "order 0 4111 1111 1111 1111"
    assert reference_detect(text, every_start=False) == []
    assert detect(text) == reference_detect(text) == [Detector.PAYMENT_CARD]


def test_texts_that_are_not_plain_utf8_or_empty() -> None:
    assert detect("") == []
    # A lone surrogate (a JSON "\\ud800" escape) is one character; offsets after it still line up.
    assert detect("\ud800 jane@example.com \udfff") == [Detector.EMAIL]


def test_a_placeholder_anywhere_in_an_assigned_value_is_not_a_secret() -> None:
    """The whole value is read, not a window of it (the old detectors cut it at 40 characters)."""
    value = "v3ryR34l-" * 8 + "EXAMPLE"
    assert detect(f"password={value}") == []
    assert detect(f"password={value[:-7]}") == [Detector.SECRET]


def test_candidate_classes_cover_pythons_digits_and_spaces() -> None:
    """RE2's classes in the candidate patterns accept every character Python's \\d / \\s does."""
    digit = re2.compile(f"^[{_UNICODE_DIGITS}]$".encode())
    space = re2.compile(f"^{_S}$".encode())
    for code in range(0x110000):
        char = chr(code)
        if 0xD800 <= code <= 0xDFFF:
            continue
        if char.isdecimal():
            assert digit.search(char.encode()), hex(code)
        if char.isspace():
            assert space.search(char.encode()), hex(code)


# --- Adversarial texts: every one is scanned in linear time and gives the specified labels -------
# (No timing here: bench/bench_sensitivity.py times them next to the old detectors.)

_N = 64 * 1024

ADVERSARIAL = [
    ("digits", "7" * _N, []),
    ("digits with single spaces", "4 " * (_N // 2), []),
    ("cards failing Luhn", "4111 1111 1111 1112 " * (_N // 20), []),
    (
        "card after many failing ones",
        "4111 1111 1111 1112 " * (_N // 20) + "4111111111111111",
        [Detector.PAYMENT_CARD],
    ),
    ("phones too long", "+1 415 555 2671 4444 5555 " * (_N // 26), []),
    ("plus signs", "+0" * (_N // 2), []),
    ("opening parentheses", "(" * _N, []),
    ("colons", ":" * _N, []),
    ("hex and colons", "a:" * (_N // 2), []),
    ("near-IPv6", ":: 1::" * (_N // 6), []),
    ("dotted numbers", "1.2.3." * (_N // 6), []),
    ("an address after dotted numbers", "1.2.3." * (_N // 6) + " 10.0.0.1", [Detector.IP_ADDRESS]),
    ("at signs", "@" * _N, []),
    ("local parts", "_a@b.cc " * (_N // 8), []),
    ("endless domain", "a@" + "b." * (_N // 2), []),
    ("SSN keywords", "ssn " * (_N // 4), []),
    ("SSN keyword then digits", "ssn " * (_N // 4) + "123456789", [Detector.US_SSN]),
    ("IBAN-like", "DE89 " * (_N // 5), []),
    ("key prefixes", "AKIA sk- ghp_ xoxb- eyJ " * (_N // 24), []),
    ("key words", "password=password=" * (_N // 18) + "xxxx", []),
    ("private key header words", "-----BEGIN " + "A " * (_N // 2), []),
    ("base64", "QUtJQUlPU0ZPRE5ON0VYQU1QTEUr/0123" * (_N // 33), []),
    ("other scripts", "\u0663\u4e00\u00a0\u017f" * (_N // 4), []),
]


@pytest.mark.parametrize(
    ("text", "labels"),
    [(t, labels) for _, t, labels in ADVERSARIAL],
    ids=[n for n, _, _ in ADVERSARIAL],
)
def test_adversarial_texts(text: str, labels: list[Detector]) -> None:
    assert detect(text) == labels
    # The specification on a slice (its cost grows with the text): past the look-alike budget
    # detect() reads each pattern once, as finditer does, and may find less than every start.
    _within_the_specification(text[-2000:])
