"""Phrases learned as you type: what was typed since the stored phrases were counted, layered
over them, so a word typed an hour ago is suggested now and not only after the nightly job.

The stored `PhraseModel` (the active adapter version's, counted by the last job) is read only
through `candidates` and `probability`; the recent text has a small `PhraseModel` of its own.
The user model the Predictor blends in is their mixture, a cache model in the classic sense:

    P_user(w | c) = (1 - recent_weight) * P_stored(w | c) + recent_weight * P_recent(w | c)

(P_recent alone while nothing is stored). The recent counts are rebuilt from the typing log
whenever the served version changes or text is forgotten, so they hold exactly the log's
entries after the ones the stored phrases counted: nothing acknowledged is lost on a restart,
and nothing forgotten survives in memory.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterable, Iterator

from keyboard.phrases import CANDIDATES, CONTEXT_CHARS, DEFAULT_WEIGHT, ORDER, PhraseModel, tokens

# The recent text's share of P_user, set on the users' history (docs/results.md, "Learning as
# you type"): recent text predicts the next message better than its count share says.
RECENT_WEIGHT = 0.3
MAX_RECENT_NGRAMS = 200_000  # the same pruning as a stored model, at half its size


class LivePhrases:
    """The user phrases the daemon serves: the stored model plus what was typed since."""

    def __init__(
        self,
        stored: PhraseModel | None,
        recent_weight: float = RECENT_WEIGHT,
        texts: Iterable[str] = (),
    ) -> None:
        self.stored = stored
        self.recent_weight = recent_weight
        self.recent = PhraseModel()
        self._lock = threading.Lock()  # learn (typing-log thread) vs blend (prediction threads)
        for text in texts:
            self.recent.learn(text)
        self.recent.prune(MAX_RECENT_NGRAMS)

    @property
    def weight(self) -> float:
        """The user model's share of the blend with the language model."""
        return self.stored.weight if self.stored is not None else DEFAULT_WEIGHT

    @property
    def unigrams(self) -> _Words:
        """The words either model holds (`word in live.unigrams`), as for a PhraseModel."""
        return _Words(self)

    @property
    def recent_words(self) -> int:
        return self.recent.words

    def learn(self, text: str) -> None:
        """Count one message the user just typed (as the typing log stored it)."""
        with self._lock:
            self.recent.learn(text)
            if self.recent.ngrams > 2 * MAX_RECENT_NGRAMS:  # prune rarely: it is a full pass
                self.recent.prune(MAX_RECENT_NGRAMS)

    def _mix(self) -> float:
        """The recent model's share now (1 with nothing stored, 0 with nothing recent)."""
        if not self.recent.unigrams:
            return 0.0
        return 1.0 if self.stored is None else self.recent_weight

    def probability(self, word: str, context: tuple[str, ...]) -> float:
        mix = self._mix()
        p = 0.0 if mix == 0.0 else mix * self.recent.probability(word, context)
        if self.stored is not None and mix < 1.0:
            p += (1.0 - mix) * self.stored.probability(word, context)
        return p

    def candidates(self, context: tuple[str, ...], prefix: str, limit: int) -> dict[str, float]:
        pool: set[str] = set()
        if self.stored is not None:
            pool.update(self.stored.candidates(context, prefix, limit))
        if self.recent.unigrams:
            pool.update(self.recent.candidates(context, prefix, limit))
        scored = {w: self.probability(w, context) for w in pool}
        return {w: scored[w] for w in heapq.nlargest(limit, scored, key=scored.__getitem__)}

    def _knows(self, word: str) -> bool:
        return word in self.recent.unigrams or (
            self.stored is not None and word in self.stored.unigrams
        )

    def blend(
        self, lm: dict[str, float], before: str, at_start: bool, prefix: str, k: int
    ) -> dict[str, float]:
        """As `PhraseModel.blend`, with the mixture of the stored and the recent model."""
        with self._lock:
            if self.stored is None and not self.recent.unigrams:
                return lm
            whole = at_start and len(before) <= CONTEXT_CHARS
            context = tuple(tokens(before[-CONTEXT_CHARS:], at_start=whole)[1 - ORDER :])
            user = self.candidates(context, prefix, max(CANDIDATES, k))
            for w in lm:
                if w not in user and self._knows(w):
                    user[w] = self.probability(w, context)
        out = {w: (1.0 - self.weight) * p for w, p in lm.items()}
        for w, p in user.items():
            out[w] = out.get(w, 0.0) + self.weight * p
        return out


class _Words:
    """Membership in the words of the stored or the recent model."""

    def __init__(self, live: LivePhrases) -> None:
        self._live = live

    def __contains__(self, word: object) -> bool:
        return isinstance(word, str) and self._live._knows(word)

    def __iter__(self) -> Iterator[str]:
        live = self._live
        yield from live.recent.unigrams
        if live.stored is not None:
            yield from (w for w in live.stored.unigrams if w not in live.recent.unigrams)
