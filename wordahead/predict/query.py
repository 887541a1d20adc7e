"""What one predict call asks: the model's window of the text, and the word being typed."""

from __future__ import annotations

import re
from dataclasses import dataclass

from wordahead.predict.words import MAX_PREFIX_CHARS, split_prefix
from wordahead.types import MAX_K, KeyboardError

SURROGATES = re.compile("[\ud800-\udfff]")
_SPACE = re.compile(r"\s")
_NON_SPACE = re.compile(r"\S")


def model_window(text: str, context_tokens: int, end: int | None = None) -> tuple[str, bool]:
    """The part of `text[:end]` the model reads, and whether it is the start of the text.

    A pure function of the text: the cut moves in steps of `context_tokens` characters (so the
    window, and the cached key/values, stay put while the user types on) and lands after a
    whitespace (so it starts at a word). The window holds 2-3 x `context_tokens` characters;
    the token ids are cut to the last `context_tokens` afterwards (dense text only). Only the
    window is copied, so a megabyte of text costs no more than a line.
    """
    n = len(text) if end is None else end
    step = context_tokens
    if n <= 3 * step:
        return text[:n], True
    cut = ((n - 2 * step) // step) * step
    space = _SPACE.search(text, cut, min(n, cut + step // 2))
    if space is not None:
        cut = space.end()
    return text[cut:n], False


@dataclass(frozen=True)
class Query:
    """What one predict call asks, after the text has been split and bounded."""

    window: str  # model input text (without the space that belongs to the next token)
    at_start: bool  # the window is the start of the text: EOS goes first
    lead: bytes  # b" " when the word starts with a space token, else b""
    prefix: str  # the typed part of the word ("" at a boundary)
    k: int

    @property
    def before(self) -> str:
        """The text before the word as the model reads it: the window and the space before
        the word (what a source continues or changes to ask the model about other text)."""
        return self.window + self.lead.decode("utf-8")


def make_query(context: object, k: object, context_tokens: int) -> Query | str:
    """Validate and split a predict call's arguments; a str result is a prefix too long to
    complete (no suggestions)."""
    if not isinstance(context, str):
        raise KeyboardError(f"context must be text (str), not {type(context).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise KeyboardError(f"k must be a whole number from 1 to {MAX_K} (got {k!r})")
    prefix = split_prefix(context[-(MAX_PREFIX_CHARS + 1) :])[1]
    if len(prefix) > MAX_PREFIX_CHARS:
        return prefix
    end = len(context) - len(prefix)  # the text before the word, never copied whole
    if _NON_SPACE.search(context, 0, end) is None:
        end = 0  # empty or whitespace only: predict the start of a text
    lead = b""
    if end and context[end - 1] == " ":
        end, lead = end - 1, b" "
    window, at_start = model_window(context, context_tokens, end)
    # Only the window is sanitised, so a megabyte of text costs no more than its tail; lone
    # surrogates (from bad decoding upstream) cannot be encoded and become U+FFFD.
    window = SURROGATES.sub("\ufffd", window)
    return Query(window, at_start, lead, SURROGATES.sub("\ufffd", prefix), k)
