"""What a word is, for prediction: the shared word pattern and the partial word at the cursor."""

from __future__ import annotations

import re

# The one definition of a word (letters, digits, apostrophes, inner hyphens) is the evaluation's,
# so that what the predictor offers and what the metrics count can never disagree.
from keyboard.evaluation import WORD_RE, partial_word

__all__ = ["WORD_RE", "MAX_PREFIX_CHARS", "is_word_char", "split_prefix"]

MAX_PREFIX_CHARS = 64  # a longer run of word characters is not a word anyone completes

_WORD_CHAR_RE = re.compile(r"[^\W_]|'")  # a letter or digit (Unicode) or an apostrophe


def is_word_char(ch: str) -> bool:
    """True for characters words are made of (and may begin with): Unicode letters and digits,
    and the apostrophe. A hyphen belongs to a word only between two of these (see WORD_RE)."""
    return bool(_WORD_CHAR_RE.fullmatch(ch))


def split_prefix(context: str) -> tuple[str, str]:
    """(before, prefix): `prefix` is the part of a word the text ends with ("" at a word boundary,
    as `evaluation.partial_word` defines it) and `before` the text in front of it.

    Only the last MAX_PREFIX_CHARS + 1 characters are looked at, so a megabyte of text costs
    nothing; a longer run of word characters comes back whole-tail as the prefix (longer than
    MAX_PREFIX_CHARS), which callers treat as "not a word to complete".
    """
    tail = context[-(MAX_PREFIX_CHARS + 1) :]
    prefix = partial_word(tail)
    return context[: len(context) - len(prefix)], prefix
