"""Predictor latency while typing: replays a real text keystroke by keystroke.

One `predict(text_so_far, k=3)` per typed character, after the user's history as preceding
context, for every combination of threads (1, 2), caches (on, off) and graph (fp32, int8). Prints
JSON: p50/p95/p99/mean milliseconds per keystroke and predictions per second for each, ratios
against the baseline measured in the same run (fp32, 1 thread, caches off), and next-word top-1 /
top-3 accuracy and KSR@3 of fp32 vs int8 on the same text (keyboard.evaluation.simulate).

    python benchmarks/predict_latency.py [--model models/starter] [--text FILE.jsonl]
        [--chars 1000] [--accuracy-words 1500] [--threads 1,2] [--record]

--record writes the accuracy comparison to the model's quantization.json, which decides whether
the Predictor uses int8 by default (only if int8 loses no top-3 accuracy).
Target with the starter model: p50 <= 3 ms, p99 <= 10 ms per keystroke on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from keyboard import paths  # noqa: E402
from keyboard.evaluation import percentile, read_messages, simulate, split_history  # noqa: E402
from keyboard.types import KeyboardError  # noqa: E402

DEFAULT_TEXT = REPO.parent / "shared" / "corpus" / "users" / "president_barack_obama.jsonl"
HISTORY_CHARS = 1000  # preceding text the typed part continues


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def replay(predictor: Any, lead: str, typed: str, k: int = 3) -> dict[str, Any]:
    """predict() after every keystroke of `typed` (preceded by `lead`); latency statistics."""
    for warm in ("Warming up the ", "session"):  # first-run allocations are not typing
        predictor.predict(warm, k=k)
    latencies, cpu = [], []
    started = time.perf_counter()
    for end in range(1, len(typed) + 1):
        context = lead + typed[:end]
        t0, c0 = time.perf_counter(), time.thread_time()
        predictor.predict(context, k=k)
        cpu.append((time.thread_time() - c0) * 1000.0)
        latencies.append((time.perf_counter() - t0) * 1000.0)
    seconds = time.perf_counter() - started
    return {
        "keystrokes": len(latencies),
        "p50_ms": round(percentile(latencies, 50), 3),
        "p95_ms": round(percentile(latencies, 95), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
        "mean_ms": round(statistics.fmean(latencies), 3),
        "max_ms": round(max(latencies), 3),
        "predictions_per_s": round(len(latencies) / seconds, 1),
        # CPU time of the calling thread: with 1 thread ORT computes on it, so this is the
        # latency on one idle core, whatever else the machine is doing (not with 2 threads).
        "cpu_p50_ms": round(percentile(cpu, 50), 3),
        "cpu_p95_ms": round(percentile(cpu, 95), 3),
        "cpu_p99_ms": round(percentile(cpu, 99), 3),
    }


def take_words(messages: list[str], words: int) -> list[str]:
    """The first messages holding about `words` words."""
    out, count = [], 0
    for message in messages:
        if count >= words:
            break
        out.append(message)
        count += len(message.split())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=paths.default_model_dir())
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="a user's JSONL file")
    parser.add_argument("--chars", type=int, default=1000, help="keystrokes replayed per setting")
    parser.add_argument("--accuracy-words", type=int, default=1500)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--graphs", default="fp32,int8")
    parser.add_argument("--record", action="store_true", help="write quantization.json")
    args = parser.parse_args(argv)

    from keyboard.artifacts import ArtifactSet
    from keyboard.predictor import Predictor

    if not (args.model / "manifest.json").is_file():
        log(f"no model at {args.model}: train it (scripts/train_starter.py) or pass --model DIR")
        return 2
    try:
        messages = read_messages(args.text)
    except KeyboardError as exc:
        log(str(exc))
        return 2
    history, test = split_history(messages)
    lead = "\n".join(history)[-HISTORY_CHARS:] + "\n"
    typed = "\n".join(test)[: args.chars]
    artifacts = ArtifactSet.open(args.model)
    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()]
    threads = [int(t) for t in args.threads.split(",")]
    result: dict[str, Any] = {
        "model": str(args.model),
        "model_name": artifacts.name,
        "parameters": artifacts.manifest["base_model"].get("parameters"),
        "vocab_size": artifacts.manifest["base_model"].get("vocab_size"),
        "text": str(args.text),
        "typed_chars": len(typed),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_start": [round(x, 2) for x in os.getloadavg()],
        },
        "latency": {},
    }
    for graph in graphs:
        for n in threads:
            for cache in (True, False):
                name = f"{graph}/threads={n}/cache={'on' if cache else 'off'}"
                log(f"replaying {len(typed)} keystrokes: {name}")
                predictor = Predictor(args.model, threads=n, quantize=graph == "int8", cache=cache)
                result["latency"][name] = replay(predictor, lead, typed)
                log(f"  {json.dumps(result['latency'][name])}")
    base = result["latency"].get("fp32/threads=1/cache=off")
    if base:
        for stats in result["latency"].values():
            stats["p50_vs_baseline"] = round(stats["p50_ms"] / base["p50_ms"], 3)
            stats["throughput_vs_baseline"] = round(
                stats["predictions_per_s"] / base["predictions_per_s"], 3
            )
    accuracy: dict[str, Any] = {}
    scored = take_words(test, args.accuracy_words)
    for graph in graphs:
        log(f"typing {len(scored)} messages for accuracy: {graph}")
        predictor = Predictor(args.model, quantize=graph == "int8")
        report = simulate(predictor, scored, history=history[-20:], k=3)
        accuracy[graph] = {
            key: getattr(report, key) for key in ("words", "top1", "top3", "ksr", "predictions")
        }
        accuracy[graph]["latency_p50_ms"] = round(report.latency_p50_ms, 3)
    result["accuracy"] = accuracy
    if "fp32" in accuracy and "int8" in accuracy:
        from keyboard import quantize

        result["int8_top3_delta"] = round(accuracy["int8"]["top3"] - accuracy["fp32"]["top3"], 6)
        if args.record:
            record = quantize.write_record(
                artifacts,
                accuracy["fp32"],
                accuracy["int8"],
                text=str(args.text),
                measured_by="benchmarks/predict_latency.py",
            )
            result["recorded"] = {"file": str(args.model / quantize.RECORD_FILE), **record}
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
