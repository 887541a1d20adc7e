"""The phrase-aware simulated user: what ghost text (phrase completion) saves, and how often
it is right when it shows.

The user types as `simulate` defines (docs/evaluation.md) and, at each point where
suggestions are shown, takes the action that saves the most keystrokes: accepting the shown
phrase (one keystroke, only when the whole phrase is exactly what comes next), else picking
one of the k words, else typing the next character. In the accept-one-word variant the user
may also take the phrase's leading words one keystroke each (the rest of the ghost stays
shown), when the whole phrase is not right.

One typing pass (`trace`) asks the predictor exactly what `simulate` asks and records, at
every point asked, the greedy word chain the phrase search finds there (down to a low floor).
Which phrase is shown depends only on that chain and the phrase settings, so `replay` scores
any threshold, length and normalisation from one pass: that is how the settings are chosen on
the dev lines without typing them again. The text typed is the same with or without phrases,
so every point the phrase typist reaches was asked in the word-only pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from wordahead.evaluate.simulate import (
    DEFAULT_CONTEXT_CHARS,
    TypingPredictor,
    TypingReport,
    _bounded,
    _rank,
    _suggested,
)
from wordahead.predict.shown import ShownInWord
from wordahead.predict.sources.phrase_completion import (
    Chain,
    PhraseSettings,
    choose,
    user_probability,
    word_chain,
)
from wordahead.predict.words import word_spans
from wordahead.types import KeyboardError

TRACE_MAX_WORDS = 5  # the longest phrase a replay can score
TRACE_FLOOR = 0.02  # chains are followed while their probability stays above this


@dataclass
class WordTrace:
    """One word of a message: its span, where the word-only typist accepted it (-1: typed in
    full) and the chain found at each point asked in it (offset = characters typed)."""

    start: int
    end: int
    accepted_at: int
    chains: list[Chain] = field(default_factory=list)


@dataclass
class MessageTrace:
    text: str
    words: list[WordTrace]


@dataclass
class PhraseTrace:
    """A typing pass: the word-only report and the chains along it."""

    report: TypingReport
    messages: list[MessageTrace]

    def to_json(self) -> dict[str, Any]:
        return {
            "report": self.report.to_json(),
            "messages": [
                {
                    "text": m.text,
                    "words": [
                        [w.start, w.end, w.accepted_at, [_chain_json(c) for c in w.chains]]
                        for w in m.words
                    ],
                }
                for m in self.messages
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PhraseTrace:
        messages = [
            MessageTrace(
                m["text"],
                [
                    WordTrace(s, e, a, [_chain_of(c) for c in chains])
                    for s, e, a, chains in m["words"]
                ],
            )
            for m in data["messages"]
        ]
        return cls(TypingReport(**data["report"]), messages)


def _chain_json(chain: Chain) -> list[Any]:
    return [
        chain.prefix,
        list(chain.words),
        [round(p, 6) for p in chain.probabilities],
        [round(p, 6) for p in chain.user],
    ]


def _chain_of(data: list[Any]) -> Chain:
    return Chain(data[0], tuple(data[1]), tuple(data[2]), tuple(data[3]))


def trace(
    predictor: TypingPredictor,
    messages: Sequence[str],
    *,
    history: Sequence[str] = (),
    k: int = 3,
    context_chars: int = DEFAULT_CONTEXT_CHARS,
    max_words: int = TRACE_MAX_WORDS,
    floor: float = TRACE_FLOOR,
    progress: Callable[[int, int], None] | None = None,
) -> PhraseTrace:
    """Type `messages` as `simulate` does (its report, the same numbers) and record the phrase
    search's chain at every point asked."""
    if k < 1:
        raise KeyboardError(f"k must be at least 1 (got {k})")
    chars = keystrokes = n_words = top1_hits = top3_hits = 0
    latencies: list[float] = []
    prior = _bounded("\n".join(history), context_chars)
    started = time.perf_counter()
    out: list[MessageTrace] = []
    user = user_probability(predictor)
    for index, message in enumerate(messages):
        lead = prior + "\n" if prior else ""
        chars += len(message)
        typed_to = 0
        words: list[WordTrace] = []
        for start, end in word_spans(message):
            keystrokes += start - typed_to
            target = message[start:end]
            n_words += 1
            cost = end - start
            client = ShownInWord()
            word = WordTrace(start, end, -1)
            for i in range(end - start):
                want = max(k, 3) if i == 0 else k
                shown, ms = _suggested(
                    predictor, lead, message, start, start + i, want, client, True, context_chars
                )
                latencies.append(ms)
                context = _bounded(
                    lead + message[max(0, start + i - context_chars) : start + i], context_chars
                )
                word.chains.append(word_chain(predictor, context, max_words, floor, user=user))
                if i == 0:
                    rank = _rank(shown, target, 3)
                    top1_hits += rank == 0
                    top3_hits += rank >= 0
                shown = client.show(shown, k)
                if target in shown:
                    cost = i + 1
                    word.accepted_at = i
                    break
            keystrokes += cost
            words.append(word)
            typed_to = end
        keystrokes += len(message) - typed_to
        out.append(MessageTrace(message, words))
        prior = _bounded(lead + message, context_chars)
        if progress is not None:
            progress(index + 1, len(messages))
    report = TypingReport.of_counts(
        k, len(messages), chars, keystrokes, n_words, top1_hits, top3_hits, latencies, started
    )
    return PhraseTrace(report, out)


@dataclass
class PhraseReport:
    """What typing with phrases costs, next to word-only typing of the same text."""

    chars: int
    keystrokes_words: int  # word-only typing
    keystrokes_phrases: int  # with phrases
    ksr_words: float
    ksr_phrases: float
    word_starts: int  # word starts the phrase typist reached
    shown: int  # phrases shown there
    right: int  # ... that were exactly what came next
    trigger_rate: float  # shown / word_starts
    precision: float  # right / shown (0 when none shown)
    shown_anywhere: int  # phrases shown at every point asked (inside words too)
    right_anywhere: int
    accepted: int  # phrases (or leading words of one) the typist took
    phrase_saved: int  # keystrokes_words - keystrokes_phrases
    phrase_ksr: float  # phrase_saved / chars: the KSR points phrases add

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, float):
                data[key] = round(value, 6)
        return data


def right_words(message: str, pos: int, ends: set[int], words: Sequence[str], prefix: str) -> int:
    """How many leading words of a phrase shown at `pos` of `message` (after `prefix`, the
    typed part of its first word) are exactly what comes next: the text matches and each ends
    where a word of the message ends."""
    first = words[0]
    if not first.startswith(prefix):
        return 0
    pieces = [first[len(prefix) :]] + [" " + w for w in words[1:]]
    n = 0
    at = pos
    for piece in pieces:
        if not message.startswith(piece, at) or at + len(piece) not in ends:
            break
        at += len(piece)
        n += 1
    return n


def replay(
    traced: PhraseTrace, settings: PhraseSettings | None, accept_words: bool = False
) -> PhraseReport:
    """Type the traced text again with the phrases `settings` shows (None: none), from the
    recorded chains alone (no predictor)."""
    chars = keystrokes = words_only = 0
    starts = shown = right = shown_any = right_any = accepted = 0
    for message in traced.messages:
        text = message.text
        chars += len(text)
        ends = {w.end for w in message.words}
        typed_to = 0
        for w in message.words:
            words_only += w.start - typed_to
            words_only += w.end - w.start if w.accepted_at < 0 else w.accepted_at + 1
            typed_to = w.end
        words_only += len(text) - typed_to
        typed_to = 0
        j = 0
        while j < len(message.words):
            w = message.words[j]
            keystrokes += w.start - typed_to
            next_j = j + 1
            cost = w.end - w.start
            for i, chain in enumerate(w.chains):
                phrase = choose(chain, settings) if settings is not None else None
                if phrase is not None:
                    m = right_words(text, w.start + i, ends, phrase.words, chain.prefix)
                    whole = m == len(phrase.words)
                    shown_any += 1
                    right_any += whole
                    if i == 0:
                        shown += 1
                        right += whole
                    if whole or (accept_words and m >= 2):
                        cost = i + (1 if whole else m)
                        next_j = j + len(phrase.words) if whole else j + m
                        accepted += 1
                        break
                if i == w.accepted_at:
                    cost = i + 1
                    break
            starts += 1
            keystrokes += cost
            typed_to = message.words[next_j - 1].end
            j = next_j
        keystrokes += len(text) - typed_to
    saved = words_only - keystrokes
    return PhraseReport(
        chars=chars,
        keystrokes_words=words_only,
        keystrokes_phrases=keystrokes,
        ksr_words=1.0 - words_only / chars if chars else 0.0,
        ksr_phrases=1.0 - keystrokes / chars if chars else 0.0,
        word_starts=starts,
        shown=shown,
        right=right,
        trigger_rate=shown / starts if starts else 0.0,
        precision=right / shown if shown else 0.0,
        shown_anywhere=shown_any,
        right_anywhere=right_any,
        accepted=accepted,
        phrase_saved=saved,
        phrase_ksr=saved / chars if chars else 0.0,
    )


def type_with_phrases(
    predictor: TypingPredictor,
    messages: Sequence[str],
    settings: PhraseSettings,
    *,
    history: Sequence[str] = (),
    k: int = 3,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[TypingReport, dict[str, Any]]:
    """`simulate`'s report of typing `messages`, and what phrases under `settings` add: the
    whole-phrase typist's report and the accept-one-word variant's."""
    traced = trace(predictor, messages, history=history, k=k, progress=progress)
    return traced.report, {
        "settings": asdict(settings),
        "whole": replay(traced, settings).to_json(),
        "one_word": replay(traced, settings, accept_words=True).to_json(),
    }


def phrase_table(rows: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of phrase reports, one row per label."""
    width = max([len(label) for label in rows] + [8])
    lines = [
        f"{'':<{width}}  {'KSR words':>9}  {'phrases':>7}  {'1 word':>6}  {'trigger':>7}  "
        f"{'precision':>9}"
    ]
    for label, r in rows.items():
        w, o = r["whole"], r["one_word"]
        lines.append(
            f"{label:<{width}}  {100 * w['ksr_words']:9.2f}  {100 * w['ksr_phrases']:7.2f}  "
            f"{100 * o['ksr_phrases']:6.2f}  {100 * w['trigger_rate']:6.1f}%  "
            f"{100 * w['precision']:8.1f}%"
        )
    return "\n".join(lines)
