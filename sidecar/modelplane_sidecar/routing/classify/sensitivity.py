"""Data-sensitivity classifier: which kinds of sensitive data a request carries.

Each detector is a precompiled regular expression plus a checksum or range check that removes the
usual false positives (Luhn for payment cards, mod-97 for IBANs, the never-issued ranges of US
SSNs, octet ranges for IPv4, a parser for IPv6). These exact patterns and checks are the
specification: a detector fires when its pattern, tried at any position of the text, matches
there and the match passes the check. Routing needs presence, not a count, so a detector stops
at its first valid finding. The result never holds the sensitive values themselves, only labels,
so it is safe to log and to return from the explain endpoint.

Running a dozen backtracking patterns over a long prompt costs milliseconds (Python's engine
tries each pattern at every position, and code, logs and JSON are dense with digits), and this
runs on the event loop. So the text is scanned once by RE2, a linear-time automaton, for a
*candidate* pattern per detector: a looser version of the exact one (no lookarounds, no checksum,
ASCII word classes where looser is safe), so every exact match also starts a candidate. Only the
detectors with a candidate are looked at further: RE2 finds their candidates' start positions and
the exact pattern and check run there. Typical prompts have no candidate at all, and a 16 kB
prompt costs tens of microseconds whatever it holds. A text full of look-alikes (candidates the
check rejects) is read with one `finditer` pass per detector past LOOKALIKE_BUDGET of them.
`reference_detect` is the specification without the shortcut; `tests/routing/test_sensitivity.py`
checks that `detect` agrees with it.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import re2

from ...config import DataClass, Detector, SensitivityPolicy
from ...errors import ApiError

# --- The exact patterns: the specification of every detector ------------------------------------

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
    undoubled = sum(ord(c) - 48 for c in digits[-1::-2])
    doubled = sum(2 * d - 9 if d > 4 else 2 * d for d in (ord(c) - 48 for c in digits[-2::-2]))
    return (undoubled + doubled) % 10 == 0


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


# --- What makes a match a finding -----------------------------------------------------------------


def _any_match(match: re.Match[str]) -> bool:
    return True


def _phone_valid(match: re.Match[str]) -> bool:
    return 8 <= sum(c.isdigit() for c in match.group()) <= 15


def _card_valid(match: re.Match[str]) -> bool:
    digits = match.group().replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and _card_brand_prefix(digits) and luhn_valid(digits)


def _iban_valid(match: re.Match[str]) -> bool:
    return iban_valid(match.group())


def _ssn_valid(match: re.Match[str]) -> bool:
    area, group, serial = match.group(1, 3, 4) if match.group(1) else match.group(5, 6, 7)
    return ssn_valid(area, group, serial)


def _ipv6_valid(match: re.Match[str]) -> bool:
    candidate = match.group()
    if sum(c != ":" for c in candidate) < 2:
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


#: What _PLACEHOLDER finds, as literals: one pass each over a long value instead of the pattern
#: tried at every position. Python's "(?i)s" also matches U+017F, hence the replace.
_PLACEHOLDER_PREFIXES = ("$", "%", "{{", "<", "os.", "process.env", "env[", "getenv")
_PLACEHOLDER_PARTS = (
    "xxxx", "***", "your_", "your-", "example", "redacted", "changeme", "placeholder", "dummy",
    "...",
)  # fmt: skip


def is_placeholder(value: str) -> bool:
    """An assigned value that is obviously not a real secret (`_PLACEHOLDER` finds something)."""
    if len(value) <= 64:
        return _PLACEHOLDER.search(value) is not None
    folded = value.lower().replace("\u017f", "s")
    return folded.startswith(_PLACEHOLDER_PREFIXES) or any(p in folded for p in _PLACEHOLDER_PARTS)


def _assignment_valid(match: re.Match[str]) -> bool:
    value = match.group(1)
    varied = len(set(value[:64])) >= 5 or len(set(value)) >= 5
    return varied and not is_placeholder(value)


# --- Candidate patterns (RE2 syntax) --------------------------------------------------------------
# Each is a superset of its exact pattern. A pattern that consumes a lead-in character has one
# capturing group per alternative, starting where the exact pattern would start. Rules that keep
# them supersets:
#  * a lookbehind "not preceded by X" becomes a consumed `(?:[^X]|^)` with X's ASCII part only
#    (RE2's classes are ASCII; a looser exclusion admits more, never fewer);
#  * `\d` (any Unicode decimal digit in Python) becomes `\p{Nd}`, or 0-9 for a text with no other
#    digit; `\s` becomes Python's exact whitespace set; `\b` stays next to an ASCII letter (there
#    RE2's ASCII `\b` holds wherever Python's does), but a word that Python's "(?i)s" lets start
#    with U+017F, a letter RE2's `\b` does not see as one, also gets an alternative starting with
#    that letter and no `\b`;
#  * lookaheads, upper bounds and checksums are dropped; what a check always rejects may be left
#    out (card numbers not starting 2-6, phones under 8 digits, placeholder assignment values);
#  * case-insensitive words spell out the letters Python also folds to "i" (U+0130, U+0131).

#: Python's `\s` (str.isspace), exactly.
_S = (
    r"[\t-\r\x1c-\x20\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]"
)
_I = r"[iI\x{130}\x{131}]"
_LONG_S = r"\x{17f}"
_H = "[0-9A-Fa-f]"
#: Python's `\d` is every Unicode decimal digit; RE2's automaton for them is large, so texts
#: without a digit outside 0-9 (almost all) are scanned with patterns for 0-9 only.
_UNICODE_DIGITS = r"\p{Nd}"
_ASCII_DIGITS = "0-9"
_NON_ASCII_DIGIT = re2.compile(rb"[^\P{Nd}0-9]")


def _fold_i(words: str) -> str:
    return words.replace("i", _I)


def _not_starting_with(prefixes: tuple[str, ...], char: str, length: int) -> str:
    """RE2 for `length` or more characters of the negated class body `char` that do not start
    with any of `prefixes` (ASCII letters in either case). Past `length` characters it accepts
    whatever follows: a candidate pattern only has to admit everything the exact one may find."""

    def variants(c: str) -> str:
        return re.escape(c.lower()) + (c.upper() if c.isalpha() else "")

    def node(prefixes: tuple[str, ...], depth: int) -> str:
        if depth >= length:
            return ""
        nexts = sorted({p[0] for p in prefixes if p})
        rest = "{" + str(length - depth - 1) + "}"
        options = [f"[^{char}{''.join(variants(c) for c in nexts)}][^{char}]{rest}"]
        for c in nexts:
            tails = tuple(p[1:] for p in prefixes if p[0] == c)
            if "" not in tails:  # a whole prefix: the value is a placeholder
                options.append(f"[{variants(c)}]{node(tails, depth + 1)}")
        return "(?:" + "|".join(options) + ")"

    return node(prefixes, 0)


def _candidate_patterns(digits: str) -> tuple[str, ...]:
    """The candidate pattern of each kind (in `_KINDS` order), `digits` being the digit class."""
    d = f"[{digits}]"
    octet = rf"(?:25[0-5]|2[0-4]{d}|1{d}{d}|[1-9]?{d})"
    # Every issuer prefix starts with 2-6 (int() also reads other scripts' digits).
    card_first = "[2-6]" if digits == _ASCII_DIGITS else r"(?:[2-6]|[^\x00-\x7f])"
    secret_token = (
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
        r"|\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b"
        r"|\bgh[pousr]_[A-Za-z0-9]{36}"
        r"|\bgithub_pat_[A-Za-z0-9_]{22}"
        r"|\bglpat-[A-Za-z0-9_-]{20}"
        r"|\bxox[abposr]-[A-Za-z0-9-]{10}"
        rf"|\bsk-(?:proj-|ant-(?:api{d}{d}-)?|svcacct-)?[A-Za-z0-9_-]{{20}}"
        r"|\bAIza[0-9A-Za-z_-]{35}"
        r"|\b[rs]k_live_[0-9A-Za-z]{16}"
        r"|\beyJ[A-Za-z0-9_-]{8}[A-Za-z0-9_-]*\.eyJ[A-Za-z0-9_-]{8}[A-Za-z0-9_-]*\.[A-Za-z0-9_-]{8}"
    )
    secret_assignment = (
        r"(?:\b(?i:"
        + _fold_i(
            r"api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|password|passwd"
            r"|client[_-]?secret|private[_-]?key"
        )
        + rf")|{_LONG_S}(?i:ecret(?:[_-]?key)?))"
        + rf"\b[\"']?{_S}*[:=]{_S}*[\"']?"
        # A value: 8 or more characters, not one of the placeholders that open with a marker.
        + _not_starting_with(_PLACEHOLDER_PREFIXES, "\\t-\\r \"'<>`", 8)
    )
    email = (
        r"(?:[^A-Za-z0-9_.%+-]|^)([A-Za-z0-9][A-Za-z0-9._%+-]*@"
        r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2})"
    )
    card = rf"(?:[^{digits}-]|^)({card_first}(?:[ -]?{d}){{12}})"
    iban = rf"(?:[^A-Za-z0-9]|^)((?:{'|'.join(sorted(_IBAN_LENGTHS))}){d}{{2}}(?: ?[A-Z0-9]){{11}})"
    ssn = (
        rf"(?:[^{digits}-]|^)({d}{{3}}[ -]{d}{{2}}[ -]{d}{{4}})"
        # The keyword form: " number" and up to 20 other non-digits, then 9 digits.
        rf"|((?:\b(?i:ssn|{_fold_i('social security')})"
        rf"|{_LONG_S}(?i:sn|{_fold_i('ocial security')}))[^0-9]{{0,27}}{d}{{9}})"
    )
    phone = (
        # International: at least 8 digits, with at most ")", a separator and "(" between two.
        rf"(?:[^A-Za-z0-9_+]|^)(\+{d}(?:[ .()-]{{0,3}}{d}){{7}})"
        rf"|(?:[^A-Za-z0-9_.-]|^)((?:\([2-9]{d}{{2}}\){_S}?|[2-9]{d}{{2}}[ .-])"
        rf"[2-9]{d}{{2}}[ .-]{d}{{4}})"
        rf"|(?:[^A-Za-z0-9_.-]|^)(0{d}{{1,4}}[ /-]{d}{{3,4}}[ -]?{d}{{3,4}})"
    )
    ipv4 = rf"(?:[^{digits}.]|^)({octet}\.{octet}\.{octet}\.{octet})"
    # A valid IPv6 address is eight full groups, or has a "::" and (the check wants two) hex digits.
    ipv6 = (
        rf"(?:[^A-Za-z0-9_:.]|^)([0-9A-Fa-f:]*(?:::[0-9A-Fa-f:]*{_H}|{_H}[0-9A-Fa-f:]*::)"
        rf"|{_H}{{1,4}}(?::{_H}{{1,4}}){{7}})"
    )
    return (secret_token, secret_assignment, email, card, iban, ssn, phone, ipv4, ipv6)


@dataclass(frozen=True, slots=True)
class _Kind:
    """An exact pattern and what makes its match a finding."""

    label: Detector
    exact: re.Pattern[str]
    valid: Callable[[re.Match[str]], bool]


#: In `_candidate_patterns` order; findings are reported in this order of labels.
_KINDS = (
    _Kind(Detector.SECRET, _SECRET, _any_match),
    _Kind(Detector.SECRET, _SECRET_ASSIGNMENT, _assignment_valid),
    _Kind(Detector.EMAIL, _EMAIL, _any_match),
    _Kind(Detector.PAYMENT_CARD, _CARD, _card_valid),
    _Kind(Detector.IBAN, _IBAN, _iban_valid),
    _Kind(Detector.US_SSN, _SSN, _ssn_valid),
    _Kind(Detector.PHONE, _PHONE, _phone_valid),
    _Kind(Detector.IP_ADDRESS, _IPV4, _any_match),
    _Kind(Detector.IP_ADDRESS, _IPV6, _ipv6_valid),
)
_LABELS = tuple(dict.fromkeys(kind.label for kind in _KINDS))


def _re2_options() -> Any:
    options = re2.Options()
    # An automaton that outgrows its memory falls back to a slower one; never log per request.
    options.log_errors = False
    return options


class _Scanner:
    """The candidate patterns compiled for RE2: one set for the single pass, one per kind."""

    def __init__(self, digits: str) -> None:
        patterns = [p.encode() for p in _candidate_patterns(digits)]
        # RE2's many-match DFA does not give up when its cache fills (it resets and goes on), so
        # a text crafted to blow up the automaton is scanned more slowly, never skipped.
        self.any: Any = re2.Set.SearchSet(_re2_options())
        for pattern in patterns:
            self.any.Add(pattern)
        self.any.Compile()
        self.each: tuple[Any, ...] = tuple(re2.compile(p, _re2_options()) for p in patterns)


_ASCII_SCANNER = _Scanner(_ASCII_DIGITS)


@functools.cache
def _unicode_scanner() -> _Scanner:
    """Compiled on the first text with a digit outside 0-9 (about 1 MB more)."""
    return _Scanner(_UNICODE_DIGITS)


#: Look-alikes of one kind (candidates the exact pattern or check rejects, a rejected match counting
#: once more per LOOKALIKE_CHARS characters it spans) after which the text is read as `finditer`
#: reads it (one pass of the exact pattern, resuming after each rejected match) instead of at every
#: candidate start: a text full of card-like digit groups then costs what that one pass costs, not
#: a few microseconds per digit, and a long assigned value is not read again for each keyword in it.
LOOKALIKE_BUDGET = 32
LOOKALIKE_CHARS = 256


class _Utf8Text:
    """A text and its UTF-8 bytes, with offsets mapped between the two (RE2 works on bytes)."""

    __slots__ = ("_byte", "_char", "ascii", "encoded", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.ascii = text.isascii()
        # A lone surrogate (only possible from a JSON escape) becomes one "?": still one character.
        self.encoded = text.encode("utf-8", "replace")
        # One cursor moving forward; each kind's offsets increase, so a scan decodes its text once.
        self._byte = 0
        self._char = 0

    def char_offset(self, byte_offset: int) -> int:
        if self.ascii:
            return byte_offset
        if byte_offset < self._byte:
            self._byte = self._char = 0
        self._char += len(self.encoded[self._byte : byte_offset].decode("utf-8"))
        self._byte = byte_offset
        return self._char

    def byte_offset(self, char_offset: int) -> int:
        if self.ascii:
            return char_offset
        if char_offset < self._char:
            self._byte = self._char = 0
        self._byte += len(self.text[self._char : char_offset].encode("utf-8", "replace"))
        self._char = char_offset
        return self._byte


def _found(kind: _Kind, candidate: Any, scan: _Utf8Text) -> bool:
    """Check the exact pattern at each candidate start of `kind`, in order, until one passes."""
    exact, valid = kind.exact, kind.valid
    pos = 0  # where RE2 searches from (bytes)
    floor = 0  # candidates starting before this are inside a match already rejected
    rejected = 0
    while True:
        found = candidate.search(scan.encoded, pos)
        if found is None:
            return False
        # The group that matched, if the pattern has a lead-in character; else the whole match.
        group = found.lastindex
        start = int(found.start(int(group) if group is not None else 0))
        if start < floor:
            # A candidate without a lead-in character inside the rejected match: go past it.
            pos = floor
            continue
        char_start = scan.char_offset(start)
        match = exact.match(scan.text, char_start)
        if match is not None and valid(match):
            return True
        rejected += 1 if match is None else 1 + (match.end() - char_start) // LOOKALIKE_CHARS
        if rejected > LOOKALIKE_BUDGET:
            return any(valid(m) for m in exact.finditer(scan.text))
        # From this character: it may be the lead-in the next candidate's pattern consumes.
        pos = start
        floor = scan.byte_offset(char_start + 1)


def detect(text: str, enabled: Mapping[Detector, Any] | None = None) -> list[Detector]:
    """Labels of every enabled detector with a valid finding in `text`."""
    if not text:
        return []
    scan = _Utf8Text(text)
    scanner = _ASCII_SCANNER
    if not scan.ascii and _NON_ASCII_DIGIT.search(scan.encoded):
        scanner = _unicode_scanner()
    flagged = scanner.any.Match(scan.encoded)
    if not flagged:
        return []
    found: set[Detector] = set()
    for index in sorted(flagged):
        kind = _KINDS[index]
        if kind.label in found or (enabled is not None and kind.label not in enabled):
            continue
        if _found(kind, scanner.each[index], scan):
            found.add(kind.label)
    return [label for label in _LABELS if label in found]


def reference_detect(text: str, every_start: bool = True) -> list[Detector]:
    """The specification, slowly: the exact patterns alone, no RE2 and no shortcut.

    every_start=True: a detector fires when its pattern, tried at every position, matches there
    and the match passes its check.
    every_start=False: only the matches `finditer` returns are checked, so a rejected match hides
    any other that starts inside it (how the detectors read text before the RE2 pass).
    `detect` gives the first whenever no detector meets more than LOOKALIKE_BUDGET look-alikes,
    and in any case everything the second finds and nothing the first does not.
    """
    found: set[Detector] = set()
    for kind in _KINDS:
        if kind.label in found:
            continue
        if not every_start:
            if any(kind.valid(m) for m in kind.exact.finditer(text)):
                found.add(kind.label)
            continue
        for start in range(len(text)):
            match = kind.exact.match(text, start)
            if match is not None and kind.valid(match):
                found.add(kind.label)
                break
    return [label for label in _LABELS if label in found]


@dataclass(slots=True, frozen=True)
class Sensitivity:
    """Result of the sensitivity classifier for one request."""

    labels: tuple[Detector, ...]
    #: Every class the request is in: the default, the detected ones, the declared one.
    classes: frozenset[str]
    declared: str | None
    #: The classes among `classes` that restrict where the request may go.
    restricted: tuple[DataClass, ...]

    def allows(self, tags: tuple[str, ...]) -> DataClass | None:
        """The first restricted class an endpoint with `tags` may not receive, else None."""
        for data_class in self.restricted:
            if not any(tag in data_class.allowed_tags for tag in tags):
                return data_class
        return None

    def as_json(self) -> dict[str, Any]:
        return {
            "labels": [d.value for d in self.labels],
            "classes": sorted(self.classes),
            "declared": self.declared,
            "restricted": {c.name: list(c.allowed_tags) for c in self.restricted},
        }


#: id(policy) -> (policy, its result for a request with no finding and no declared class): what
#: almost every request gets, built once per config instead of once per request. The policy is
#: kept alive with its entry, so its id cannot be reused while the entry exists.
_PLAIN: dict[int, tuple[SensitivityPolicy, Sensitivity]] = {}
_PLAIN_MAX = 8


def _plain(policy: SensitivityPolicy) -> Sensitivity:
    cached = _PLAIN.get(id(policy))
    if cached is not None and cached[0] is policy:
        return cached[1]
    classes = frozenset((policy.default_class,))
    restricted = tuple(c for c in policy.classes if c.name in classes and c.allowed_tags)
    result = Sensitivity((), classes, None, restricted)
    if len(_PLAIN) >= _PLAIN_MAX:
        _PLAIN.clear()
    _PLAIN[id(policy)] = (policy, result)
    return result


def classify_sensitivity(
    text: str, headers: Mapping[str, str], policy: SensitivityPolicy
) -> Sensitivity:
    labels = detect(text, policy.detectors) if policy.detectors else []
    if not labels and (
        policy.declared_class_header is None or not headers.get(policy.declared_class_header)
    ):
        return _plain(policy)
    classes = {policy.default_class}
    classes.update(policy.detectors[label] for label in labels)
    declared: str | None = None
    if policy.declared_class_header is not None:
        raw = headers.get(policy.declared_class_header)
        if raw:
            declared = raw.strip().lower()
            for name in (n.strip() for n in declared.split(",")):
                if policy.data_class(name) is None:
                    known = ", ".join(c.name for c in policy.classes)
                    raise ApiError(
                        400,
                        f"Header {policy.declared_class_header} names an unknown data class "
                        f"{name!r}; this router knows: {known}",
                        code="unknown_data_class",
                    )
                classes.add(name)
    restricted = tuple(c for c in policy.classes if c.name in classes and c.allowed_tags)
    return Sensitivity(tuple(labels), frozenset(classes), declared, restricted)
