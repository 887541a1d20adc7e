"""The real words a model may offer: the words of its training corpus, shipped with the model.

A byte-level model can spell anything, and a small one spells plausible non-words ("tomore",
"sorryly"). The Predictor offers a completion only if the lexicon holds it (case-insensitively)
or the user typed it (their phrase model's words). Words with a digit ("2nd", "mp3") are
not dictionary words and always pass.

On disk: `lexicon.txt.gz`, one lower-cased word per line, sorted (readable, and diffable between
models). In memory: the sorted list (about 4 MB for 66k words), searched by bisection, which
answers both "is this a word" and "does any word start with this" (the search drops spellings
that can no longer become a word).
"""

from __future__ import annotations

import bisect
import gzip
from collections.abc import Iterable
from pathlib import Path

from keyboard.types import KeyboardError

FILE = "lexicon.txt.gz"


class LexiconError(KeyboardError):
    """A lexicon file that cannot be read."""


def _has_digit(word: str) -> bool:
    return not word.isalpha() and any(ch.isdigit() for ch in word)  # most words: one C call


class Lexicon:
    """Lower-cased words; membership and prefixes, case-insensitive."""

    def __init__(self, words: Iterable[str]) -> None:
        self._words = sorted({w.lower() for w in words if w})  # what `save` writes, too

    def __len__(self) -> int:
        return len(self._words)

    def __contains__(self, word: object) -> bool:
        if not isinstance(word, str) or not word:
            return False
        if _has_digit(word):
            return True
        word = word.lower()
        i = bisect.bisect_left(self._words, word)
        return i < len(self._words) and self._words[i] == word

    def has_prefix(self, part: str) -> bool:
        """Whether some word starts with `part` (any part with a digit may go on)."""
        if _has_digit(part):
            return True
        part = part.lower()
        i = bisect.bisect_left(self._words, part)
        return i < len(self._words) and self._words[i].startswith(part)

    @staticmethod
    def save(path: str | Path, words: Iterable[str]) -> int:
        """Write `words` (lower-cased, deduplicated, sorted); returns how many."""
        unique = Lexicon(words)._words
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
