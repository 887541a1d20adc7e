"""The job's gate: whether a trained adapter (or new phrases alone) is served. The held-out
text is typed through the predictor with each candidate (the typing simulation), and the
promotion rule compares the measurements word by word."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wordahead import memory
from wordahead.types import KeyboardError

if TYPE_CHECKING:
    from wordahead.model.artifacts import Adapter
    from wordahead.predict.sources.phrases import PhraseModel


GATE_Z = 1.645  # one-sided 95%: how sure the gate must be that top-3 got worse to refuse


def _costlier(after: dict[str, Any]) -> bool:
    """Whether typing the held-out words got significantly costlier: the per-word keystroke
    increase is beyond GATE_Z standard errors (z None: every word got costlier)."""
    z = after.get("keystrokes_z", 0.0)
    return z is None or z > GATE_Z


def gate(before: dict[str, Any], after: dict[str, Any], min_loss_gain: float) -> tuple[bool, str]:
    """The promotion rule: the held-out loss falls by at least `min_loss_gain` (a fraction),
    next-word top-3 accuracy on the held-out words does not get worse, AND typing them does
    not get costlier (KSR@3, what the user feels).

    Loss is the sensitive signal (every token counts); top-3 and KSR guard what the user sees.
    On a few hundred words they move by chance, so "worse" is a paired test over the same
    words: refused when the words the old adapter had in its top 3 and the new one lost
    outnumber the words it gained by more than GATE_Z standard deviations (lost - gained >
    1.645 * sqrt(lost + gained)), or when the per-word keystrokes rose by more than GATE_Z
    standard errors. Without those counts, any fall refuses.
    """
    lb, la = before.get("loss"), after.get("loss")
    if la is None or lb is None or not math.isfinite(la) or not math.isfinite(lb):
        return False, f"held-out loss is not a number (before {lb}, after {la})"
    needed = lb * (1.0 - min_loss_gain)
    if la > needed:
        return False, (
            f"held-out loss did not improve enough: {lb:.4f} -> {la:.4f} (needs <= {needed:.4f})"
        )
    tb, ta = before.get("top3", 0.0), after.get("top3", 0.0)
    lost, gained = after.get("top3_lost"), after.get("top3_gained")
    if lost is not None and gained is not None:
        worse = lost - gained > GATE_Z * math.sqrt(lost + gained)
        detail = f" ({lost} words lost, {gained} gained)"
    else:
        worse, detail = ta < tb, ""
    if worse:
        return False, f"next-word top-3 accuracy fell: {100 * tb:.2f}% -> {100 * ta:.2f}%{detail}"
    kb, ka = before.get("ksr"), after.get("ksr")
    ksr = ""
    if kb is not None and ka is not None:
        if ka < kb and _costlier(after):
            return False, f"KSR@3 on the held-out text fell: {100 * kb:.2f} -> {100 * ka:.2f}"
        ksr = f", KSR@3 {100 * kb:.2f} -> {100 * ka:.2f}"
    return True, (
        f"held-out loss {lb:.4f} -> {la:.4f}, next-word top-3 {100 * tb:.2f}% -> "
        f"{100 * ta:.2f}%{detail}{ksr}"
    )


def phrases_gate(before: dict[str, Any], after: dict[str, Any]) -> tuple[bool, str]:
    """The rule for new phrases with the adapter kept (the loss cannot tell: the model is the
    same): held-out next-word top-3 gained more words than it lost."""
    lost, gained = after.get("top3_lost", 0), after.get("top3_gained", 0)
    change = (
        f"next-word top-3 {100 * before.get('top3', 0.0):.2f}% -> "
        f"{100 * after.get('top3', 0.0):.2f}% ({lost} words lost, {gained} gained)"
    )
    if gained > lost and not _costlier(after):
        return True, change
    return False, f"new phrases did not help either: {change}"


@dataclass
class HeldOutTyping:
    """The held-out text typed through a predictor: per word, its next-word rank (-1: not in
    the top 3) and the keystrokes it cost; and the KSR@3 of the whole."""

    ranks: list[int]
    costs: list[int]
    ksr: float


def accuracy(typed: HeldOutTyping) -> dict[str, Any]:
    ranks = typed.ranks
    n = len(ranks)
    return {
        "top1": sum(r == 0 for r in ranks) / n if n else 0.0,
        "top3": sum(0 <= r < 3 for r in ranks) / n if n else 0.0,
        "ksr": typed.ksr,
        "words": n,
    }


def held_out_slice(texts: list[str], max_words: int) -> list[str]:
    """The first held-out messages, up to about `max_words` words (predicting is the slow part)."""
    from wordahead.predict.words import words

    out: list[str] = []
    n = 0
    for text in texts:
        if out and n >= max_words:
            break
        out.append(text)
        n += len(words(text))
    return out


def type_held_out(
    model_dir: Path,
    threads: int,
    tensors: Adapter | None,
    version: str,
    typed: list[str],
    history: list[str],
    phrases: PhraseModel | None = None,
) -> HeldOutTyping:
    """`typed` typed (wordahead.evaluate.simulate.simulate) with a predictor that serves `tensors`
    (None: the base model) and the user's `phrases`."""
    from wordahead.evaluate.simulate import simulate
    from wordahead.predict.predictor import Predictor

    predictor = Predictor(model_dir, threads=threads)
    if (tensors is not None or phrases is not None) and not predictor.load_adapter(
        tensors, version, phrases
    ):
        raise KeyboardError(f"the predictor could not load adapter {version}")
    per_word: list[tuple[int, int]] = []
    report = simulate(predictor, typed, history=history, k=3, per_word=per_word)
    del predictor
    memory.trim()
    return HeldOutTyping([r for r, _ in per_word], [c for _, c in per_word], report.ksr)


def paired_change(before: HeldOutTyping, after: HeldOutTyping) -> dict[str, Any]:
    """Words that left / entered the top 3 between two measurements of the same words, and
    how sure it is that typing them got costlier (z of the mean per-word keystroke change)."""
    pairs = list(zip(before.ranks, after.ranks, strict=True))
    diffs = [a - b for b, a in zip(before.costs, after.costs, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n if n else 0.0
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    z = mean / math.sqrt(var / n) if var > 0 else (math.inf if mean > 0 else 0.0)
    return {
        "top3_lost": sum(b >= 0 and a < 0 for b, a in pairs),
        "top3_gained": sum(b < 0 and a >= 0 for b, a in pairs),
        "keystrokes_z": round(z, 3) if math.isfinite(z) else None,
    }


def describe(m: dict[str, Any]) -> str:
    """One measurement as a line of the job's progress."""
    return (
        f"held-out loss {m['loss']:.4f}, next-word top-1 {100 * m['top1']:.1f}%, "
        f"top-3 {100 * m['top3']:.1f}%, KSR@3 {100 * m.get('ksr', 0.0):.1f} "
        f"({m['words']} words)"
    )
