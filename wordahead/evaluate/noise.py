"""Typing with slips of the finger: the noise model of the evaluation, and what it measures.

The simulated typist of `simulate` (docs/evaluation.md) types every character as meant; people
do not. Here a typist slips: each letter of a word after its first is, with probability
`rate`, typed with a slip, one of (in these shares, the common kinds of keyboard typos):

| kind | share | example (meant "there") |
|---|---|---|
| a neighbouring letter key instead (the layout's) | 45% | threr |
| the letter left out | 20% | thre |
| the letter swapped with the next | 15% | tehre |
| a neighbouring key pressed as well | 10% | therre, thetre |
| the letter doubled | 10% | theere |

A file of real misspellings ("meant: typed, typed", one word a line) may be given: a word that
slips and has listed misspellings takes one of them instead.

The typist sees the suggestions at every keystroke (corrections included: accepting one replaces
the typed part of the word), accepts the word meant as soon as it is shown (one keystroke), and
after typing a word with a slip that was never offered, fixes it: back over the wrong letters
and type the rest (each a keystroke). So the text before each word is always the text meant.
KSR counts keystrokes against the characters of the text meant, as `simulate` does.

Measured (`typo_report`): the word meant among the top 3 once a word of 4+ letters is typed
with exactly one slip; false corrections (a correctly typed real word whose top suggestion,
once it is typed, is a correction to another word); KSR@k on clean text and at `rate`; latency.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from wordahead.evaluate.harness import ServedAdapter
from wordahead.evaluate.simulate import TypingPredictor, completed_word, percentile
from wordahead.predict.layouts import Layout, layout
from wordahead.predict.shown import ShownInWord
from wordahead.predict.words import word_spans
from wordahead.types import MAX_K, KeyboardError

SLIP_KINDS: tuple[tuple[str, float], ...] = (
    ("neighbour", 0.45),
    ("omission", 0.20),
    ("transposition", 0.15),
    ("insertion", 0.10),
    ("doubling", 0.10),
)
MIN_SLIP_LETTERS = 4  # words this long or longer are the ones the one-slip measure types
CONTEXT_CHARS = 1000


def read_misspellings(path: str | Path) -> dict[str, list[str]]:
    """{word meant: [misspellings]} from lines "meant: typed, typed" (# starts a comment)."""
    found: dict[str, list[str]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyboardError(f"misspellings file {path} cannot be read: {exc}") from None
    for number, line in enumerate(lines, start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        meant, sep, typed = line.partition(":")
        if not sep or not meant.strip():
            raise KeyboardError(f"{path}:{number}: expected 'meant: typed, typed'")
        found.setdefault(meant.strip(), []).extend(
            t.strip() for t in typed.split(",") if t.strip() and t.strip() != meant.strip()
        )
    return found


class Slips:
    """Makes slips, reproducibly (a seeded generator)."""

    def __init__(
        self,
        keys: Layout | None = None,
        seed: int = 0,
        misspellings: dict[str, list[str]] | None = None,
    ) -> None:
        self.keys = keys or layout()
        self.rng = random.Random(seed)
        self.misspellings = misspellings or {}

    def one(self, word: str) -> str:
        """`word` with exactly one slip, never in its first letter (a word of 2+ letters)."""
        listed = self.misspellings.get(word)
        if listed:
            return self.rng.choice(listed)
        for _ in range(20):  # a slip can give back the word itself ("ll" -> "l" -> ...)
            typed = self._slip(word, self.rng.randrange(1, len(word)))
            if typed != word:
                return typed
        return word

    def typed(self, word: str, rate: float) -> str:
        """`word` as typed with a slip at each letter after the first with probability `rate`."""
        if len(word) < 2 or not any(self.rng.random() < rate for _ in range(len(word) - 1)):
            return word
        return self.one(word)

    def _slip(self, word: str, i: int) -> str:
        kind = self.rng.choices([k for k, _ in SLIP_KINDS], [w for _, w in SLIP_KINDS])[0]
        ch = word[i]
        near = sorted(k for k in self.keys.keys_near(ch) if k.isalpha())  # a slip stays a word
        if kind == "neighbour" and near:
            return word[:i] + _like(ch, self.rng.choice(near)) + word[i + 1 :]
        if kind == "omission":
            return word[:i] + word[i + 1 :]
        if kind == "transposition" and i + 1 < len(word):
            return word[:i] + word[i + 1] + ch + word[i + 2 :]
        if kind == "insertion" and near:
            return word[: i + 1] + _like(ch, self.rng.choice(near)) + word[i + 1 :]
        return word[: i + 1] + ch + word[i + 1 :]  # doubling (and the fallbacks)


def _like(model: str, ch: str) -> str:
    return ch.upper() if model.isupper() else ch


@dataclass
class TypoReport:
    """What slips cost a predictor (see the module docstring)."""

    rate: float
    words: int
    slipped_words: int  # words of 4+ letters typed with one slip
    slip_top3: float  # ... with the word meant among the top 3 once typed
    false_corrections: float  # share of real words, typed correctly, corrected to another
    chars: int
    ksr_clean: float
    ksr_noisy: float
    noisy_words: int  # words that slipped in the noisy typing
    latency_p50_ms: float
    latency_p95_ms: float
    predictions: int
    seconds: float

    def to_json(self) -> dict[str, float | int]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def shown_words(
    predictor: TypingPredictor,
    context: str,
    typed: str,
    k: int,
    client: ShownInWord,
    word_at: object,
    latencies: list[float],
) -> tuple[list[str], list[str]]:
    """The words a client shows after `context` (which ends with `typed`, the word so far):
    each as it would stand once accepted (a completion finishes `typed`, a correction replaces
    it); and the kinds of the shown ones."""
    ask = client.ask(word_at, typed, k, MAX_K)
    t0 = time.perf_counter()
    prediction = predictor.predict(context, k=ask)
    latencies.append((time.perf_counter() - t0) * 1000.0)
    words: list[str] = []
    kinds: dict[str, str] = {}
    for c in prediction.candidates[:ask]:
        if c.kind == "word":
            word = completed_word(typed, prediction.prefix, c.word)
        elif c.kind == "correction":
            cut = c.replaces or 0
            word = typed[: len(typed) - cut] + c.word if cut <= len(typed) else ""
        else:
            continue
        if word and word not in kinds:
            words.append(word)
            kinds[word] = c.kind
    shown = client.show(words, k)
    return shown, [kinds[w] for w in shown]


def _type_word(
    predictor: TypingPredictor,
    before: str,
    target: str,
    typed: str,
    k: int,
    latencies: list[float],
) -> int:
    """Keystrokes to get `target` into the text when the typist types `typed` for it."""
    client = ShownInWord()
    stops = len(typed) + (1 if typed != target else 0)  # a slip: look once more at the end
    for i in range(stops):
        shown, _ = shown_words(
            predictor, before + typed[:i], typed[:i], k, client, before, latencies
        )
        if target in shown:
            return i + 1
    if typed == target:
        return len(typed)
    same = 0
    while same < min(len(typed), len(target)) and typed[same] == target[same]:
        same += 1
    return len(typed) + (len(typed) - same) + (len(target) - same)  # back up, type the rest


def _bounded(text: str) -> str:
    return text[-CONTEXT_CHARS:]


def typo_report(
    predictor: TypingPredictor,
    messages: Sequence[str],
    *,
    history: Sequence[str] = (),
    rate: float = 0.03,
    k: int = 3,
    slips: Slips | None = None,
    is_word: Callable[[str], bool] | None = None,
) -> TypoReport:
    """Type `messages` clean and with slips at `rate` per letter; see the module docstring.
    `is_word` says which clean words count for false corrections (None: all)."""
    slips = slips or Slips()
    started = time.perf_counter()
    latencies: list[float] = []
    prior = _bounded("\n".join(history))
    chars = clean_keys = noisy_keys = words = slipped = slip_hits = 0
    noisy_words = checked = false = 0
    for message in messages:
        lead = prior + "\n" if prior else ""
        chars += len(message)
        typed_to = 0
        for start, end in word_spans(message):
            gap = start - typed_to
            target = message[start:end]
            before = _bounded(lead + message[:start])
            words += 1
            clean = _type_word(predictor, before, target, target, k, latencies)
            clean_keys += gap + clean
            noisy = slips.typed(target, rate) if target.isalpha() else target
            noisy_words += noisy != target
            if noisy != target:  # else the same keystrokes, the same (deterministic) answers
                noisy_keys += gap + _type_word(predictor, before, target, noisy, k, latencies)
            else:
                noisy_keys += gap + clean
            if is_word is None or is_word(target):
                shown, kinds = shown_words(
                    predictor, before + target, target, k, ShownInWord(), None, latencies
                )
                checked += 1
                false += bool(shown) and kinds[0] == "correction" and shown[0] != target
            if len(target) >= MIN_SLIP_LETTERS and target.isalpha():
                one = slips.one(target)
                if one != target:
                    shown, _ = shown_words(
                        predictor, before + one, one, k, ShownInWord(), None, latencies
                    )
                    slipped += 1
                    slip_hits += target in shown
            typed_to = end
        tail = len(message) - typed_to
        clean_keys += tail
        noisy_keys += tail
        prior = _bounded(lead + message)
    return TypoReport(
        rate=rate,
        words=words,
        slipped_words=slipped,
        slip_top3=slip_hits / slipped if slipped else 0.0,
        false_corrections=false / checked if checked else 0.0,
        chars=chars,
        ksr_clean=1.0 - clean_keys / chars if chars else 0.0,
        ksr_noisy=1.0 - noisy_keys / chars if chars else 0.0,
        noisy_words=noisy_words,
        latency_p50_ms=percentile(latencies, 50),
        latency_p95_ms=percentile(latencies, 95),
        predictions=len(latencies),
        seconds=time.perf_counter() - started,
    )


def typo_comparison(
    path: Path,
    model_dir: Path,
    served: ServedAdapter,
    rate: float,
    *,
    k: int = 3,
    max_lines: int | None = None,
    threads: int = 1,
    seed: int = 0,
    misspellings: Path | None = None,
) -> dict[str, dict[str, float | int]]:
    """`typo_report` on a user file's test lines (the split rule of `keyboard eval`) for the
    predictor without corrections ("today") and with them ("typos", KEYBOARD_TYPOS and
    KEYBOARD_LAYOUT apply), serving `served`; both see the same slips."""
    from wordahead.evaluate.harness import history_and_typed
    from wordahead.predict.predictor import Predictor
    from wordahead.predict.sources.typos import TypoSettings

    history, typed = history_and_typed(path, max_lines=max_lines)
    listed = read_misspellings(misspellings) if misspellings is not None else None
    settings = TypoSettings.from_env()
    out: dict[str, dict[str, float | int]] = {}
    for name, typos in (("today", replace(settings, enabled=False)), ("typos", settings)):
        predictor = Predictor(model_dir, threads=threads, typos=typos)
        if served.path is not None or served.phrases is not None:
            predictor.load_adapter(served.path, served.version, phrases=served.phrases)
        slips = Slips(layout(settings.layout), seed, listed)
        report = typo_report(
            predictor, typed, history=history, rate=rate, k=k, slips=slips,
            is_word=predictor.is_real_word,
        )  # fmt: skip
        out[name] = report.to_json()
    return out
