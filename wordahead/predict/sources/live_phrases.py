"""Phrases learned as you type: what was typed since the stored phrases were counted, layered
over them, so a word typed an hour ago is suggested now and not only after the nightly job.

The stored `PhraseModel` (the active adapter version's, counted by the last job) is read only
through `candidates` and `evidence`; the recent text has counts of its own (`RecentCounts`),
updated in place, so learning a message costs that message, however much was typed before.
The user model the Predictor blends in counts both, the recent text `recent_boost` times: as if
the job had just run, with the newest text weighing more (a cache model: what was typed an
hour ago predicts the next message better than its share of the counts says):

    P_user(w | c) = Witten-Bell over counts_stored(c, w) + recent_boost * counts_recent(c, w)

The recent counts are rebuilt from the typing log whenever the served version changes or text
is forgotten, so they hold exactly the log's
entries after the ones the stored phrases counted: nothing acknowledged is lost on a restart,
and nothing forgotten survives in memory.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterable, Iterator

from wordahead.predict.query import Query
from wordahead.predict.sources.base import Draft, LanguageModel
from wordahead.predict.sources.phrases import (
    CANDIDATES,
    DEFAULT_WEIGHT,
    LM_WORDS,
    PhraseModel,
    last_tokens,
    mix,
    witten_bell,
)
from wordahead.predict.sources.recent_counts import RecentCounts

# How many times a recently typed n-gram counts, set on the users' history (docs/results.md,
# "Learning as you type").
RECENT_BOOST = 3.0
MAX_RECENT_NGRAMS = 200_000  # the same pruning as a stored model, at half its size


class LivePhrases:
    """The user phrases the daemon serves: the stored model plus what was typed since.
    A suggestion source (`wordahead.predict.sources.base`), as a PhraseModel is."""

    lm_words = LM_WORDS

    def __init__(
        self,
        stored: PhraseModel | None,
        recent_boost: float = RECENT_BOOST,
        texts: Iterable[str] = (),
    ) -> None:
        self.stored = stored
        self.recent_boost = recent_boost
        self.recent = RecentCounts(MAX_RECENT_NGRAMS)
        for text in texts:
            self.recent.learn(text)
        # Learning vs reading the recent counts (prediction threads; reentrant: blend reads
        # through candidates and probability).
        self._lock = threading.RLock()

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
        """Count one message the user just typed (as the typing log stored it): its n-grams
        only, so a prediction waits at most that long."""
        with self._lock:
            self.recent.learn(text)

    def _scores(self, words: list[str], context: tuple[str, ...]) -> list[float]:
        """P_user of each of `words` after `context`, from both models' counts."""
        if self.stored is None:
            evidence = self.recent.evidence(words, context)
        else:
            evidence = self.stored.evidence(words, context)
            if self.recent.words:
                evidence = evidence.plus(self.recent.evidence(words, context), self.recent_boost)
        return witten_bell(evidence).tolist()

    def probability(self, word: str, context: tuple[str, ...]) -> float:
        with self._lock:
            return self._scores([word], context)[0]

    def candidates(self, context: tuple[str, ...], prefix: str, limit: int) -> dict[str, float]:
        with self._lock:
            return self._candidates(context, prefix, limit)

    def _candidates(self, context: tuple[str, ...], prefix: str, limit: int) -> dict[str, float]:
        pool: set[str] = set()
        if self.stored is not None:
            pool.update(self.stored.candidates(context, prefix, limit))
        if self.recent.words:
            pool.update(self.recent.candidates(context, prefix, limit))
        words = sorted(pool)
        scored = dict(zip(words, self._scores(words, context), strict=True))
        return {w: scored[w] for w in heapq.nlargest(limit, words, key=scored.__getitem__)}

    def _knows(self, word: str) -> bool:
        return word in self.recent.unigrams or (
            self.stored is not None and word in self.stored.unigrams
        )

    def blend(
        self, lm: dict[str, float], before: str, at_start: bool, prefix: str, k: int
    ) -> dict[str, float]:
        """As `PhraseModel.blend`, with the mixture of the stored and the recent model."""
        with self._lock:
            if not self.recent.words:  # nothing typed since the job: the stored model's own
                return lm if self.stored is None else self.stored.blend(
                    lm, before, at_start, prefix, k
                )  # fmt: skip
            context = last_tokens(before, at_start)
            user = self._candidates(context, prefix, max(CANDIDATES, k))
            known = [w for w in lm if w not in user and self._knows(w)]
            if known:
                user.update(zip(known, self._scores(known, context), strict=True))
        return mix(lm, user, self.weight)

    def suggest(self, query: Query, draft: Draft, lm: LanguageModel) -> Draft:
        """The draft's words blended with both models' (`blend`), at `weight`."""
        words = self.blend(draft.words, query.window, query.at_start, query.prefix, query.k)
        return draft.blended(words, self.weight)

    def vocabulary(self) -> _Vocabulary:
        """The words of either model count as real: the stored ones' prefixes as made once,
        the recent ones' as they are (kept sorted as they come: nothing to make again after
        each message)."""
        return _Vocabulary(self)


class _Words:
    """Membership in the words of the stored or the recent model."""

    def __init__(self, live: LivePhrases) -> None:
        self._live = live

    def __contains__(self, word: object) -> bool:
        return isinstance(word, str) and self._live._knows(word)

    def __iter__(self) -> Iterator[str]:
        live = self._live
        with live._lock:
            recent = list(live.recent.unigrams)  # a copy: learning goes on meanwhile
        yield from recent
        if live.stored is not None:
            yield from (w for w in live.stored.unigrams if w not in live.recent.unigrams)


class _Vocabulary:
    """The words of the stored and the recent model (a `Vocabulary`)."""

    def __init__(self, live: LivePhrases) -> None:
        self._live = live
        self._stored = live.stored.prefixes() if live.stored is not None else None

    def __contains__(self, word: object) -> bool:
        return isinstance(word, str) and self._live._knows(word)

    def has_prefix(self, part: str) -> bool:
        if self._stored is not None and self._stored.has_prefix(part):
            return True
        return self._live.recent.has_prefix(part)
