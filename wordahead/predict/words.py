"""What a word is, for prediction: the shared word pattern and the partial word at the cursor."""

from __future__ import annotations

import re

__all__ = [
    "WORD_RE",
    "MAX_PREFIX_CHARS",
    "is_word_char",
    "partial_word",
    "split_prefix",
    "word_spans",
    "words",
]

# The one definition of a word (docs/evaluation.md), shared by the predictor and
# the metrics so that what is offered and what is counted can never disagree: a run of letters, digits and apostrophes
# that holds at least one letter or digit, and such runs joined by single inner hyphens.
# `[^\W_]` is a Unicode letter or digit (`\w` without the underscore).
_CHAR = r"(?:[^\W_]|')"
_SEGMENT = rf"'*[^\W_]{_CHAR}*"
WORD_RE = re.compile(rf"{_SEGMENT}(?:-{_SEGMENT})*")
# The part of a word typed so far, at the end of a text: a word, a word and the hyphen before
# its next segment, or leading apostrophes alone (a word such as 'tis, just started).
_PARTIAL_RE = re.compile(rf"(?:{WORD_RE.pattern}-?|'+)\Z")
_WORDISH_RE = re.compile(r"[^\W_]|['-]")  # characters a partial word can be made of


def word_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every word in `text`, in order."""
    return [m.span() for m in WORD_RE.finditer(text)]


def words(text: str) -> list[str]:
    """The words of `text`, in order (case kept)."""
    return WORD_RE.findall(text)


def partial_word(text: str) -> str:
    """The part of a word that `text` ends with ("" when the cursor is at a word boundary)."""
    start = len(text)
    while start > 0 and _WORDISH_RE.match(text[start - 1]):
        start -= 1  # scan back over the last run only, so long texts stay cheap
    m = _PARTIAL_RE.search(text, start)
    return m.group(0) if m else ""


MAX_PREFIX_CHARS = 64  # a longer run of word characters is not a word anyone completes

_WORD_CHAR_RE = re.compile(r"[^\W_]|'")  # a letter or digit (Unicode) or an apostrophe


def is_word_char(ch: str) -> bool:
    """True for characters words are made of (and may begin with): Unicode letters and digits,
    and the apostrophe. A hyphen belongs to a word only between two of these (see WORD_RE)."""
    return bool(_WORD_CHAR_RE.fullmatch(ch))


def split_prefix(context: str) -> tuple[str, str]:
    """(before, prefix): `prefix` is the part of a word the text ends with ("" at a word boundary,
    as `partial_word` defines it) and `before` the text in front of it.

    Only the last MAX_PREFIX_CHARS + 1 characters are looked at, so a megabyte of text costs
    nothing; a longer run of word characters comes back whole-tail as the prefix (longer than
    MAX_PREFIX_CHARS), which callers treat as "not a word to complete".
    """
    tail = context[-(MAX_PREFIX_CHARS + 1) :]
    prefix = partial_word(tail)
    return context[: len(context) - len(prefix)], prefix
