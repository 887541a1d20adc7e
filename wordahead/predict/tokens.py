"""The vocabulary seen as bytes, and the model's next-token distributions.

The model predicts tokens (byte-level BPE, a word's leading space is part of its first token);
people see words. `TokenTable` says once per vocabulary which tokens may start, continue or end
a word, so each keystroke is numpy work on index arrays; `Next` is one next-token distribution
and what the word search reads from it.
"""

from __future__ import annotations

import bisect
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wordahead.model.artifacts import ArtifactError
from wordahead.predict.words import is_word_char

TOP_TOKENS = 24  # likeliest tokens of a kind memoised per distribution (>= MAX_K)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def _letter_byte(b: int) -> bool:
    """Could this byte, alone in a token, belong to a letter? Continuation bytes and the lead
    bytes of scripts with letters (Latin, Greek, Cyrillic, ..., CJK) yes; the lead bytes of
    punctuation and symbol blocks (U+0080-U+00BF, U+2000-U+2FFF, emoji) no."""
    return 0x80 <= b <= 0xBF or 0xC3 <= b <= 0xDF or b in (0xE0, 0xE1) or 0xE3 <= b <= 0xED


def _wordish(ch: str) -> bool:
    # A byte that does not decode on its own (a multi-byte character split across tokens) is
    # judged by `_letter_byte`; the finished word is checked against WORD_RE after decoding.
    if "\udc80" <= ch <= "\udcff":
        return _letter_byte(ord(ch) - 0xDC00)
    return is_word_char(ch)


def incomplete(word: bytes) -> bool:
    """True if `word` ends inside a multi-byte UTF-8 character."""
    for back in range(1, min(4, len(word)) + 1):
        b = word[-back]
        if b < 0x80:
            return False
        if b >= 0xC0:  # the lead byte: how many bytes does its character need?
            return back < (2 if b < 0xE0 else 3 if b < 0xF0 else 4)
    return False


def _word_part(body: bytes) -> int:
    """How many leading bytes of `body` continue a word: word characters, and hyphens followed
    by one (or ending the token: the word may go on in the next token)."""
    chars = body.decode("utf-8", "surrogateescape")
    pos = 0
    for i, ch in enumerate(chars):
        if _wordish(ch):
            pos += len(ch.encode("utf-8", "surrogateescape"))
        elif ch == "-" and (i + 1 == len(chars) or _wordish(chars[i + 1])):
            pos += 1
        else:
            break
    return pos


def _is_punctuation(text: str) -> bool:
    return bool(text) and all(unicodedata.category(ch).startswith("P") for ch in text)


class TokenTable:
    """Per-token facts precomputed once, so each keystroke is numpy work on index arrays."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        from tokenizers import decoders

        if not isinstance(tokenizer.decoder, decoders.ByteLevel):
            raise ArtifactError("the predictor needs a byte-level BPE tokenizer (GPT-2 style)")
        decoder = _byte_decoder()
        special = set(tokenizer.get_added_tokens_decoder())
        n = vocab_size
        self.size = n
        self.bytes: list[bytes] = [b""] * n
        self.special = np.zeros(n, dtype=bool)
        self.spaced = np.zeros(n, dtype=bool)  # " word": a space, then something else
        self.start_ok = np.zeros(n, dtype=bool)  # body starts with a character a word starts with
        self.word_len = np.zeros(n, dtype=np.int32)  # bytes of the body that continue a word
        self.body_len = np.zeros(n, dtype=np.int32)
        self.mid_char = np.zeros(n, dtype=bool)  # body starts inside a multi-byte character
        self.punct: dict[int, str] = {}
        for i in range(n):
            piece = tokenizer.id_to_token(i) if i < tokenizer.get_vocab_size() else None
            if piece is None or i in special or any(c not in decoder for c in piece):
                self.special[i] = True
                continue
            raw = bytes(decoder[c] for c in piece)
            self.bytes[i] = raw
            spaced = len(raw) > 1 and raw[:1] == b" "
            body = raw[1:] if spaced else raw
            self.spaced[i] = spaced
            self.body_len[i] = len(body)
            text = body.decode("utf-8", "surrogateescape")
            self.mid_char[i] = bool(body) and 0x80 <= body[0] <= 0xBF
            self.start_ok[i] = bool(text) and not self.mid_char[i] and _wordish(text[0])
            self.word_len[i] = _word_part(body)
            if _is_punctuation(text) and not self.start_ok[i]:
                self.punct[i] = text
        plain = ~self.special & ~self.spaced
        self.terminal = (self.word_len > 0) & (self.word_len < self.body_len)
        # First token of a word after a space (the space is part of it) or right after the text.
        self.first_spaced = ~self.special & self.spaced & self.start_ok
        self.first_plain = plain & self.start_ok
        # Tokens that continue the word being built; all others end it (boundary).
        self.cont = plain & (self.word_len > 0) & ~self.mid_char
        self.after_hyphen = self.cont & self.start_ok
        self.finish_char = plain & (self.word_len > 0) & self.mid_char  # after a split character
        self.boundary = ~self.cont
        self.boundary_f = self.boundary.astype(np.float32)
        self.punct_spaced = np.array([i for i in self.punct if self.spaced[i]], dtype=np.int64)
        self.punct_plain = np.array([i for i in self.punct if not self.spaced[i]], dtype=np.int64)
        order = sorted((b, i) for i, b in enumerate(self.bytes) if not self.special[i])
        self.sorted_bytes = [b for b, _ in order]
        self.sorted_ids = np.array([i for _, i in order], dtype=np.int64)
        self.exact = {b: i for b, i in order}
        self.space_id = self.exact.get(b" ")

    def punctuation(self, probs: np.ndarray, spaced: bool, n: int) -> dict[str, float]:
        """The `n` likeliest punctuation tokens under `probs` (after a space: those that bring
        it), as {mark: probability}, most probable first."""
        ids = self.punct_spaced if spaced else self.punct_plain
        marks: dict[str, float] = {}
        for t in ids[np.argsort(-probs[ids], kind="stable")[:n]].tolist():
            mark = self.punct[t]
            marks[mark] = marks.get(mark, 0.0) + float(probs[t])
        return marks

    def starting_with(self, key: bytes) -> np.ndarray:
        """Ids of the tokens whose bytes start with `key`."""
        lo = bisect.bisect_left(self.sorted_bytes, key)
        hi = bisect.bisect_right(self.sorted_bytes, key + b"\xff" * 64, lo)
        return self.sorted_ids[lo:hi]


@dataclass
class Next:
    """The model's next-token distribution after one token sequence, and what the search
    reads from it (kept in the cache with the sequence)."""

    probs: np.ndarray  # float32 [vocab]
    end: float  # P(the next token ends a word)
    tops: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def top(self, name: str, mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The `n` likeliest tokens among `mask` (named for the memo), most probable first."""
        hit = self.tops.get(name)
        if hit is None or len(hit[0]) < n:
            masked = np.where(mask, self.probs, 0.0)
            m = max(n, TOP_TOKENS)
            ids = np.argpartition(masked, -m)[-m:]
            ids = ids[np.argsort(-masked[ids], kind="stable")]
            hit = self.tops[name] = (ids, masked[ids])
        return hit[0][:n], hit[1][:n]


def next_distributions(table: TokenTable, logits: np.ndarray) -> list[Next]:
    """`Next` for each row of last-position logits [rows, vocab]."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    ends = (z @ table.boundary_f).tolist()
    return [Next(z[row], ends[row]) for row in range(z.shape[0])]
