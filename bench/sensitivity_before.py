"""Frozen copy of the sensitivity detectors as of commit 8807ea2 (before the single-pass rewrite).

Kept only so bench/bench_sensitivity.py can time the old and the new detectors side by side in one
run; nothing in the package imports it. Do not edit (except to keep it importable).

Original module docstring:
Data-sensitivity classifier: which kinds of sensitive data a request carries.

Each detector is a precompiled regular expression plus a checksum or range check that removes the
usual false positives (Luhn for payment cards, mod-97 for IBANs, the never-issued ranges of US
SSNs, octet ranges for IPv4, a parser for IPv6). A detector stops at its first valid finding:
routing needs presence, not a count. Cheap triggers (an '@', a digit, a colon) skip detectors
that cannot match. The result never holds the sensitive values themselves, only labels, so it is
safe to log and to return from the explain endpoint.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

from modelplane_sidecar.config import Detector

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)

_PHONE = re.compile(
    # International: +CC then 2..5 groups of digits, e.g. +44 20 7946 0958, +1-415-555-2671.
    r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?![\w-])"
    # North American: (415) 555-2671, 415-555-2671, 415.555.2671.
    r"|(?<![\w.-])(?<!\d[ .-])(?:\([2-9]\d{2}\)\s?|[2-9]\d{2}[ .-])[2-9]\d{2}[ .-]\d{4}"
    r"(?![\w-]|[ .-]\d)"
    # National trunk prefix 0: 030 1234 5678, 020 7946 0958, 06-12345678.
    r"|(?<![\w.-])(?<!\d[ .-])0\d{1,4}[ /-]\d{3,4}[ -]?\d{3,4}(?![\w-]|[ .-]\d)"
)

_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")

_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,32}")

_SSN = re.compile(
    r"(?<![\d-])(\d{3})([ -])(\d{2})\2(\d{4})(?![\d-])"
    r"|(?i:\b(?:ssn|social security(?: number)?)\b)\D{0,20}?(?<!\d)(\d{3})(\d{2})(\d{4})(?!\d)"
)

_IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    r"(?!\.?\d)"
)
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")

_SECRET = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    r"|\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b"
    r"|\bgh[pousr]_[A-Za-z0-9]{36,255}\b"
    r"|\bgithub_pat_[A-Za-z0-9_]{22,255}\b"
    r"|\bglpat-[A-Za-z0-9_-]{20,}"
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"
    r"|\bsk-(?:proj-|ant-(?:api\d\d-)?|svcacct-)?[A-Za-z0-9_-]{20,}"
    r"|\bAIza[0-9A-Za-z_-]{35}"
    r"|\b[rs]k_live_[0-9A-Za-z]{16,}"
    r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
)
#: `password = "..."`-style assignments; the value is checked for being a real value below.
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|password|passwd"
    r"|client[_-]?secret|private[_-]?key)\b[\"']?\s*[:=]\s*[\"']?([^\s\"'<>`]{8,})"
)
_PLACEHOLDER = re.compile(
    r"(?i)^(?:\$\{?|%|\{\{|<|os\.|process\.env|env\[|getenv)|x{4,}|\*{3,}|your[_-]|example|redacted"
    r"|changeme|placeholder|dummy|\.\.\."
)

_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
    "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TL": 23, "TN": 24, "TR": 26, "UA": 29,
    "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip

#: SSNs that were published as examples and never belong to a person.
_SSN_EXAMPLES = {"078051120", "219099999", "457555462"}


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        d = ord(char) - 48
        if index % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_brand_prefix(digits: str) -> bool:
    """Issuer prefixes of the major networks (Visa, Mastercard, Amex, Discover, JCB, ...)."""
    n = len(digits)
    two = int(digits[:2])
    four = int(digits[:4])
    if digits[0] == "4":
        return n in (13, 16, 19)
    if 51 <= two <= 55 or 2221 <= four <= 2720:
        return n == 16
    if two in (34, 37):
        return n == 15
    if digits.startswith(("6011", "65")) or 644 <= int(digits[:3]) <= 649 or two == 62:
        return 16 <= n <= 19
    if 3528 <= four <= 3589:
        return 16 <= n <= 19
    if two in (36, 38) or 300 <= int(digits[:3]) <= 305:
        return 14 <= n <= 19
    return False


def iban_valid(candidate: str) -> bool:
    """ISO 13616: country length and the mod-97 check of the rearranged number."""
    compact = candidate.replace(" ", "")
    length = _IBAN_LENGTHS.get(compact[:2])
    if length is None or len(compact) < length:
        return False
    compact = compact[:length]
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def ssn_valid(area: str, group: str, serial: str) -> bool:
    """SSA rules: no area 000, 666 or 900-999; no group 00; no serial 0000; no known examples."""
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return False
    return area + group + serial not in _SSN_EXAMPLES


# Long prompts: Python's regex engine tries a pattern at every position, so scanning 50 kB with a
# dozen patterns would take milliseconds. Instead, fast literal searches (str.find runs in C) and
# one pass for digit runs locate the few places where a finding could be, and the detectors'
# patterns run only on windows around those places.
_DIGIT_SPAN = re.compile(r"\d[\d .()/+-]{5,}\d")
_WINDOW = 48
#: Where a token-shaped secret can start; each pattern leads with a literal character, which the
#: regex engine finds with a fast scan instead of trying every position.
_SECRET_MARKERS = tuple(
    re.compile(p)
    for p in (
        r"-----BEGIN",
        r"A(?:KIA|SIA|GPA|IDA|ROA|Iza)",
        r"g(?:h[pousr]_|ithub_pat_|lpat-)",
        r"xox[abposr]-",
        r"k(?:-|_live_)",
        r"eyJ",
    )
)
#: IPv6 needs two colons with at most four hex digits between them.
_IPV6_MARKER = re.compile(r":[0-9A-Fa-f]{0,4}:")
_SECRET_WORDS = ("key", "secret", "token", "passw")
_SSN_WORDS = ("ssn", "social security")


def _windows(text: str, spans: list[tuple[int, int]], before: int, after: int) -> str:
    """The text around each span (overlaps merged), joined by blank lines."""
    pieces: list[str] = []
    end_prev = -1
    start_cur = 0
    for start, end in spans:
        lo, hi = max(0, start - before), end + after
        if lo <= end_prev:
            end_prev = max(end_prev, hi)
            continue
        if end_prev >= 0:
            pieces.append(text[start_cur:end_prev])
        start_cur, end_prev = lo, hi
    if end_prev >= 0:
        pieces.append(text[start_cur:end_prev])
    return "\n\n".join(pieces)


def _occurrences(text: str, needles: tuple[str, ...], limit: int = 10_000) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for needle in needles:
        at = text.find(needle)
        while at >= 0 and len(spans) < limit:
            spans.append((at, at + len(needle)))
            at = text.find(needle, at + 1)
    spans.sort()
    return spans


class _Scan:
    """One request's text plus the lazily computed places worth a closer look."""

    __slots__ = ("_digits", "_lowered", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._digits: str | None = None
        self._lowered: str | None = None

    @property
    def digits(self) -> str:
        """Windows around each run of 7+ digits and separators (phones, cards, IBANs, SSNs, IPs)."""
        if self._digits is None:
            spans = [m.span() for m in _DIGIT_SPAN.finditer(self.text)]
            self._digits = _windows(self.text, spans, _WINDOW, _WINDOW) if spans else ""
        return self._digits

    @property
    def lowered(self) -> str:
        if self._lowered is None:
            self._lowered = self.text.lower()
        return self._lowered

    def around(self, needles: tuple[str, ...], lowered: bool = False, width: int = 120) -> str:
        spans = _occurrences(self.lowered if lowered else self.text, needles)
        return _windows(self.text, spans, width, width) if spans else ""

    def around_matches(self, patterns: tuple[re.Pattern[str], ...], width: int) -> str:
        spans = sorted(m.span() for p in patterns for m in p.finditer(self.text))
        return _windows(self.text, spans, width, width) if spans else ""


def _has_email(scan: _Scan) -> bool:
    near = scan.around(("@",), width=80)
    return bool(near) and _EMAIL.search(near) is not None


def _has_phone(scan: _Scan) -> bool:
    for match in _PHONE.finditer(scan.digits):
        digits = sum(c.isdigit() for c in match.group())
        if 8 <= digits <= 15:
            return True
    return False


def _has_card(scan: _Scan) -> bool:
    for match in _CARD.finditer(scan.digits):
        digits = match.group().replace(" ", "").replace("-", "")
        if 13 <= len(digits) <= 19 and _card_brand_prefix(digits) and luhn_valid(digits):
            return True
    return False


def _has_iban(scan: _Scan) -> bool:
    return any(iban_valid(m.group()) for m in _IBAN.finditer(scan.digits))


def _ssn_in(text: str) -> bool:
    for match in _SSN.finditer(text):
        if match.group(1) is not None:
            area, group, serial = match.group(1), match.group(3), match.group(4)
        else:
            area, group, serial = match.group(5), match.group(6), match.group(7)
        if ssn_valid(area, group, serial):
            return True
    return False


def _has_ssn(scan: _Scan) -> bool:
    digits = scan.digits
    if not digits:
        return False
    return _ssn_in(digits) or _ssn_in(scan.around(_SSN_WORDS, lowered=True, width=40))


def _has_ip(scan: _Scan) -> bool:
    digits = scan.digits
    if digits and _IPV4.search(digits) is not None:
        return True
    near = scan.around_matches((_IPV6_MARKER,), width=40)
    for match in _IPV6.finditer(near):
        candidate = match.group()
        if sum(c != ":" for c in candidate) < 2:
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        return True
    return False


def _has_secret(scan: _Scan) -> bool:
    near = scan.around_matches(_SECRET_MARKERS, width=300)
    if near and _SECRET.search(near) is not None:
        return True
    lowered = scan.lowered
    if not any(word in lowered for word in _SECRET_WORDS):
        return False
    for match in _SECRET_ASSIGNMENT.finditer(scan.around(_SECRET_WORDS, lowered=True, width=40)):
        value = match.group(1)
        if _PLACEHOLDER.search(value) is None and len(set(value)) >= 5:
            return True
    return False


#: (detector, check) in the order findings are reported in.
DETECTORS: tuple[tuple[Detector, Callable[[_Scan], bool]], ...] = (
    (Detector.SECRET, _has_secret),
    (Detector.EMAIL, _has_email),
    (Detector.PAYMENT_CARD, _has_card),
    (Detector.IBAN, _has_iban),
    (Detector.US_SSN, _has_ssn),
    (Detector.PHONE, _has_phone),
    (Detector.IP_ADDRESS, _has_ip),
)


def detect(text: str, enabled: Mapping[Detector, Any] | None = None) -> list[Detector]:
    """Labels of every enabled detector with a valid finding in `text`."""
    scan = _Scan(text)
    return [
        detector
        for detector, check in DETECTORS
        if (enabled is None or detector in enabled) and check(scan)
    ]
