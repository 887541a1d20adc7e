"""The seam between the predictor and its suggestion sources.

The predictor finds the language model's most probable words for a query, then hands them to
each source it serves, in order; each source returns what it makes of them (a `Draft`). A
source may reweigh or add words (the user's phrase counts blend theirs in), add candidates of
other kinds (a correction that replaces the typed word), offer suggestions beside the k places
(a phrase shown as ghost text), and hold words that count as real (the user's own). To learn
more than the query says, it asks the `LanguageModel` it is given: the same adapter, context
and key/value cache as the prediction, so asking about the same text, or text that continues
it, costs only the new tokens.

To add a source:

1. write a class with `lm_words`, `suggest` and `vocabulary` (see `SuggestionSource`) in a
   module of its own under `wordahead/predict/sources/`;
2. add it to `assemble` in `wordahead/predict/sources/__init__.py`, where its place in the
   order is decided (a source sees the drafts of those before it).

Nothing else in the predictor names a source; `Predictor.load_adapter(..., sources=[...])`
serves any list of sources (tests do so with doubles).
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from wordahead.predict.lexicon import Lexicon
from wordahead.predict.query import Query
from wordahead.types import Candidate


@dataclass(frozen=True)
class Draft:
    """The suggestions for one query so far: the model's, as the sources before changed them."""

    words: dict[str, float]  # whole words (kind "word") and their probabilities
    # Candidates of other kinds (a correction), ranked with the words for the k places.
    others: tuple[Candidate, ...] = ()
    # Offered beside the k places, not in them (a phrase shown as ghost text).
    beside: tuple[Candidate, ...] = ()
    # The share of the probability the model's own estimates keep: a blend that gives a
    # source `weight` of it scales the model's punctuation marks by 1 - weight too.
    lm_share: float = 1.0

    def blended(self, words: dict[str, float], weight: float) -> Draft:
        """This draft with `words`, a blend that gave a source `weight` of the probability."""
        return replace(self, words=words, lm_share=self.lm_share * (1.0 - weight))


class LanguageModel(Protocol):
    """The language model as a source sees it during one prediction.

    `before` is the text before the word the model is asked about: None for the query's own
    (`Query.before`), else another text, usually the query's continued (`query.before +
    "word "`: what follows a word of a phrase) or changed near its end (a repaired word). A
    text ending in a space asks about the next word, as in a predict call. Key/values of the
    tokens it shares with the query's context are reused, so a continuation costs its new
    tokens only.
    """

    def words(self, prefix: str, k: int, before: str | None = None) -> dict[str, float]:
        """The k most probable real words starting with `prefix` after `before`, with
        P(word | before): the search the predictor runs for the query itself."""
        ...

    def probability(self, word: str, before: str | None = None) -> float:
        """P(`word`, then the end of the word | before), spelled exactly as given (0.0 when
        the search finds it too unlikely to finish within its depth)."""
        ...

    def near_words(
        self, spellings: dict[str, float], k: int, floor: float = 0.0, before: str | None = None
    ) -> dict[str, float]:
        """The k most probable real words starting with any of `spellings` ({spelling:
        weight}) after `before`, each scored weight * P(word | before) (its best spelling's),
        those above `floor` only: one search for all the spellings (the typo source asks
        about the real words a mistyped part may have been meant as)."""
        ...

    def is_real(self, word: str) -> bool:
        """A word the model's lexicon or a source's vocabulary holds (any word without a
        lexicon)."""
        ...


class Vocabulary(Protocol):
    """Words a source holds that count as real (the user's own), beside the model's lexicon."""

    def __contains__(self, word: object) -> bool:
        """Whether it holds `word`, spelled as it is (the predictor also asks the lower-case
        and capitalised forms)."""
        ...

    def has_prefix(self, part: str) -> bool:
        """Whether a word it holds starts with `part`, case-insensitively. Asked for every
        spelling the search grows: make it a lookup in a snapshot (a `Lexicon`)."""
        ...


class SuggestionSource(Protocol):
    """Something besides the language model that decides suggestions."""

    @property
    def lm_words(self) -> int:
        """How many of the model's words it wants to see (the predictor finds at least this
        many, and k): a blend lets a word beyond the k-th overtake; 0 for none beyond k."""
        ...

    def suggest(self, query: Query, draft: Draft, lm: LanguageModel) -> Draft:
        """What this source makes of `draft` for `query`. Runs on the prediction threads,
        possibly several at once: read shared state under a lock of the source's own."""
        ...

    def vocabulary(self) -> Vocabulary | None:
        """The words it makes real (None: none). Asked when the source is served and again
        after `Predictor.user_phrases_changed`, so a snapshot may be taken then."""
        ...


@dataclass(frozen=True)
class WordSet:
    """A `Vocabulary`: membership in `words` (a live view), prefixes in `prefixes` (snapshots)."""

    words: Container[str]
    prefixes: Sequence[Lexicon] = field(default_factory=tuple)

    def __contains__(self, word: object) -> bool:
        return word in self.words

    def has_prefix(self, part: str) -> bool:
        return any(lexicon.has_prefix(part) for lexicon in self.prefixes)
