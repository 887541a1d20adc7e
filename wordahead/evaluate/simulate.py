"""The typing simulation: what typing a text through a predictor costs in keystrokes (KSR),
how often the next word is right (top-1/top-3), and the predict latency (docs/evaluation.md)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from wordahead.predict.shown import ShownInWord
from wordahead.predict.words import word_spans
from wordahead.types import MAX_K, KeyboardError, Prediction

DEFAULT_CONTEXT_CHARS = 1000


class TypingPredictor(Protocol):
    """Anything that suggests words for the text before the cursor (Predictor, peers, fakes)."""

    def predict(self, context: str, k: int = 3) -> Prediction: ...


def completed_word(typed: str, prefix: str, suggestion: str) -> str:
    """The word a client produces when the user accepts `suggestion`: it replaces the
    predictor's `prefix` (a suffix of the `typed` part of the word) with the suggestion."""
    if typed.endswith(prefix):
        return typed[: len(typed) - len(prefix)] + suggestion
    return suggestion


@dataclass
class TypingReport:
    """What typing a text through a predictor costs and how often the next word is right."""

    k: int
    messages: int
    chars: int
    keystrokes: int
    ksr: float  # keystroke savings rate: 1 - keystrokes / chars
    words: int
    top1: float  # next-word accuracy at word starts (empty prefix)
    top3: float
    predictions: int  # predict calls made
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    seconds: float  # wall time of the whole simulation
    nonwords: int = 0  # suggestions shown that are not real words (when a checker was given)

    @classmethod
    def of_counts(
        cls,
        k: int,
        messages: int,
        chars: int,
        keystrokes: int,
        words: int,
        top1_hits: int,
        top3_hits: int,
        latencies: Sequence[float],
        started: float,
        nonwords: int = 0,
    ) -> TypingReport:
        """The report of a simulation that began at `started` (perf_counter) from its counts."""
        return cls(
            k=k,
            messages=messages,
            chars=chars,
            keystrokes=keystrokes,
            ksr=1.0 - keystrokes / chars if chars else 0.0,
            words=words,
            top1=top1_hits / words if words else 0.0,
            top3=top3_hits / words if words else 0.0,
            predictions=len(latencies),
            latency_p50_ms=percentile(latencies, 50),
            latency_p95_ms=percentile(latencies, 95),
            latency_p99_ms=percentile(latencies, 99),
            seconds=time.perf_counter() - started,
            nonwords=nonwords,
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, float):
                data[key] = round(value, 6 if key in ("ksr", "top1", "top3") else 3)
        return data


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _bounded(text: str, limit: int) -> str:
    """The last `limit` characters of `text`, without a leading cut-off word fragment."""
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    if not text[-limit - 1].isspace():
        space = next((i for i, ch in enumerate(cut) if ch.isspace()), None)
        if space is not None:
            cut = cut[space + 1 :]
    return cut


def simulate(
    predictor: TypingPredictor,
    messages: Sequence[str],
    *,
    history: Sequence[str] = (),
    k: int = 3,
    context_chars: int = DEFAULT_CONTEXT_CHARS,
    client_filter: bool = True,
    real_word: Callable[[str], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
    after_message: Callable[[str], None] | None = None,
    per_word: list[tuple[int, int]] | None = None,
) -> TypingReport:
    """Type `messages` through `predictor` as docs/evaluation.md defines, and report the cost.

    `after_message(message)` is called once each message is typed (continuous use: the
    predictor learns it before the next one). `per_word`, when given, receives for each word
    its next-word rank (-1: not in the top 3) and the keystrokes it cost, for paired tests.

    `history` is text the user typed before (context only, not scored). Each message is typed
    after the preceding text (history and earlier messages, joined with newlines, bounded to
    the last `context_chars` characters). One predict call per point where suggestions are
    shown; none after a word has been accepted.

    `client_filter`: the client shows word candidates only (punctuation saves no keystroke),
    and does not show again, within one word, a suggestion it already showed there and the
    user typed past (it asks for more and drops those: wordahead.predict.shown, as the LSP server does;
    presage does the same with REPEAT_SUGGESTIONS=no). Off: every keystroke shows the top k
    candidates as they come.

    `real_word`: counts the suggestions shown that it says are not words (`nonwords`).
    """
    if k < 1:
        raise KeyboardError(f"k must be at least 1 (got {k})")
    chars = keystrokes = n_words = top1_hits = top3_hits = nonwords = 0
    latencies: list[float] = []
    prior = _bounded("\n".join(history), context_chars)
    started = time.perf_counter()
    for index, message in enumerate(messages):
        lead = prior + "\n" if prior else ""
        chars += len(message)
        typed_to = 0  # characters of the message accounted for so far
        for start, end in word_spans(message):
            keystrokes += start - typed_to  # spaces and punctuation before the word
            target = message[start:end]
            n_words += 1
            cost = end - start  # typed in full unless a suggestion is accepted
            client = ShownInWord()
            rank = -1
            for i in range(end - start):
                want = max(k, 3) if i == 0 else k
                shown, ms = _suggested(
                    predictor, lead, message, start, start + i, want, client, client_filter,
                    context_chars,
                )  # fmt: skip
                latencies.append(ms)
                if i == 0:  # next-word accuracy: the model's own top 3 (words), nothing hidden
                    rank = _rank(shown, target, 3)
                    top1_hits += rank == 0
                    top3_hits += rank >= 0
                shown = client.show(shown, k) if client_filter else shown[:k]
                if real_word is not None:
                    nonwords += sum(not real_word(w) for w in shown)
                if target in shown:
                    cost = i + 1  # the characters typed, plus one to accept
                    break
            keystrokes += cost
            if per_word is not None:
                per_word.append((rank, cost))
            typed_to = end
        keystrokes += len(message) - typed_to
        prior = _bounded(lead + message, context_chars)
        if after_message is not None:
            after_message(message)
        if progress is not None:
            progress(index + 1, len(messages))
    return TypingReport.of_counts(
        k, len(messages), chars, keystrokes, n_words, top1_hits, top3_hits, latencies, started,
        nonwords,
    )  # fmt: skip


def next_word_ranks(
    predictor: TypingPredictor,
    messages: Sequence[str],
    *,
    history: Sequence[str] = (),
    k: int = 3,
    context_chars: int = DEFAULT_CONTEXT_CHARS,
) -> list[int]:
    """For each word of `messages`, its rank (0-based) among the first `k` words suggested at
    the word's start, or -1: the measurement behind `simulate`'s next-word top-1/top-3 (the
    same contexts and client rule), without the per-character typing KSR needs."""
    ranks: list[int] = []
    prior = _bounded("\n".join(history), context_chars)
    for message in messages:
        lead = prior + "\n" if prior else ""
        for start, end in word_spans(message):
            shown, _ = _suggested(
                predictor, lead, message, start, start, max(k, 3), ShownInWord(), True,
                context_chars,
            )  # fmt: skip
            ranks.append(_rank(shown, message[start:end], k))
        prior = _bounded(lead + message, context_chars)
    return ranks


def _suggested(
    predictor: TypingPredictor,
    lead: str,
    message: str,
    start: int,
    pos: int,
    want: int,
    client: ShownInWord,
    client_filter: bool,
    context_chars: int,
) -> tuple[list[str], float]:
    """The words a client may show at `pos` of the word of `message` that begins at `start`
    (after `lead`, the text before the message), most likely first, and the predict latency
    in ms. Asks for `want` plus what the client hides (wordahead.predict.shown)."""
    context = _bounded(lead + message[max(0, pos - context_chars) : pos], context_chars)
    typed = message[start:pos]
    ask = client.ask(start, typed, want, MAX_K) if client_filter else want
    t0 = time.perf_counter()
    prediction = predictor.predict(context, k=ask)
    ms = (time.perf_counter() - t0) * 1000.0
    suggested = [
        completed_word(typed, prediction.prefix, c.word)
        for c in prediction.candidates[:ask]
        if c.kind == "word" or not client_filter
    ]
    return suggested, ms


def _rank(shown: list[str], target: str, k: int) -> int:
    """The place of `target` among the first `k` of `shown`, or -1."""
    top = shown[:k]
    return top.index(target) if target in top else -1
