"""Measure the shipped starter model through the project's Predictor, before any personalization.

Two text sets, each typed word by word through `wordahead.evaluate.simulate.simulate` (3 suggestions):

- the held-out 1% of every base source (the hold-out rule of scripts/train_starter.py), one
  document at a time, with no other context;
- the test split (last 20% of lines) of every file in the users corpus, with that user's
  history (first 80%) as preceding context, as `keyboard eval` does before personalization.

Each set is capped at --max-words words per source/user (whole paragraphs, from the start), so a
run takes minutes rather than hours on a shared CPU; the cap is printed with the numbers.

    python scripts/evaluate_starter.py --model models/starter --json data/cache/starter/eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_starter import read_source, source_files  # noqa: E402 (numpy only, no torch)

from wordahead.evaluate.harness import read_messages, split_history  # noqa: E402
from wordahead.evaluate.simulate import TypingReport, percentile, simulate  # noqa: E402
from wordahead.predict.words import word_spans  # noqa: E402
from wordahead.types import KeyboardError  # noqa: E402


@dataclass
class Totals:
    """Sums over several simulations, for micro-averaged top-1/top-3/KSR."""

    chars: int = 0
    keystrokes: int = 0
    words: int = 0
    top1_hits: float = 0.0
    top3_hits: float = 0.0
    predictions: int = 0
    seconds: float = 0.0

    def add(self, r: TypingReport) -> None:
        self.chars += r.chars
        self.keystrokes += r.keystrokes
        self.words += r.words
        self.top1_hits += r.top1 * r.words
        self.top3_hits += r.top3 * r.words
        self.predictions += r.predictions
        self.seconds += r.seconds

    def to_json(self) -> dict:
        w = max(1, self.words)
        return {
            "words": self.words,
            "top1": round(self.top1_hits / w, 4),
            "top3": round(self.top3_hits / w, 4),
            "ksr": round(1 - self.keystrokes / self.chars, 4) if self.chars else 0.0,
            "predictions": self.predictions,
            "ms_per_prediction": round(1000 * self.seconds / max(1, self.predictions), 2),
        }


class CpuTimedPredictor:
    """Records the CPU time of every predict call as well: on a shared, busy machine the wall
    time says more about the neighbours than about the model; with one ORT thread, process CPU
    time is the time the prediction takes on one core."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        self.cpu_ms: list[float] = []
        self.wall_ms: list[float] = []

    def predict(self, context: str, k: int = 3):
        c, w = time.process_time(), time.perf_counter()
        out = self.predictor.predict(context, k=k)
        self.cpu_ms.append((time.process_time() - c) * 1000)
        self.wall_ms.append((time.perf_counter() - w) * 1000)
        return out

    def summary(self) -> dict:
        return {
            "predictions": len(self.cpu_ms),
            "cpu_ms_p50": round(percentile(self.cpu_ms, 50), 3),
            "cpu_ms_p95": round(percentile(self.cpu_ms, 95), 3),
            "wall_ms_p50": round(percentile(self.wall_ms, 50), 3),
            "wall_ms_p95": round(percentile(self.wall_ms, 95), 3),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count(),
        }


def capped(messages: list[str], max_words: int) -> list[str]:
    """The leading messages holding `max_words` words; the last one is cut after its
    `max_words`-th word (the typist stops there)."""
    out, n = [], 0
    for m in messages:
        if n >= max_words:
            break
        spans = word_spans(m)
        if n + len(spans) > max_words:
            m = m[: spans[max_words - n - 1][1]]
            spans = spans[: max_words - n]
        out.append(m)
        n += len(spans)
    return out


def evaluate_base(predictor, corpus: Path, max_words: int, log) -> dict:
    results: dict = {}
    everything = Totals()
    for path in source_files(corpus):
        _, held_docs = read_source(path)
        totals, latencies = Totals(), []
        for doc in held_docs:
            if totals.words >= max_words:
                break
            report = simulate(predictor, capped(doc, max_words - totals.words), k=3)
            totals.add(report)
            everything.add(report)
            latencies.append(report.latency_p50_ms)
        results[path.stem] = {**totals.to_json(), "docs_p50_latency_ms": _median(latencies)}
        log(f"base/{path.stem}: {json.dumps(results[path.stem])}")
    results["all"] = everything.to_json()
    return results


def evaluate_users(predictor, users: Path, max_words: int, log) -> dict:
    results: dict = {}
    for path in sorted(users.glob("*.jsonl")):
        history, test = split_history(read_messages(path))
        test = capped(test, max_words)
        report = simulate(predictor, test, history=history, k=3)
        results[path.stem] = {
            **{k: v for k, v in report.to_json().items() if k != "k"},
            "test_lines_typed": len(test),
        }
        log(f"users/{path.stem}: {json.dumps(results[path.stem])}")
    return results


def _median(values: list[float]) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return round(s[len(s) // 2], 3)


def markdown(base: dict, users: dict) -> str:
    lines = ["| text | words | top-1 | top-3 | KSR@3 |", "|---|---:|---:|---:|---:|"]
    for name, r in base.items():
        lines.append(
            f"| base held-out: {name} | {r['words']} | {100 * r['top1']:.1f}% | "
            f"{100 * r['top3']:.1f}% | {100 * r['ksr']:.1f}% |"
        )
    for name, r in users.items():
        lines.append(
            f"| user test split: {name} | {r['words']} | {100 * r['top1']:.1f}% | "
            f"{100 * r['top3']:.1f}% | {100 * r['ksr']:.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(root / "models" / "starter"))
    p.add_argument("--corpus", default=str(root.parent / "shared" / "corpus" / "base"))
    p.add_argument("--users", default=str(root.parent / "shared" / "corpus" / "users"))
    p.add_argument("--max-words", type=int, default=500, help="per source / per user")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-users", action="store_true")
    p.add_argument("--skip-base", action="store_true")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        from wordahead.predict.predictor import Predictor
    except ImportError as exc:
        print(f"wordahead.predict.predictor is not available ({exc})", file=sys.stderr)
        return 1
    try:
        predictor = CpuTimedPredictor(Predictor(Path(args.model), threads=args.threads))
        base = (
            {}
            if args.skip_base
            else evaluate_base(predictor, Path(args.corpus), args.max_words, log)
        )
        users = (
            {}
            if args.skip_users
            else evaluate_users(predictor, Path(args.users), args.max_words, log)
        )
    except KeyboardError as exc:
        print(f"evaluate_starter: {exc}", file=sys.stderr)
        return 1
    timing = predictor.summary()
    result = {
        "model": args.model,
        "max_words": args.max_words,
        "threads": args.threads,
        "base_heldout": base,
        "users_test": users,
        "latency": timing,
    }
    print(markdown(base, users))
    print("latency per predict call (k=3): " + json.dumps(timing))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
