"""The real words a model may offer: the words of its training corpus, shipped with the model.

A byte-level model can spell anything, and a small one spells plausible non-words ("tomore",
"sorryly"). The Predictor offers a completion only if the lexicon holds it (case-insensitively)
or the user typed it (their phrase model's words). Words with a digit ("2nd", "mp3") are
not dictionary words and always pass.

On disk: `lexicon.txt.gz`, one lower-cased word per line, sorted (readable, and diffable between
models). In memory: a sorted array of 64-bit hashes, 8 bytes a word (a set of strings would
take ten times that), looked up by binary search.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from keyboard.types import KeyboardError

FILE = "lexicon.txt.gz"


class LexiconError(KeyboardError):
    """A lexicon file that cannot be read."""


def _key(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


class Lexicon:
    """Membership of lower-cased words, case-insensitive."""

    def __init__(self, words: Iterable[str]) -> None:
        keys = np.fromiter((_key(w.lower()) for w in words), dtype=np.uint64)
        self._keys = np.unique(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, word: object) -> bool:
        if not isinstance(word, str) or not word:
            return False
        if any(ch.isdigit() for ch in word):
            return True
        key = np.uint64(_key(word.lower()))
        i = int(np.searchsorted(self._keys, key))
        return i < len(self._keys) and self._keys[i] == key

    @staticmethod
    def save(path: str | Path, words: Iterable[str]) -> int:
        """Write `words` (lower-cased, deduplicated, sorted); returns how many."""
        unique = sorted({w.lower() for w in words if w})
        # No name and mtime 0 in the header: the same words give the same bytes.
        with open(path, "wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as f:
            f.write(("\n".join(unique) + "\n").encode("utf-8"))
        return len(unique)

    @classmethod
    def load(cls, path: str | Path) -> Lexicon:
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                words = [line.rstrip("\n") for line in f]
        except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
            raise LexiconError(f"lexicon {path} cannot be read: {exc}") from exc
        return cls(w for w in words if w)
