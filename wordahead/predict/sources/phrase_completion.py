"""Phrase completion ("ghost text"): at most one multi-word continuation of the text.

The phrase is a greedy search over whole words: its first word is the predictor's top word
for the text (the completion of the word being typed, or the next word), and each further
word the predictor's top word for the text with the phrase so far appended. Each step is an
ordinary `predict` on the extended text, so it reuses the key/value cache of the text (only
the new word's tokens run), the user's phrase counts are blended into every word as they are
into the word list, and the next keystrokes along the phrase find their word lists computed.

A phrase's probability is the product of its words' (each already blended with the user's
own n-grams: their greetings, sign-offs and names come back as phrases; inside a word, the
first word's is its share of the words the answer offers). It is offered only when that
score passes a threshold set on the users' history (docs/results.md, "Phrase completion");
the longest phrase of at most `max_words` words that passes is offered. A phrase ends where the model expects punctuation or a line break: the
probability of the next word then drops, so the end of a clause stops it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from wordahead.predict.query import Query
from wordahead.predict.sources.base import Draft, LanguageModel, Vocabulary
from wordahead.predict.sources.phrases import CONTEXT_CHARS, last_tokens
from wordahead.predict.words import split_prefix
from wordahead.types import Candidate, KeyboardError, Prediction

PHRASE_K = 3  # words asked for each step: the word list's own size, so its answers are reused
# Chosen on the users' dev lines (docs/results.md, "Phrase completion"): no setting reached
# the 50% precision aimed at while showing phrases at 1% of word starts; this is the most
# precise one that does. Length-normalised scores did worse.
DEFAULT_MAX_WORDS = 2
DEFAULT_THRESHOLD = 0.1
DEFAULT_NORMALISED = False
DEFAULT_USER_WEIGHT = 0.0
MIN_WORDS = 2  # the current word and at least one more: one word is the word list's job
MAX_WORDS_LIMIT = 8


class WordPredictor(Protocol):
    """What the phrase search needs: the predictor's `predict`."""

    def predict(self, context: str, k: int = 3) -> Prediction: ...


@dataclass(frozen=True)
class PhraseSettings:
    """When a phrase is offered: at most `max_words` words (the current word counts), and
    only while its score passes `threshold`. The score is the phrase's probability, or with
    `normalised` its geometric mean per word (longer phrases are not penalised)."""

    max_words: int = DEFAULT_MAX_WORDS
    threshold: float = DEFAULT_THRESHOLD
    normalised: bool = DEFAULT_NORMALISED
    user_weight: float = DEFAULT_USER_WEIGHT  # the user's phrases' share of each word's score

    def __post_init__(self) -> None:
        if not MIN_WORDS <= self.max_words <= MAX_WORDS_LIMIT:
            raise KeyboardError(
                f"phrase max_words must be {MIN_WORDS} to {MAX_WORDS_LIMIT} (got {self.max_words})"
            )
        if not 0.0 < self.threshold <= 1.0:
            raise KeyboardError(f"phrase threshold must be in (0, 1] (got {self.threshold})")
        if not 0.0 <= self.user_weight <= 1.0:
            raise KeyboardError(f"phrase user_weight must be in [0, 1] (got {self.user_weight})")

    def score(self, probability: float, words: int) -> float:
        return probability ** (1.0 / words) if self.normalised else probability

    def floor(self) -> float:
        """The lowest product of word scores a phrase the settings accept can have: the
        search stops below it."""
        return self.threshold**self.max_words if self.normalised else self.threshold


@dataclass(frozen=True)
class Phrase:
    """A phrase to show after the cursor: `text` is what accepting it inserts (the rest of
    the word being typed, then the next words, each after one space)."""

    text: str
    words: tuple[str, ...]  # whole words, the first one completing the typed prefix
    prefix: str  # the part of the first word already typed
    score: float  # what passed the threshold (see PhraseSettings)
    probability: float

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "words": list(self.words),
            "prefix": self.prefix,
            "score": round(self.score, 6),
            "probability": round(self.probability, 6),
        }


@dataclass(frozen=True)
class Chain:
    """The greedy search's words after a text: each word's probability (blended with the
    user's phrases; the first one's given the typed prefix) and its probability under the
    user's phrases alone (0 without them)."""

    prefix: str
    words: tuple[str, ...]
    probabilities: tuple[float, ...]
    user: tuple[float, ...] = ()

    def cumulative(self, user_weight: float = 0.0) -> list[float]:
        out: list[float] = []
        p = 1.0
        user = self.user or (0.0,) * len(self.probabilities)
        for q, u in zip(self.probabilities, user, strict=True):
            p *= (1.0 - user_weight) * q + user_weight * u
            out.append(p)
        return out


UserProbability = Callable[[str, str], float]  # (word, text before it) -> P_user(word | text)


def top_word(prediction: Prediction) -> tuple[str, float] | None:
    """The most likely whole word of an answer and its share of the answer's words (given the
    typed prefix, its probability among the words that complete it), or None."""
    scores = [(c.word, c.score) for c in prediction.candidates if c.kind == "word" and c.score > 0]
    if not scores:
        return None
    word, p = scores[0]
    if prediction.prefix:
        p /= sum(s for _, s in scores)
    return word, p


def word_chain(
    predictor: WordPredictor,
    context: str,
    max_words: int,
    floor: float,
    stop: Callable[[], bool] | None = None,
    user: UserProbability | None = None,
) -> Chain:
    """Up to `max_words` words continuing `context`, each the predictor's top word after the
    ones before it; stops once the product of their probabilities falls below `floor` (that
    word is kept, so a caller sees where it fell), or when `stop()` says so. `user` gives each
    word's probability under the user's own phrases; the stopping product takes the larger of
    the two for each word, so it bounds the score under any user weight."""
    prefix = split_prefix(context)[1]
    base = context[: len(context) - len(prefix)]
    words: list[str] = []
    probabilities: list[float] = []
    user_ps: list[float] = []
    text = context
    product = 1.0
    while len(words) < max_words:
        if words and stop is not None and stop():
            break
        best = top_word(predictor.predict(text, PHRASE_K))
        if best is None:
            break
        word, p = best
        before = base if not words else text
        words.append(word)
        probabilities.append(p)
        u = user(word, before) if user is not None else 0.0
        if user is not None:
            user_ps.append(u)
        product *= max(p, u)
        if product < floor:
            break
        # The first word replaces the typed prefix; each word is followed by one space.
        text = before + word + " "
    return Chain(prefix, tuple(words), tuple(probabilities), tuple(user_ps))


def choose(chain: Chain, settings: PhraseSettings) -> Phrase | None:
    """The longest phrase of the chain (at least MIN_WORDS, at most `max_words` words) whose
    score passes the threshold, or None."""
    cumulative = chain.cumulative(settings.user_weight)
    for n in range(min(settings.max_words, len(chain.words)), MIN_WORDS - 1, -1):
        score = settings.score(cumulative[n - 1], n)
        if score >= settings.threshold:
            return phrase_of(chain.words[:n], chain.prefix, score, cumulative[n - 1])
    return None


def phrase_of(words: Sequence[str], prefix: str, score: float, probability: float) -> Phrase:
    first = words[0]
    rest = first[len(prefix) :] if first.startswith(prefix) else first
    text = rest + "".join(" " + w for w in words[1:])
    return Phrase(text, tuple(words), prefix, score, probability)


class PhraseCompleter:
    """The phrase for a text, under `settings`: what the daemon answers and the simulated
    typist accepts."""

    def __init__(self, predictor: WordPredictor, settings: PhraseSettings | None = None) -> None:
        self.predictor = predictor
        self.settings = settings or PhraseSettings()

    def chain(self, context: str, stop: Callable[[], bool] | None = None) -> Chain:
        s = self.settings
        user = user_probability(self.predictor) if s.user_weight > 0 else None
        return word_chain(self.predictor, context, s.max_words, s.floor(), stop, user)

    def complete(self, context: str, stop: Callable[[], bool] | None = None) -> Phrase | None:
        """The phrase for `context`, or None (none passes; or `stop()` said the text has
        changed since it was asked)."""
        chain = self.chain(context, stop)
        if stop is not None and stop():
            return None
        return choose(chain, self.settings)


def user_probability(predictor: object) -> UserProbability | None:
    """P_user(word | text before it) under the phrases `predictor` serves (None: none)."""
    phrases = getattr(predictor, "phrases", None)
    if phrases is None:
        return None

    def probability(word: str, before: str) -> float:
        at_start = len(before) < CONTEXT_CHARS  # the whole text: its first word follows START
        return float(phrases.probability(word, last_tokens(before, at_start)))

    return probability


class PhraseSource:
    """Phrase completion behind the predictor's source seam: the phrase for the query, offered
    beside the k words (`Prediction.beside`, kind "phrase", its text what accepting inserts).
    Its first word is the top word of the draft it is given (the sources before it blended);
    each next word the model's top word after the phrase so far (`LanguageModel.words` on the
    continued text: only the new tokens run). Every prediction it is served with computes a
    phrase, so the daemon serves it apart (its `phrase` method, after the words are answered);
    this is for callers that want both in one call."""

    lm_words = 0

    def __init__(self, settings: PhraseSettings | None = None) -> None:
        self.settings = settings or PhraseSettings()

    def vocabulary(self) -> Vocabulary | None:
        return None

    def suggest(self, query: Query, draft: Draft, lm: LanguageModel) -> Draft:
        ranked = sorted(draft.words.items(), key=lambda item: -item[1])[:PHRASE_K]
        if not ranked or ranked[0][1] <= 0:
            return draft
        first, p = ranked[0]
        if query.prefix:
            p /= sum(score for _, score in ranked)
        words, probabilities = [first], [p]
        before = query.before + first + " "
        product, floor = p, self.settings.floor()
        while len(words) < self.settings.max_words and product >= floor:
            found = sorted(lm.words("", PHRASE_K, before).items(), key=lambda item: -item[1])
            if not found or found[0][1] <= 0:
                break
            word, q = found[0]
            words.append(word)
            probabilities.append(q)
            product *= q
            before += word + " "
        phrase = choose(Chain(query.prefix, tuple(words), tuple(probabilities)), self.settings)
        if phrase is None:
            return draft
        shown = Candidate(phrase.text, phrase.score, "phrase")
        return replace(draft, beside=(*draft.beside, shown))
