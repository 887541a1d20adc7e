"""The user's own phrases: a word 3-gram model of the typing log, blended into the predictions.

A 3M-parameter LM fine-tuned for a few hundred steps learns a user's style, but not their
phrases: the names, sign-offs and turns of phrase they repeat. A word n-gram model of their
own text learns those exactly, in a second, and is what classic predictive keyboards (presage,
phone keyboards) rely on. The personalization job builds a `PhraseModel` from the typing log
and stores it with the adapter version; the Predictor serves

    P(word | context) = (1 - weight) * P_LM(word | context) + weight * P_user(word | last 2 tokens)

where P_user is interpolated Witten-Bell over word 3-, 2- and 1-grams of the user's text (words
as `keyboard.words` defines them, punctuation marks and message starts as context tokens).
It is zero for a word the user never typed, so the LM alone carries new words.
"""

from __future__ import annotations

import bisect
import heapq
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from sys import intern

from keyboard.types import KeyboardError
from keyboard.words import WORD_RE

FORMAT = "keyboard-phrases"
FORMAT_VERSION = 1
START = "<s>"  # the start of a message: the context of its first word
# The user model's share of the blend, set on the users' held-out history (docs/evaluation.md).
DEFAULT_WEIGHT = 0.4
ORDER = 3  # 4-grams were no better on the users' held-out history (docs/evaluation.md)
MAX_NGRAMS = 400_000  # stored 2- and 3-grams; beyond that the rarest 3-grams, then 2-grams go
CONTEXT_CHARS = 200  # text before the word that is tokenized for the n-gram context
CANDIDATES = 12  # user-model words considered per prediction
_SCAN_LIMIT = 4000  # 1-gram candidates scanned for a prefix (sorted vocabulary range)
_TOKEN_RE = re.compile(rf"{WORD_RE.pattern}|\n|[^\w\s]")
_SEP = "\t"
MAX_FILE_BYTES = 256 * 2**20  # inflated; MAX_NGRAMS of them take about 20 MB


class PhraseError(KeyboardError):
    """A phrase file that cannot be read (damaged, or of another format)."""


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


def _is_word(token: str) -> bool:
    return token != START and WORD_RE.fullmatch(token) is not None


@dataclass
class PhraseModel:
    """Word 1-, 2- and 3-gram counts of the user's text, and Witten-Bell probabilities."""

    unigrams: Counter[str] = field(default_factory=Counter)  # words only
    follow: dict[tuple[str, ...], Counter[str]] = field(default_factory=dict)  # context -> next
    weight: float = DEFAULT_WEIGHT
    _sorted: list[str] | None = field(default=None, repr=False)
    _top: list[str] | None = field(default=None, repr=False)
    _totals: dict[tuple[str, ...], int] = field(default_factory=dict, repr=False)
    _n: int = field(default=0, repr=False)

    # --- learning --------------------------------------------------------------------------
    @classmethod
    def from_texts(cls, texts: Iterable[str], weight: float = DEFAULT_WEIGHT) -> PhraseModel:
        model = cls(weight=weight)
        for text in texts:
            model.learn(text)
        model.prune(MAX_NGRAMS)
        return model

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
        self._invalidate()

    @property
    def words(self) -> int:
        """Words learned (the size of the user's text)."""
        return sum(self.unigrams.values())

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
        self._invalidate()

    def _invalidate(self) -> None:
        self._sorted = self._top = None
        self._totals = {}

    # --- probabilities ---------------------------------------------------------------------
    def _total(self, ctx: tuple[str, ...]) -> int:
        total = self._totals.get(ctx)
        if total is None:
            total = self._totals[ctx] = sum(self.follow[ctx].values())
        return total

    def probability(self, word: str, context: tuple[str, ...]) -> float:
        """P_user(word | the last two tokens of `context`), interpolated Witten-Bell."""
        self._index()
        n_words = self._n
        if not n_words:
            return 0.0
        p = self.unigrams.get(word, 0) / n_words
        for n in range(1, ORDER):
            if len(context) < n:
                break
            ctx = tuple(context[-n:])
            nxt = self.follow.get(ctx)
            if not nxt:
                break  # an unseen context: back off to what the shorter one says
            types, total = len(nxt), self._total(ctx)
            p = (nxt.get(word, 0) + types * p) / (total + types)
        return p

    def candidates(self, context: tuple[str, ...], prefix: str, limit: int = CANDIDATES) -> dict:
        """Up to `limit` words starting with `prefix` the user model finds most likely after
        `context`, with P_user."""
        sorted_words, top = self._index()
        pool: set[str] = set()
        for n in range(ORDER - 1, 0, -1):
            if len(context) >= n:
                nxt = self.follow.get(tuple(context[-n:]))
                if nxt:
                    pool.update(w for w in nxt if w.startswith(prefix))
        if prefix:
            lo = bisect.bisect_left(sorted_words, prefix)
            hi = bisect.bisect_left(sorted_words, prefix + "\U0010ffff", lo)
            span = sorted_words[lo : min(hi, lo + _SCAN_LIMIT)]
            pool.update(heapq.nlargest(limit, span, key=self.unigrams.__getitem__))
        else:
            pool.update(top)
        scored = {w: self.probability(w, context) for w in pool}
        best = heapq.nlargest(limit, scored, key=scored.__getitem__)
        return {w: scored[w] for w in best}

    def _index(self) -> tuple[list[str], list[str]]:
        """The words in order, and the likeliest ones (built on first use)."""
        if self._sorted is None or self._top is None:
            self._sorted = sorted(self.unigrams)
            self._top = heapq.nlargest(CANDIDATES, self.unigrams, key=self.unigrams.__getitem__)
            self._n = self.words
        return self._sorted, self._top

    def blend(
        self, lm: dict[str, float], before: str, at_start: bool, prefix: str, k: int
    ) -> dict[str, float]:
        """The LM's word probabilities `lm` (words starting with `prefix`) blended with the
        user model's after the text `before` the word (`at_start`: it is the whole text)."""
        if not self.unigrams or self.weight <= 0:
            return lm
        whole = at_start and len(before) <= CONTEXT_CHARS
        context = tuple(tokens(before[-CONTEXT_CHARS:], at_start=whole)[1 - ORDER :])
        user = self.candidates(context, prefix, max(CANDIDATES, k))
        out = {w: (1.0 - self.weight) * p for w, p in lm.items()}
        for w in lm:
            if w not in user and w in self.unigrams:
                user[w] = self.probability(w, context)
        for w, p in user.items():
            out[w] = out.get(w, 0.0) + self.weight * p
        return out

    # --- files -----------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        follow: dict[str, dict[str, int]] = {}
        for ctx, nxt in self.follow.items():
            follow[_SEP.join(ctx)] = dict(nxt)
        data = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "weight": self.weight,
            "unigrams": dict(self.unigrams),
            "follow": follow,
        }
        return zlib.compress(json.dumps(data, ensure_ascii=False).encode("utf-8"), 6)

    @classmethod
    def from_bytes(cls, raw: bytes) -> PhraseModel:
        """The model stored in `raw`; PhraseError for anything damaged, whatever the damage."""
        try:
            return cls._decode(raw)
        except PhraseError:
            raise
        except Exception as exc:  # noqa: BLE001 - deep nesting, huge numbers, odd types
            raise PhraseError(f"damaged phrase file ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _decode(cls, raw: bytes) -> PhraseModel:
        inflate = zlib.decompressobj()
        try:
            # Bounded: a damaged (or hostile) file never inflates past MAX_FILE_BYTES.
            text = inflate.decompress(raw, MAX_FILE_BYTES)
            if inflate.unconsumed_tail:
                raise PhraseError(f"phrase file inflates past {MAX_FILE_BYTES:,} bytes")
            if not inflate.eof:
                raise PhraseError("phrase file is truncated")
            data = json.loads(text.decode("utf-8"))
        except (zlib.error, UnicodeDecodeError, ValueError) as exc:
            raise PhraseError(f"not a phrase file ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PhraseError("not a phrase file (unknown format)")
        if data.get("version") != FORMAT_VERSION:
            raise PhraseError(f"phrase file version {data.get('version')} is not supported")
        try:
            weight = float(data["weight"])
            # Interned: each word is one object however many n-grams hold it (-25% memory).
            unigrams = Counter({intern(str(w)): int(n) for w, n in data["unigrams"].items()})
            follow = {
                tuple(map(intern, ctx.split(_SEP))): Counter(
                    {intern(str(w)): int(n) for w, n in nxt.items()}
                )
                for ctx, nxt in data["follow"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PhraseError(f"damaged phrase file ({exc})") from None
        if not 0.0 <= weight < 1.0:
            raise PhraseError(f"phrase weight {weight} is outside [0, 1)")
        return cls(unigrams=unigrams, follow=follow, weight=weight)

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
