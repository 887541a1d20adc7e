"""What must never reach the typing log: secret patterns in text, and sources excluded by glob."""

from __future__ import annotations

import fnmatch
import math
import os
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

# What a secret becomes. One fixed token, so the trainer can drop it and a person reading the
# log sees that something was removed.
REDACTED = "[redacted]"

# Sources (file paths, app names, language ids) whose text is never stored. Matched
# case-insensitively against the whole source and its last path component; `~` is expanded.
DEFAULT_EXCLUDED_SOURCES: tuple[str, ...] = (
    "*.env",
    "*.env.*",
    "*dotenv*",
    "*secret*",
    "*password*",
    "*passwd*",
    "*credential*",
    "~/.ssh/*",
    "~/.gnupg/*",
    "*.pem",
    "*.key",
    "*id_rsa*",
    "*id_ed25519*",
    "*.kdbx",
    "*.netrc",
    "*.pgpass",
)


@dataclass(frozen=True)
class Finding:
    """One secret found in a text: which rule, and the character span to replace."""

    rule: str
    start: int
    end: int


@dataclass(frozen=True)
class Rule:
    """A secret pattern. `group` names the part to replace (0: the whole match); `check`, when
    given, must accept that part (Luhn for cards, randomness for base64) or the match is ignored."""

    name: str
    pattern: re.Pattern[str]
    group: int | str = 0
    check: Callable[[str], bool] | None = None


def luhn_valid(digits: str) -> bool:
    """True when the digits (separators allowed) pass the Luhn checksum used by payment cards."""
    nums = [int(c) for c in digits if c.isdigit()]
    if len(nums) < 13 or len(nums) > 19:
        return False
    total = 0
    for i, n in enumerate(reversed(nums)):
        if i % 2 == 1:
            n *= 2
            if n > 9:
                n -= 9
        total += n
    return total % 10 == 0


_WORDISH = re.compile(r"[A-Z]?[a-z]{3,}|[A-Z]{3,}")


def _entropy(s: str) -> float:
    counts = Counter(s)
    return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())


def looks_random(s: str) -> bool:
    """True for a long run that looks like a random key rather than an identifier or a path.

    Identifiers and paths are made of word-like chunks (`camelCase`, `snake_case`, `a/b/c`);
    random base64/base62 has few of them and switches between upper, lower and digit often.
    Measured on 5,000 random tokens each: ~94% of 32-char and ~98% of 64-char base64/base62
    strings are caught, while long identifiers and paths are not (see tests/test_redaction.py).
    Lower-case-only random strings (base36) mostly slip through; hex has its own rule.
    """
    classes = sum(any(f(c) for c in s) for f in (str.isupper, str.islower, str.isdigit))
    if classes < 2 or _entropy(s) < 3.5:
        return False
    wordlike = sum(len(m.group()) for m in _WORDISH.finditer(s)) / len(s)
    alnum = [c for c in s if c.isalnum()]
    kind = ["u" if c.isupper() else "l" if c.islower() else "d" for c in alnum]
    switches = sum(a != b for a, b in zip(kind[:-1], kind[1:], strict=True)) / max(1, len(kind) - 1)
    return wordlike < 0.5 or (wordlike < 0.8 and switches >= 0.5)


def _has_digit(s: str) -> bool:
    return any(c.isdigit() for c in s)


def _secretish_value(s: str) -> bool:
    # After `token:` or `api_key=` in prose ("token: a unit of text") the value is a word, in
    # code often a call (`token = tokenizer.encode(x)`); a real key is long and has a digit,
    # or is long and random-looking.
    if "(" in s:
        return False
    return (len(s) >= 8 and _has_digit(s)) or (len(s) >= 20 and looks_random(s))


_PASSWORD_KEYS = r"pass(?:word|wd|phrase)?|pwd"
_SECRET_KEYS = (
    r"(?:client[_-]?)?secret(?:[_-]?key)?|api[_-]?key|apikey|access[_-]?key(?:[_-]?id)?"
    r"|(?:auth|access|refresh|bearer|session)[_-]?token|token|private[_-]?key"
)
# Key, optional closing quote (JSON/YAML/INI), `:` or `=`, then the value: quoted or one word.
_VALUE = r"""\s*(?:"(?P<dq>[^"\n]+)"|'(?P<sq>[^'\n]+)'|(?P<bare>[^\s"',;&]+))"""


def _assignment(keys: str) -> re.Pattern[str]:
    return re.compile(rf"""(?i)(?<![A-Za-z0-9])(?:{keys})["']?\s*[:=]{_VALUE}""")


# The rules, most specific first. Overlapping findings are merged, so order only matters
# for which rule name a finding reports.
RULES: tuple[Rule, ...] = (
    Rule(
        "private_key",
        re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
            re.DOTALL,
        ),
    ),
    Rule(
        "jwt",
        re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),
    ),
    Rule(
        "api_token",
        re.compile(
            r"\b(?:"
            r"(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}"  # AWS access key id
            r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub
            r"|glpat-[A-Za-z0-9_-]{20,}"  # GitLab
            r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
            r"|sk-(?:proj-|ant-|live-)?[A-Za-z0-9_-]{20,}"  # OpenAI, Anthropic and similar
            r"|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
            r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
            r"|npm_[A-Za-z0-9]{36}|pypi-[A-Za-z0-9_-]{50,}|hf_[A-Za-z0-9]{30,}"
            r"|SG\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}"  # SendGrid
            r")"
        ),
    ),
    Rule(
        "bearer",
        re.compile(r"(?i)\b(?:bearer|basic|token)\s+(?P<v>[A-Za-z0-9._~+/-]{16,}=*)"),
        group="v",
        check=_has_digit,
    ),
    Rule(
        "url_password",
        re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]+:(?P<v>[^\s@/]+)@"),
        group="v",
    ),
    Rule("password", _assignment(_PASSWORD_KEYS), group="value"),
    Rule("secret_assignment", _assignment(_SECRET_KEYS), group="value", check=_secretish_value),
    Rule(
        "uuid",
        re.compile(
            r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
        ),
    ),
    Rule("hex", re.compile(r"\b(?:0x)?[0-9a-fA-F]{32,}\b")),
    Rule(
        "base64",
        re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{32,}={0,2}(?![A-Za-z0-9+/_=-])"),
        check=looks_random,
    ),
    Rule(
        "card_number",
        re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"),
        check=luhn_valid,
    ),
)


def _span(rule: Rule, m: re.Match[str]) -> tuple[int, int] | None:
    if rule.group == "value":  # assignment rules: whichever value alternative matched
        for g in ("dq", "sq", "bare"):
            if m.group(g) is not None:
                return m.span(g)
        return None
    return m.span(rule.group)


def find_secrets(text: str, rules: Sequence[Rule] = RULES) -> list[Finding]:
    """Every likely secret in `text`, as non-overlapping spans in text order."""
    found: list[Finding] = []
    for rule in rules:
        for m in rule.pattern.finditer(text):
            span = _span(rule, m)
            if span is None or span[0] == span[1]:
                continue
            if rule.check is not None and not rule.check(text[span[0] : span[1]]):
                continue
            found.append(Finding(rule.name, *span))
    found.sort(key=lambda f: (f.start, -f.end))
    merged: list[Finding] = []
    for f in found:
        if merged and f.start < merged[-1].end:
            last = merged[-1]
            merged[-1] = Finding(last.rule, last.start, max(last.end, f.end))
        else:
            merged.append(f)
    return merged


def redact(text: str) -> str:
    """`text` with every likely secret replaced by `REDACTED`."""
    findings = find_secrets(text)
    if not findings:
        return text
    parts: list[str] = []
    pos = 0
    for f in findings:
        parts.append(text[pos : f.start])
        parts.append(REDACTED)
        pos = f.end
    parts.append(text[pos:])
    return "".join(parts)


def excluded_by(source: str, patterns: Iterable[str]) -> str | None:
    """The first glob in `patterns` that excludes `source` (a path, app or file type), or None.

    A pattern matches the whole source or its last path component, case-insensitively; an
    absolute pattern (`~/.ssh/*`) also matches inside a prefixed source (`vscode:/home/u/.ssh/x`).
    """
    if not source:
        return None
    s = source.removeprefix("file://").lower()
    base = posixpath.basename(s.rstrip("/"))
    for pattern in patterns:
        p = os.path.expanduser(pattern).lower()
        if fnmatch.fnmatchcase(s, p) or (base and fnmatch.fnmatchcase(base, p)):
            return pattern
        if p.startswith("/") and fnmatch.fnmatchcase(s, "*" + p):
            return pattern
    return None
