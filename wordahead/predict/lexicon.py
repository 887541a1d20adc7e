"""The real words a model may offer: the words of its training corpus, shipped with the model.

A byte-level model can spell anything, and a small one spells plausible non-words ("tomore",
"sorryly"). The Predictor offers a completion only if the lexicon holds it (case-insensitively)
or the user typed it (their phrase model's words). Words with a digit ("2nd", "mp3") are
not dictionary words and always pass.

On disk: `lexicon.txt.gz`, one lower-cased word per line, sorted (readable, and diffable between
models). In memory: the sorted words as one UTF-8 string and their offsets (about 3 MB for
191k words; a list of str would take 12 MB), searched by bisection, which answers both "is this
a word" and "does any word start with this" (the search drops spellings that can no longer
become a word). UTF-8 bytes sort as their code points do, so the bytes can be bisected.
"""

from __future__ import annotations

import bisect
import gzip
import logging
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path

from wordahead.types import KeyboardError

log = logging.getLogger(__name__)

FILE = "lexicon.txt.gz"
# Answers remembered per lexicon: the search asks about the same few thousand spellings again
# and again while a word is typed (83% repeats), and a packed bisection costs ~3 us.
MEMO_SIZE = 8192
# 16x the shipped lexicon's 1.9 MB: any real word list fits, a gzip bomb stops here.
MAX_TEXT_BYTES = 32 * 2**20


class LexiconError(KeyboardError):
    """A lexicon file that cannot be read."""


def _has_digit(word: str) -> bool:
    return not word.isalpha() and any(ch.isdigit() for ch in word)  # most words: one C call


def _remember(memo: dict[str, bool], key: str, value: bool) -> None:
    if len(memo) >= MEMO_SIZE:
        memo.clear()  # a new typing context: start over rather than track what is old
    memo[key] = value


def _sorted_words(words: Iterable[str]) -> list[str]:
    return sorted({w.lower() for w in words if w})


class _Packed(Sequence[bytes]):
    """Sorted words packed into one bytes object: item i is the i-th word's UTF-8."""

    def __init__(self, words: list[str]) -> None:
        self._data = "".join(words).encode("utf-8")
        ends = array("q", [0])
        total = 0
        for w in words:
            total += len(w.encode("utf-8")) if not w.isascii() else len(w)
            ends.append(total)
        self._ends = ends

    def __len__(self) -> int:
        return len(self._ends) - 1

    def __getitem__(self, i: int) -> bytes:  # type: ignore[override]  # ints: what bisect asks
        return self._data[self._ends[i] : self._ends[i + 1]]


class Lexicon:
    """Lower-cased words; membership and prefixes, case-insensitive."""

    def __init__(self, words: Iterable[str]) -> None:
        self._words = _Packed(_sorted_words(words))
        self._is_word: dict[str, bool] = {}
        self._starts: dict[str, bool] = {}
        self._next: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._words)

    def __contains__(self, word: object) -> bool:
        if not isinstance(word, str) or not word:
            return False
        known = self._is_word.get(word)
        if known is None:
            known = _has_digit(word) or self._find(word) == 0
            _remember(self._is_word, word, known)
        return known

    def has_prefix(self, part: str) -> bool:
        """Whether some word starts with `part` (any part with a digit may go on)."""
        known = self._starts.get(part)
        if known is None:
            known = _has_digit(part) or self._find(part) >= 0
            _remember(self._starts, part, known)
        return known

    def next_letters(self, part: str) -> str:
        """The characters that come after `part` (lower-cased) in the words that start with
        it, in order, each once: the children of `part` in the words' trie (one bisection per
        child), for the typo search (wordahead.predict.slips)."""
        known = self._next.get(part)
        if known is None:
            known = self._children(part.lower().encode("utf-8"))
            if len(self._next) >= MEMO_SIZE:
                self._next.clear()
            self._next[part] = known
        return known

    def _children(self, key: bytes) -> str:
        words, n = self._words, len(key)
        i = bisect.bisect_left(words, key)
        found: list[str] = []
        while i < len(words):
            word = words[i]
            if not word.startswith(key):
                break
            if len(word) == n:
                i += 1
                continue
            lead = word[n]  # the next character's first byte says how many bytes it takes
            size = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            char = word[n : n + size]
            found.append(char.decode("utf-8", errors="replace"))
            # Past every word with this character next: its last byte + 1 sorts after them.
            i = bisect.bisect_left(words, key + char[:-1] + bytes([char[-1] + 1]), i + 1)
        return "".join(found)

    def _find(self, part: str) -> int:
        """0: `part` is a word; 1: a longer word starts with it; -1: no word does."""
        key = part.lower().encode("utf-8")
        i = bisect.bisect_left(self._words, key)
        if i == len(self._words):
            return -1
        found = self._words[i]
        return 0 if found == key else 1 if found.startswith(key) else -1

    @staticmethod
    def save(path: str | Path, words: Iterable[str]) -> int:
        """Write `words` (lower-cased, deduplicated, sorted); returns how many."""
        unique = _sorted_words(words)
        # No name and mtime 0 in the header: the same words give the same bytes.
        with open(path, "wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as f:
            f.write(("\n".join(unique) + "\n").encode("utf-8"))
        return len(unique)

    @classmethod
    def of_model(cls, model_dir: Path) -> Lexicon | None:
        """The real words the model in `model_dir` may offer (None: the model ships none, or it
        is damaged: then every spelling goes, which is worse advice but no reason to stop
        serving)."""
        path = model_dir / FILE
        if not path.is_file():
            return None
        try:
            return cls.load(path)
        except LexiconError as exc:
            log.warning("%s; offering words without it", exc)
            return None

    @classmethod
    def load(cls, path: str | Path) -> Lexicon:
        """The lexicon in `path`; a LexiconError when it cannot be read, holds no words, or
        inflates past MAX_TEXT_BYTES (checked while reading: a bomb never takes the memory)."""
        try:
            with gzip.open(path, "rb") as f:
                data = f.read(MAX_TEXT_BYTES + 1)
            if len(data) > MAX_TEXT_BYTES:
                raise LexiconError(
                    f"lexicon {path} inflates past {MAX_TEXT_BYTES >> 20} MB: not a word list"
                )
            words = data.decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
            raise LexiconError(f"lexicon {path} cannot be read: {exc}") from exc
        lexicon = cls(w for w in words if w)
        if not len(lexicon):
            raise LexiconError(f"lexicon {path} holds no words")
        return lexicon
