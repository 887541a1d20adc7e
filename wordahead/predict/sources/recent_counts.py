"""The n-gram counts of what was typed since the stored phrases were counted, kept as they
grow: learning a message costs that message (its n-grams), not the text typed before it.

A `PhraseModel` is flat arrays, fast to read and small, but adding one message to it means
building it again: 2.5 s per message after 20,000 of them. These counts are dicts updated in
place, with the few derived things a prediction reads (each context's total, the most typed
words, the words in sorted order for prefixes) kept up to date as they change, so they answer
`evidence` and `candidates` as the `PhraseModel` of the same text would. Memory is bounded as
a stored model's is: past twice `max_ngrams` 2- and 3-grams the rarest go (a full pass, at
most once per `max_ngrams` new n-grams: amortised, a constant per message).

Not thread-safe: the owner (`LivePhrases`) serialises learning and reading.
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter

import numpy as np

from wordahead.predict.sources.phrases import (
    _SCAN_LIMIT,
    CANDIDATES,
    ORDER,
    Evidence,
    Level,
    PhraseCounts,
    _is_word,
    tokens,
)


class RecentCounts:
    """Word 1-, 2- and 3-gram counts, learned one message at a time."""

    def __init__(self, max_ngrams: int) -> None:
        self.max_ngrams = max_ngrams
        self.unigrams: Counter[str] = Counter()  # words only
        self.follow: dict[tuple[str, ...], Counter[str]] = {}  # context -> next word
        self._totals: Counter[tuple[str, ...]] = Counter()  # context -> words after it
        self._ngrams = 0
        self.words = 0  # words learned (the size of the text)
        self._sorted: list[str] = []  # the words, sorted (prefix ranges, as a PhraseModel)
        self._lower: list[str] = []  # their lower-case forms, sorted (has_prefix)
        self._top: dict[str, int] = {}  # the CANDIDATES most typed words and their counts

    @property
    def ngrams(self) -> int:
        return self._ngrams

    def learn(self, text: str) -> None:
        """Count the n-grams of one message (or several, separated by newlines)."""
        toks = tokens(text)
        for i, tok in enumerate(toks):
            if not _is_word(tok):
                continue
            self._count_word(tok)
            for n in range(1, ORDER):
                if i - n >= 0:
                    ctx = tuple(toks[i - n : i])
                    after = self.follow.get(ctx)
                    if after is None:
                        after = self.follow[ctx] = Counter()
                    if tok not in after:
                        self._ngrams += 1
                    after[tok] += 1
                    self._totals[ctx] += 1
        if self._ngrams > 2 * self.max_ngrams:
            self._prune()

    def _count_word(self, word: str) -> None:
        count = self.unigrams[word] + 1
        self.unigrams[word] = count
        self.words += 1
        if count == 1:
            bisect.insort(self._sorted, word)
            lower = word.lower()
            at = bisect.bisect_left(self._lower, lower)
            if at == len(self._lower) or self._lower[at] != lower:
                self._lower.insert(at, lower)
        # Counts only grow between prunes: a word enters the most typed when its count does.
        if word in self._top or len(self._top) < CANDIDATES:
            self._top[word] = count
        else:
            least = min(self._top, key=self._top.__getitem__)
            if count > self._top[least]:
                del self._top[least]
                self._top[word] = count

    def _prune(self) -> None:
        """Keep `max_ngrams` 2- and 3-grams (PhraseCounts.prune: the rarest go)."""
        counts = PhraseCounts()
        counts.unigrams, counts.follow = self.unigrams, self.follow
        counts.prune(self.max_ngrams)
        self.follow = counts.follow
        self._totals = Counter({ctx: sum(after.values()) for ctx, after in self.follow.items()})
        self._ngrams = counts.ngrams

    # --- reading, as a PhraseModel of the same text ----------------------------------------
    def has_prefix(self, part: str) -> bool:
        """Whether a word typed starts with `part`, case-insensitively."""
        key = part.lower()
        at = bisect.bisect_left(self._lower, key)
        return at < len(self._lower) and self._lower[at].startswith(key)

    def _levels(self, words: list[str], context: tuple[str, ...]) -> list[Level]:
        levels = []
        for n in range(1, ORDER):
            after = self.follow.get(context[-n:]) if len(context) >= n else None
            if after is None:  # an unseen shorter context ends the back-off chain
                break
            seen = np.array([after.get(w, 0) for w in words], dtype=np.int64)
            levels.append(Level(seen, self._totals[context[-n:]], len(after)))
        return levels

    def evidence(self, words: list[str], context: tuple[str, ...]) -> Evidence:
        """The counts behind P_user(word | context) for each of `words`."""
        counts = np.array([self.unigrams.get(w, 0) for w in words], dtype=np.int64)
        if not self.words:
            return Evidence(counts, 0, [])
        return Evidence(counts, self.words, self._levels(words, context))

    def candidates(self, context: tuple[str, ...], prefix: str, limit: int) -> list[str]:
        """The words a PhraseModel of this text would score for `candidates`: the most typed
        (starting with `prefix`) and those typed after the context."""
        if not self.words:
            return []
        if prefix:
            lo = bisect.bisect_left(self._sorted, prefix)
            hi = bisect.bisect_left(self._sorted, prefix + "\U0010ffff", lo)
            scan = self._sorted[lo : min(hi, lo + _SCAN_LIMIT)]
            pool = set(heapq.nlargest(limit, scan, key=self.unigrams.__getitem__))
        else:
            pool = set(self._top)
        for n in range(1, ORDER):
            after = self.follow.get(context[-n:]) if len(context) >= n else None
            if after is None:
                break
            pool.update(w for w in after if w.startswith(prefix))
        return sorted(pool)
