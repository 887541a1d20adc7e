"""Typo correction: suggestions that survive a slip of the finger (a noisy channel).

What was typed may not be what was meant: `recieve`, `hwllo`, `teh`. For the part of a word
typed so far, the real-word spellings it may have been meant as are found with their slip cost
(wordahead.predict.slips, over the model's lexicon and the user's own words), the language
model scores their completions in the context, all in one search (`LanguageModel.near_words`),
and a correction's score is P(word | context) * P(the slips): the noisy channel (Ouyang et al.
2017; Fowler et al., CHI 2015). Rules that keep it out of the way:

- a typed part that real words start with keeps its place: it is corrected only when its
  likeliest word is unlikely here (`weak_literal`), and a correction of it pays `keep_literal`
  more (so "form" becomes "from" only where "from" is far more likely);
- the user's own words are never corrected away: a typed part that starts one is left alone;
- only from `min_chars` letters on (two letters have too many neighbours to tell apart).

Context repair: when the word before the cursor is not a real word and its correction is
confident (`repair_ratio` times as likely as the next one), the next words are predicted as if
the correction had been typed (`teh ` -> what follows `the `).

Corrections are candidates of kind "correction" with `replaces`: how many characters before
the cursor (the typed part of the word) they take the place of.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from wordahead.predict.layouts import DEFAULT_LAYOUT, Layout, layout
from wordahead.predict.lexicon import Lexicon
from wordahead.predict.query import Query
from wordahead.predict.slips import OneSlip, SlipCosts, Spellings, near_prefixes
from wordahead.predict.sources.base import Draft, LanguageModel, SuggestionSource, Vocabulary
from wordahead.predict.words import WORD_RE
from wordahead.types import Candidate

OFF = ("off", "0", "no", "false")
CORRECTION = "correction"  # the candidate kind
TWO_SLIPS = 5  # letters typed before two slips are looked for (when one finds nothing)
REPAIR_LOOKBACK = 80  # characters before the word in which the word to repair is looked for


@dataclass(frozen=True)
class TypoSettings:
    """How corrections are made (the defaults were chosen on the public users' dev lines)."""

    enabled: bool = True
    layout: str = DEFAULT_LAYOUT
    costs: SlipCosts = field(default_factory=SlipCosts)
    keep_literal: float = 2.0  # extra cost (nats) of correcting a part real words start with
    keep_word: float = 2.0  # ... and more when it is a whole real word already
    spellings: int = 32  # corrected spellings (the cheapest) the model is asked about at once
    min_chars: int = 3  # letters typed before a part real words start with is corrected
    # ... and only when its likeliest word is less likely than this here: most keystrokes of
    # clean typing then cost nothing more.
    weak_literal: float = 1e-3
    repair: bool = True  # predict after a confidently corrected word as if it were corrected
    repair_ratio: float = 3.0  # the correction this many times as likely as the next candidate

    @classmethod
    def from_env(cls) -> TypoSettings:
        """The settings `keyboard serve` and `keyboard predict` use: KEYBOARD_TYPOS=off turns
        corrections off, KEYBOARD_LAYOUT names the keyboard (qwerty, qwertz, azerty, dvorak)."""
        enabled = os.environ.get("KEYBOARD_TYPOS", "on").strip().lower() not in OFF
        name = os.environ.get("KEYBOARD_LAYOUT", "").strip() or DEFAULT_LAYOUT
        layout(name)  # an unknown layout is an error at start, not at the first keystroke
        return cls(enabled=enabled, layout=name.lower())


class TypoCorrection:
    """The settings and keyboard of the typo source, made once per predictor; `source` makes
    the source served with one set of user words."""

    def __init__(self, lexicon: Lexicon, settings: TypoSettings | None = None) -> None:
        self.lexicon = lexicon
        self.settings = settings or TypoSettings()
        self.keys: Layout = layout(self.settings.layout)

    def source(self, user: SuggestionSource | None = None) -> TypoSource:
        """The typo source for the user's words held by `user` (their phrases; None: none)."""
        return TypoSource(self, user)

    def weights(
        self,
        typed: str,
        search: OneSlip,
        user: Vocabulary | None,
        literal_best: float,
        is_word: Callable[[str], bool] = lambda word: False,
    ) -> dict[str, float]:
        """{lower-cased spelling: weight} for the real-word spellings `typed` may have been
        meant as: exp(-slip cost), less when `typed` itself starts a real word (whose likeliest
        word has probability `literal_best`), less again when it is a real word (`is_word`); empty
        when `typed` is not to be corrected."""
        s = self.settings
        if len(typed) < 2 or not typed.isalpha():
            return {}
        lower = typed.lower()
        if user is not None and user.has_prefix(lower):
            return {}  # the user's own word (or the start of one): never corrected away
        literal = search.spell.has_prefix(lower)
        if literal and (len(typed) < s.min_chars or literal_best >= s.weak_literal):
            return {}
        found = search.near(lower, s.spellings)
        if not found and not literal and s.costs.max_slips > 1 and len(typed) >= TWO_SLIPS:
            found = near_prefixes(lower, search.spell.sets, self.keys, s.costs, s.spellings)
        extra = s.keep_literal if literal else 0.0
        if literal and is_word(lower):
            extra += s.keep_word
        return {spelling: math.exp(-(cost + extra)) for spelling, cost in found.items()}


class TypoSource:
    """The typo source (a `SuggestionSource`): corrections of the typed part of the word, and
    the context repaired before a next word."""

    lm_words = 0

    def __init__(self, corrector: TypoCorrection, user: SuggestionSource | None) -> None:
        self.corrector = corrector
        self.user = user
        self._lock = threading.Lock()  # the walk's memo is shared by the prediction threads
        self._user_words: Vocabulary | None = None
        self._search = self._searcher()

    def _searcher(self) -> OneSlip:
        words: list[Spellings] = [self.corrector.lexicon]
        words += getattr(self._user_words, "prefixes", ())  # a WordSet's snapshots
        return OneSlip(words, self.corrector.keys, _one_slip(self.corrector.settings.costs))

    def vocabulary(self) -> Vocabulary | None:
        """None (it makes no word real); asked again when the user's words change, which is
        when their snapshot is taken again here."""
        with self._lock:
            self._user_words = self.user.vocabulary() if self.user is not None else None
            self._search = self._searcher()
        return None

    def suggest(self, query: Query, draft: Draft, lm: LanguageModel) -> Draft:
        if query.prefix:
            return self._corrected(query, draft, lm)
        if self.corrector.settings.repair:
            return self._repaired(query, draft, lm)
        return draft

    def _corrections(
        self, typed: str, lm: LanguageModel, k: int, floor: float, best: float, before: str | None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """{word: score} of the corrections of `typed`, and the spellings asked about."""
        with self._lock:
            weights = self.corrector.weights(
                typed, self._search, self._user_words, best, lm.is_real
            )
        if not weights:
            return {}, weights
        found = lm.near_words(weights, k, floor, before)
        return {_cased_like(typed, w): p for w, p in found.items()}, weights

    def _corrected(self, query: Query, draft: Draft, lm: LanguageModel) -> Draft:
        typed, k = query.prefix, query.k
        ranked = sorted(draft.words.values(), reverse=True)
        floor = ranked[k - 1] if len(ranked) >= k else 0.0
        near, _ = self._corrections(typed, lm, k, floor, ranked[0] if ranked else 0.0, None)
        share = draft.lm_share  # what the blends before left the model's own estimates
        others = tuple(
            Candidate(word, share * p, CORRECTION, replaces=len(typed))
            for word, p in near.items()
            if word not in draft.words and WORD_RE.fullmatch(word)
        )
        return replace(draft, others=draft.others + others) if others else draft

    def _repaired(self, query: Query, draft: Draft, lm: LanguageModel) -> Draft:
        """The next words as if the last word, not a real one, had been typed corrected."""
        before = query.window
        last = None
        for m in WORD_RE.finditer(before, max(0, len(before) - REPAIR_LOOKBACK)):
            last = m
        if last is None or last.end() != len(before.rstrip(" ")) or len(last.group(0)) < 3:
            return draft
        word = last.group(0)
        if not word.isalpha() or lm.is_real(word):
            return draft
        head = before[: last.start()]
        near, spellings = self._corrections(word, lm, 2, 0.0, 0.0, head)
        # Whole words only: the typed word was finished, so a longer word is no correction.
        whole = [(w, p) for w, p in near.items() if w.lower() in spellings]
        ranked = sorted(whole, key=lambda item: -item[1])
        if not ranked:
            return draft
        runner_up = ranked[1][1] if len(ranked) > 1 else 0.0
        if ranked[0][1] < self.corrector.settings.repair_ratio * runner_up:
            return draft
        fixed = head + ranked[0][0] + before[last.end() :] + query.lead.decode("utf-8")
        words = lm.words("", max(query.k, len(draft.words)), fixed)
        share = draft.lm_share
        return replace(draft, words={w: share * p for w, p in words.items()})


def _one_slip(costs: SlipCosts) -> SlipCosts:
    return replace(costs, max_slips=1) if costs.max_slips > 1 else costs


def _cased_like(typed: str, word: str) -> str:
    if len(typed) > 1 and typed.isupper():
        return word.upper()
    if typed[:1].isupper():
        return word[:1].upper() + word[1:]
    return word
