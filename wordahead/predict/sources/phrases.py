"""The user's own phrases: a word 3-gram model of the typing log, blended into the predictions.

A 3M-parameter LM fine-tuned for a few hundred steps learns a user's style, but not their
phrases: the names, sign-offs and turns of phrase they repeat. A word n-gram model of their
own text learns those exactly, in a second, and is what classic predictive keyboards (presage,
phone keyboards) rely on. The personalization job builds a `PhraseModel` from the typing log
and stores it with the adapter version; the Predictor serves

    P(word | context) = (1 - weight) * P_LM(word | context) + weight * P_user(word | last 2 tokens)

where P_user is interpolated Witten-Bell over word 3-, 2- and 1-grams of the user's text (words
as `wordahead.predict.words` defines them, punctuation marks and message starts as context tokens).
It is zero for a word the user never typed, so the LM alone carries new words.

In memory the model is a few flat numpy arrays (the daemon keeps it all day): token ids sorted
by text, words first (so the words a prefix narrows are one id range), and one sorted table of
contexts (a 1-token context's key is its id, a 2-token one's (a + 1) * V + b) with the ids and
counts of what followed each, sorted by id. 170,000 n-grams take about 2 MB, not 26 MB of
dicts; the blend scores a context's continuations with a few vectorised operations.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from sys import intern

import numpy as np

from wordahead.predict.lexicon import Lexicon
from wordahead.predict.query import Query
from wordahead.predict.sources.base import Draft, LanguageModel, WordSet
from wordahead.predict.sources.phrase_file import ARRAYS, PhraseError, StoredCounts, decode, encode
from wordahead.predict.words import WORD_RE

START = "<s>"  # the start of a message: the context of its first word
# The user model's share of the blend, set on the users' held-out history: with the base model
# (docs/evaluation.md), and with an adapter trained on the same text, which already moved the
# model towards the user's words (docs/results.md, "Personalization II").
DEFAULT_WEIGHT = 0.4
ADAPTED_WEIGHT = 0.2
# The best share differs by user: the job tries these steps either side of the default on its
# held-out text and keeps the share that typed it best.
SHARE_STEP = 0.1
ORDER = 3  # 4-grams were no better on the users' held-out history (docs/evaluation.md)
MAX_NGRAMS = 400_000  # stored 2- and 3-grams; beyond that the rarest 3-grams, then 2-grams go
CONTEXT_CHARS = 200  # text before the word that is tokenized for the n-gram context
_TAIL_CHARS = 64  # usually enough text for the last two tokens (CONTEXT_CHARS when not)
CANDIDATES = 12  # user-model words considered per prediction
LM_WORDS = 8  # the model's words the blend reweighs: one beyond the k-th may overtake
_SCAN_LIMIT = 4000  # 1-gram candidates scanned for a prefix (sorted vocabulary range)
_TOKEN_RE = re.compile(rf"{WORD_RE.pattern}|\n|[^\w\s]")


def blend_weight(adapted: bool) -> float:
    """The phrases' share of the blend, served with a trained adapter or the base model."""
    return ADAPTED_WEIGHT if adapted else DEFAULT_WEIGHT


def blend_weights(adapted: bool) -> tuple[float, ...]:
    """The shares a job tries for one user: the default first, then one step either side."""
    w = blend_weight(adapted)
    return (w, round(w - SHARE_STEP, 6), round(w + SHARE_STEP, 6))


def mix(lm: dict[str, float], user: dict[str, float], weight: float) -> dict[str, float]:
    """(1 - weight) * P_LM + weight * P_user over the words either scored."""
    out = {w: (1.0 - weight) * p for w, p in lm.items()}
    for w, p in user.items():
        out[w] = out.get(w, 0.0) + weight * p
    return out


def tokens(text: str, at_start: bool = True) -> list[str]:
    """Words and punctuation marks of `text` in order; a newline (and the start of the text,
    when `at_start`) starts a new message."""
    out = [START] if at_start else []
    for m in _TOKEN_RE.finditer(text):
        tok = intern(m.group(0))
        if tok == "\n":
            if not out or out[-1] != START:
                out.append(START)
        else:
            out.append(tok)
    return out


def last_tokens(before: str, at_start: bool) -> tuple[str, ...]:
    """The last ORDER - 1 tokens of the text `before` a word (`at_start`: it is the whole text)
    as the n-gram context: those of its last CONTEXT_CHARS characters."""
    if len(before) > _TAIL_CHARS:
        # Tokens never span whitespace: after the first whitespace of a shorter tail they are
        # the same as in the longer one.
        tail = before[-_TAIL_CHARS:]
        cut = re.search(r"\s", tail)
        if cut is not None:
            toks = tokens(tail[cut.start() :], at_start=False)
            if len(toks) >= ORDER:
                return tuple(toks[1 - ORDER :])
    whole = at_start and len(before) <= CONTEXT_CHARS
    return tuple(tokens(before[-CONTEXT_CHARS:], at_start=whole)[1 - ORDER :])


def _is_word(token: str) -> bool:
    return token != START and WORD_RE.fullmatch(token) is not None


class PhraseCounts:
    """N-gram counts while learning (dicts): what the nightly job fills, then `freeze`s."""

    def __init__(self) -> None:
        self.unigrams: Counter[str] = Counter()  # words only
        self.follow: dict[tuple[str, ...], Counter[str]] = {}  # context -> next word

    def learn(self, text: str) -> None:
        """Count the n-grams of one message (or several, separated by newlines)."""
        toks = tokens(text)
        for i, tok in enumerate(toks):
            if not _is_word(tok):
                continue
            self.unigrams[tok] += 1
            for n in range(1, ORDER):
                if i - n >= 0:
                    ctx = tuple(toks[i - n : i])
                    self.follow.setdefault(ctx, Counter())[tok] += 1

    @property
    def ngrams(self) -> int:
        return sum(len(c) for c in self.follow.values())

    def prune(self, max_ngrams: int) -> None:
        """Keep at most `max_ngrams` 2- and 3-grams: drop count-1 3-grams, then count-1
        2-grams, then the rarest of what is left (a bounded file and daemon memory)."""
        for order in range(ORDER - 1, 0, -1):
            if self.ngrams <= max_ngrams:
                break
            for ctx in [c for c in self.follow if len(c) == order]:
                kept = Counter({w: n for w, n in self.follow[ctx].items() if n > 1})
                if kept:
                    self.follow[ctx] = kept
                else:
                    del self.follow[ctx]
        if self.ngrams > max_ngrams:
            ranked = sorted(
                ((n, len(ctx), ctx, w) for ctx, c in self.follow.items() for w, n in c.items()),
                reverse=True,
            )[:max_ngrams]
            self.follow = {}
            for n, _, ctx, w in ranked:
                self.follow.setdefault(ctx, Counter())[w] = n

    def freeze(self, weight: float = DEFAULT_WEIGHT) -> PhraseModel:
        """The compact model of these counts."""
        words = sorted(w for w, n in self.unigrams.items() if n > 0)
        others = sorted({t for ctx in self.follow for t in ctx} - set(words))
        vocab = words + others
        ids = {t: i for i, t in enumerate(vocab)}
        counts = np.zeros(len(vocab), dtype=np.int64)
        counts[: len(words)] = [self.unigrams[w] for w in words]
        size = len(vocab)
        table = sorted(
            (_key([ids[t] for t in ctx], size), sorted((ids[w], n) for w, n in nxt.items()))
            for ctx, nxt in self.follow.items()
            if nxt
        )
        keys = np.array([k for k, _ in table], dtype=np.int64)
        lengths = np.array([len(nxt) for _, nxt in table], dtype=np.int64)
        starts = np.zeros(len(table) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        pairs = [pair for _, nxt in table for pair in nxt]
        next_ids = np.array([i for i, _ in pairs], dtype=np.int32)
        next_counts = np.array([n for _, n in pairs], dtype=np.int32)
        totals = np.add.reduceat(next_counts.astype(np.int64), starts[:-1]) if pairs else keys * 0
        return PhraseModel(
            vocab, len(words), counts, keys, starts, totals, next_ids, next_counts, weight
        )


@dataclass
class Level:
    """One context order's counts: how often each word followed the context, how often the
    context was followed at all, and by how many different tokens."""

    seen: np.ndarray
    total: float  # counts may be weighted (Evidence.plus)
    types: int


@dataclass
class Evidence:
    """The counts P_user of some words is made of: each word's count, the count of all
    words, and the context levels (the last 1, then 2 tokens, as far as they were seen)."""

    counts: np.ndarray
    n: float
    levels: list[Level]

    def plus(self, other: Evidence, boost: float) -> Evidence:
        """These counts with `other`'s added `boost` times (the distinct continuations are
        added once: the union of the two sets, counted twice where they meet)."""
        levels = []
        for i in range(max(len(self.levels), len(other.levels))):
            a = self.levels[i] if i < len(self.levels) else None
            b = other.levels[i] if i < len(other.levels) else None
            if a is None or b is None:
                one = a or b
                assert one is not None
                scale = 1.0 if a is not None else boost
                levels.append(Level(one.seen * scale, one.total * scale, one.types))
            else:
                levels.append(Level(a.seen + boost * b.seen, a.total + boost * b.total,
                                    a.types + b.types))  # fmt: skip
        return Evidence(self.counts + boost * other.counts, self.n + boost * other.n, levels)


def witten_bell(evidence: Evidence) -> np.ndarray:
    """Interpolated Witten-Bell: the 1-gram estimate, refined by each context level in turn."""
    if not evidence.n:
        return np.zeros(len(evidence.counts))
    p = evidence.counts / evidence.n
    for level in evidence.levels:
        p = (level.seen + level.types * p) / (level.total + level.types)
    return p


def _key(ctx_ids: list[int], size: int) -> int:
    """A context's key: a token id, or (a + 1) * size + b for two."""
    return ctx_ids[0] if len(ctx_ids) == 1 else (ctx_ids[0] + 1) * size + ctx_ids[1]


class _Unigrams(Mapping[str, int]):
    """word -> times typed, over the model's arrays (membership is what the lexicon asks)."""

    def __init__(self, model: PhraseModel) -> None:
        self._model = model

    def __getitem__(self, word: str) -> int:
        i = self._model.ids.get(word)
        if i is None or i >= self._model.n_words:
            raise KeyError(word)
        return int(self._model.counts[i])

    def __contains__(self, word: object) -> bool:
        i = self._model.ids.get(word) if isinstance(word, str) else None
        return i is not None and i < self._model.n_words

    def __iter__(self) -> Iterator[str]:
        return iter(self._model.vocab[: self._model.n_words])

    def __len__(self) -> int:
        return self._model.n_words


class PhraseModel:
    """Word 1-, 2- and 3-gram counts of the user's text in flat arrays, and Witten-Bell
    probabilities. Read-only once built (`from_texts`, `load`); `learn` rebuilds it.
    A suggestion source (`wordahead.predict.sources.base`): it blends its words in."""

    lm_words = LM_WORDS

    def __init__(
        self,
        vocab: list[str] | None = None,
        n_words: int = 0,
        counts: np.ndarray | None = None,
        keys: np.ndarray | None = None,
        starts: np.ndarray | None = None,
        totals: np.ndarray | None = None,
        next_ids: np.ndarray | None = None,
        next_counts: np.ndarray | None = None,
        weight: float = DEFAULT_WEIGHT,
    ) -> None:
        self.vocab = [intern(t) for t in vocab or []]
        self.n_words = n_words  # vocab[:n_words] are words, sorted; then other tokens, sorted
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        empty = np.zeros(0, dtype=np.int64)
        self.counts = counts if counts is not None else empty
        self.keys = keys if keys is not None else empty
        self.starts = starts if starts is not None else np.zeros(1, dtype=np.int64)
        self.totals = totals if totals is not None else empty
        self.next_ids = next_ids if next_ids is not None else empty.astype(np.int32)
        self.next_counts = next_counts if next_counts is not None else empty.astype(np.int32)
        self.weight = weight
        self._n = int(self.counts.sum())
        order = np.argsort(-self.counts[:n_words], kind="stable")[:CANDIDATES]
        self._top = order.astype(np.int64)  # the likeliest words, for an empty prefix
        self._prefixes: Lexicon | None = None  # the words, for prefix checks (when asked)

    # --- learning --------------------------------------------------------------------------
    @classmethod
    def from_texts(
        cls, texts: Iterable[str], weight: float = DEFAULT_WEIGHT, max_ngrams: int = MAX_NGRAMS
    ) -> PhraseModel:
        counts = PhraseCounts()
        for text in texts:
            counts.learn(text)
        counts.prune(max_ngrams)
        return counts.freeze(weight)

    def thaw(self) -> PhraseCounts:
        """These counts as dicts again (to learn more, or to inspect)."""
        out = PhraseCounts()
        out.unigrams = Counter({w: int(self.counts[i]) for i, w in enumerate(self.unigrams)})
        out.follow = {ctx: Counter(nxt) for ctx, nxt in self.follow.items()}
        return out

    def learn(self, text: str) -> None:
        """Count the n-grams of `text` too (rebuilds the arrays: for many texts, from_texts)."""
        counts = self.thaw()
        counts.learn(text)
        self._become(counts.freeze(self.weight))

    def prune(self, max_ngrams: int) -> None:
        """Keep at most `max_ngrams` 2- and 3-grams (see PhraseCounts.prune)."""
        counts = self.thaw()
        counts.prune(max_ngrams)
        self._become(counts.freeze(self.weight))

    def _become(self, other: PhraseModel) -> None:
        self.__dict__.update(other.__dict__)

    @property
    def unigrams(self) -> Mapping[str, int]:
        """word -> times typed. A view made on each use: kept as an attribute it would make a
        reference cycle, and a daemon would hold every replaced model until the next full
        garbage collection."""
        return _Unigrams(self)

    @property
    def words(self) -> int:
        """Words learned (the size of the user's text)."""
        return self._n

    @property
    def ngrams(self) -> int:
        return len(self.next_ids)

    @property
    def follow(self) -> dict[tuple[str, ...], dict[str, int]]:
        """Context -> {next word: count}, as dicts (for inspection; built on each call)."""
        size = len(self.vocab)
        out: dict[tuple[str, ...], dict[str, int]] = {}
        for i, key in enumerate(self.keys.tolist()):
            ctx = (key,) if key < size else (key // size - 1, key % size)
            s, e = int(self.starts[i]), int(self.starts[i + 1])
            out[tuple(self.vocab[t] for t in ctx)] = {
                self.vocab[t]: int(n)
                for t, n in zip(self.next_ids[s:e].tolist(), self.next_counts[s:e].tolist())
            }
        return out

    # --- probabilities ---------------------------------------------------------------------
    def _contexts(self, context: tuple[str, ...]) -> list[int]:
        """Rows of the context table for the last 1, then 2 tokens, as far as they were seen
        (an unseen shorter context stops the back-off chain there)."""
        rows: list[int] = []
        size = len(self.vocab)
        for n in range(1, ORDER):
            if len(context) < n:
                break
            ids = [self.ids.get(t) for t in context[-n:]]
            if None in ids:
                break
            key = _key(ids, size)  # type: ignore[arg-type]
            row = int(np.searchsorted(self.keys, key))
            if row >= len(self.keys) or self.keys[row] != key:
                break
            rows.append(row)
        return rows

    def _evidence(self, word_ids: np.ndarray, rows: list[int]) -> Evidence:
        """The counts behind P_user of each word id (-1: not a word here) after the context
        rows `rows`."""
        known = word_ids >= 0
        ids = np.where(known, word_ids, 0)
        levels = []
        for row in rows:
            s, e = int(self.starts[row]), int(self.starts[row + 1])
            nxt = self.next_ids[s:e]
            at = np.minimum(np.searchsorted(nxt, ids), e - s - 1)
            seen = np.where(known & (nxt[at] == ids), self.next_counts[s:e][at], 0)
            levels.append(Level(seen, int(self.totals[row]), e - s))
        return Evidence(np.where(known, self.counts[ids], 0), self._n, levels)

    def evidence(self, words: list[str], context: tuple[str, ...]) -> Evidence:
        """The counts behind P_user(word | context) for each of `words`: what `witten_bell`
        turns into probabilities, and what can be added to another model's."""
        if not self.n_words:  # nothing typed: no count to index
            return Evidence(np.zeros(len(words), dtype=np.int64), 0, [])
        ids = [self.ids.get(w, -1) for w in words]
        word_ids = np.array([i if i < self.n_words else -1 for i in ids], dtype=np.int64)
        return self._evidence(word_ids, self._contexts(context))

    def _scores(self, word_ids: np.ndarray, rows: list[int]) -> np.ndarray:
        """P_user of each word id after the contexts `rows` (vectorised Witten-Bell)."""
        return witten_bell(self._evidence(word_ids, rows))

    def probability(self, word: str, context: tuple[str, ...]) -> float:
        """P_user(word | the last two tokens of `context`), interpolated Witten-Bell."""
        i = self.ids.get(word)
        if not self._n or i is None or i >= self.n_words:
            return 0.0
        return float(self._scores(np.array([i]), self._contexts(context))[0])

    def _word_range(self, prefix: str) -> tuple[int, int]:
        words, n = self.vocab, self.n_words  # the words are vocab[:n], sorted
        lo = bisect.bisect_left(words, prefix, 0, n)
        return lo, bisect.bisect_left(words, prefix + "\U0010ffff", lo, n)

    def candidates(self, context: tuple[str, ...], prefix: str, limit: int = CANDIDATES) -> dict:
        """Up to `limit` words starting with `prefix` the user model finds most likely after
        `context`, with P_user."""
        if not self._n:
            return {}
        rows = self._contexts(context)
        lo, hi = self._word_range(prefix)
        pool = [self._top if not prefix else self._top_in(lo, min(hi, lo + _SCAN_LIMIT), limit)]
        for row in rows:
            s, e = int(self.starts[row]), int(self.starts[row + 1])
            nxt = self.next_ids[s:e]
            a, b = np.searchsorted(nxt, [lo, hi])
            pool.append(nxt[a:b].astype(np.int64))
        ids = np.unique(np.concatenate(pool))
        scores = self._scores(ids, rows)
        best = np.argsort(-scores, kind="stable")[:limit]
        return {self.vocab[i]: float(scores[j]) for i, j in zip(ids[best].tolist(), best.tolist())}

    def _top_in(self, lo: int, hi: int, limit: int) -> np.ndarray:
        """The `limit` most typed words with ids in [lo, hi)."""
        order = np.argsort(-self.counts[lo:hi], kind="stable")[:limit]
        return order.astype(np.int64) + lo

    def blend(
        self, lm: dict[str, float], before: str, at_start: bool, prefix: str, k: int
    ) -> dict[str, float]:
        """The LM's word probabilities `lm` (words starting with `prefix`) blended with the
        user model's after the text `before` the word (`at_start`: it is the whole text).
        Only the user model's top continuations and the LM's words are scored."""
        if not self._n or self.weight <= 0:
            return lm
        context = last_tokens(before, at_start)
        user = self.candidates(context, prefix, max(CANDIDATES, k))
        known = [w for w in lm if w not in user and w in self.unigrams]
        if known:
            ids = np.array([self.ids[w] for w in known])
            scores = self._scores(ids, self._contexts(context)).tolist()
            user.update(zip(known, scores, strict=True))
        return mix(lm, user, self.weight)

    # --- as a suggestion source ------------------------------------------------------------
    def suggest(self, query: Query, draft: Draft, lm: LanguageModel) -> Draft:
        """The draft's words blended with the user model's (`blend`), at `weight`."""
        words = self.blend(draft.words, query.window, query.at_start, query.prefix, query.k)
        return draft.blended(words, self.weight)

    def prefixes(self) -> Lexicon:
        """The words as a Lexicon, for prefix checks (made once, on first use)."""
        if self._prefixes is None:
            self._prefixes = Lexicon(self.unigrams)
        return self._prefixes

    def vocabulary(self) -> WordSet:
        """The words the user typed count as real."""
        return WordSet(self.unigrams, (self.prefixes(),))

    # --- files -----------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        arrays = {name: getattr(self, name) for name in ARRAYS}
        return encode(self.vocab, self.n_words, arrays, self.weight)

    @classmethod
    def from_bytes(cls, raw: bytes) -> PhraseModel:
        """The model stored in `raw`; PhraseError for anything damaged, whatever the damage."""
        try:
            stored = decode(raw)
            if isinstance(stored, StoredCounts):  # a version-1 file
                counts = PhraseCounts()
                counts.unigrams, counts.follow = stored.unigrams, stored.follow
                return counts.freeze(stored.weight)
            return cls(stored.vocab, stored.n_words, weight=stored.weight, **stored.arrays)
        except PhraseError:
            raise
        except Exception as exc:  # noqa: BLE001 - deep nesting, huge numbers, odd types
            raise PhraseError(f"damaged phrase file ({type(exc).__name__}: {exc})") from None

    @classmethod
    def load(cls, path: str | Path) -> PhraseModel:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise PhraseError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            return cls.from_bytes(raw)
        except PhraseError as exc:
            raise PhraseError(f"{path}: {exc}") from None
