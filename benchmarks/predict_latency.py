"""Predictor latency while typing: replays a real text keystroke by keystroke.

One `predict(text_so_far, k=3)` per typed character, after the user's history as preceding
context:

- in the process, for every combination of threads (1, 2), caches (on, off) and graph (fp32,
  int8), base model: p50/p95/p99/mean milliseconds per keystroke (wall, and CPU time of the
  calling thread: with 1 thread that is the latency on an idle core whatever else the machine
  does), predictions per second, ratios against the baseline of the same run (fp32, 1 thread,
  caches off);
- personalized (an adapter and the phrases of the user's history, as serve_load.py builds
  them), 1 thread, caches on, computing the next keystroke ahead between keystrokes as the
  daemon does while idle (`Predictor.prefetch`, timed apart): the same figures, the share of
  keystrokes that needed no model run, and the CPU time spent ahead;
- over the socket: a daemon serving that personalized version, one client typing at
  `--pause` seconds a keystroke: round-trip p50/p99 and the daemon's CPU per keystroke;
- presage (Debian database, a user model that learned the same history;
  benchmarks/peer_presage.py) typing the same keystrokes in the same run, and the ratios;
- next-word top-1 / top-3 accuracy and KSR@3 of fp32 vs int8 on the same text
  (wordahead.evaluate.simulate.simulate).

    python benchmarks/predict_latency.py [--model models/starter] [--text FILE.jsonl]
        [--chars 1000] [--accuracy-words 1500] [--threads 1,2] [--record] [--no-socket]

--record writes the accuracy comparison to the model's quantization.json, which decides whether
the Predictor uses int8 by default (only if int8 loses no top-3 accuracy).
Target (personalized, over the socket, 1 thread, caches on): p50 <= 2 ms, p99 <= 8 ms.
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
sys.path.insert(0, str(REPO / "benchmarks"))

from wordahead import paths  # noqa: E402
from wordahead.evaluate.harness import read_messages, split_history  # noqa: E402
from wordahead.evaluate.simulate import next_word_ranks, percentile, simulate  # noqa: E402
from wordahead.types import KeyboardError  # noqa: E402

DEFAULT_TEXT = REPO.parent / "shared" / "corpus" / "users" / "president_barack_obama.jsonl"
HISTORY_CHARS = 1000  # preceding text the typed part continues


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def replay(
    predictor: Any, lead: str, typed: str, k: int = 3, ahead: bool = False
) -> dict[str, Any]:
    """predict() after every keystroke of `typed` (preceded by `lead`); latency statistics.
    With `ahead`, the next keystroke is computed ahead after each (not in the latency)."""
    for warm in ("Warming up the ", "session"):  # first-run allocations are not typing
        predictor.predict(warm, k=k)
    engine = predictor._engine
    runs = 0
    session_run = engine.run

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal runs
        runs += 1
        return session_run(*args, **kwargs)

    engine.run = counted
    latencies, cpu, ahead_cpu = [], [], []
    no_run = 0
    started = time.perf_counter()
    for end in range(1, len(typed) + 1):
        context = lead + typed[:end]
        before = runs
        t0, c0 = time.perf_counter(), time.thread_time()
        predictor.predict(context, k=k)
        cpu.append((time.thread_time() - c0) * 1000.0)
        latencies.append((time.perf_counter() - t0) * 1000.0)
        no_run += runs == before
        if ahead:
            c0 = time.thread_time()
            predictor.prefetch(context, k=k)
            ahead_cpu.append((time.thread_time() - c0) * 1000.0)
    seconds = time.perf_counter() - started
    engine.run = session_run
    extra: dict[str, Any] = {"keystrokes_without_model_run": round(no_run / len(cpu), 3)}
    if ahead:
        extra["ahead_cpu_mean_ms"] = round(statistics.fmean(ahead_cpu), 3)
    return {
        **extra,
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


def personalized_runs(
    model: Path, history: list[str], lead: str, typed: str, graphs: list[str]
) -> dict[str, Any]:
    """The user's phrases and an adapter, 1 thread, caches on; with and without computing
    the next keystroke ahead."""
    import numpy as np

    from wordahead.predict.predictor import Predictor
    from wordahead.predict.sources.phrases import PhraseModel

    phrases = PhraseModel.from_texts(history)
    out: dict[str, Any] = {}
    for graph in graphs:
        for ahead in (False, True):
            name = f"personalized/{graph}/threads=1/cache=on" + ("/ahead" if ahead else "")
            log(f"replaying {len(typed)} keystrokes: {name}")
            predictor = Predictor(model, threads=1, quantize=graph == "int8")
            rng = np.random.default_rng(1)
            adapter = {
                n: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32)
                for n, v in predictor.artifacts.initial_adapter().items()
            }
            predictor.load_adapter(adapter, version="bench", phrases=phrases)
            out[name] = replay(predictor, lead, typed, ahead=ahead)
            log(f"  {json.dumps(out[name])}")
    return out


def socket_run(
    model: Path, history: list[str], lead: str, typed: str, pause: float
) -> dict[str, Any]:
    """The same keystrokes over the socket of a personalized daemon, and through presage."""
    import asyncio
    import shutil
    import tempfile

    import serve_load

    from wordahead.model import quantize
    from wordahead.model.artifacts import ArtifactSet

    texts = [lead + typed[:end] for end in range(1, len(typed) + 1)]
    root = Path(tempfile.mkdtemp(prefix="kb-latency", dir="/tmp"))
    out: dict[str, Any] = {"pause_s": pause}
    try:
        serve_load.personalize_home(root / "home", model, history)
        process, sock, _ = serve_load.start_daemon(model, 1, root)
        try:
            asyncio.run(serve_load.level(sock, 1, 20, 3, seed=7000))  # warm-up
            log(f"typing {len(texts)} keystrokes over the socket")
            latencies: list[float] = []
            model_ms: list[float] = []
            cpu0 = serve_load.cpu_s(process.pid)
            errors = asyncio.run(
                serve_load.client(sock, texts, 3, latencies, model_ms, (pause, pause))
            )
            cpu1 = serve_load.cpu_s(process.pid)
            status = serve_load.rpc(sock, "status")
        finally:
            serve_load.stop_daemon(process)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out.update(
        {
            "keystrokes": len(latencies),
            "errors": errors,
            "adapter": status["adapter"]["version"],
            "phrases": status["adapter"]["phrases"],
            "int8": quantize.int8_by_default(ArtifactSet.open(model)),
            "p50_ms": round(percentile(latencies, 50), 3),
            "p95_ms": round(percentile(latencies, 95), 3),
            "p99_ms": round(percentile(latencies, 99), 3),
            "model_p50_ms": round(percentile(model_ms, 50), 3),
            "model_p99_ms": round(percentile(model_ms, 99), 3),
            "daemon_cpu_ms_per_keystroke": round(
                ((cpu1 or 0) - (cpu0 or 0)) * 1000 / len(texts), 3
            ),
        }
    )
    log("presage typing the same keystrokes")
    with tempfile.TemporaryDirectory(prefix="kb-presage", dir="/dev/shm") as work:
        peer = serve_load.presage_peer(history, texts, Path(work))
    out["presage"] = peer
    out["vs_presage"] = {
        "p50_ratio": round(out["p50_ms"] / peer["p50_ms"], 3),
        "p99_ratio": round(out["p99_ms"] / peer["p99_ms"], 3),
        "cpu_per_keystroke_ratio": round(
            out["daemon_cpu_ms_per_keystroke"] / peer["cpu_ms_per_request"], 3
        ),
    }
    return out


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
    parser.add_argument(
        "--paired-words", type=int, default=5000, help="words of the fp32/int8 paired test"
    )
    parser.add_argument("--record", action="store_true", help="write quantization.json")
    parser.add_argument("--pause", type=float, default=0.05, help="s between socket keystrokes")
    parser.add_argument("--no-socket", action="store_true", help="skip the daemon and presage")
    parser.add_argument("--no-accuracy", action="store_true", help="skip fp32 vs int8 accuracy")
    args = parser.parse_args(argv)

    from wordahead.model.artifacts import ArtifactSet
    from wordahead.predict.predictor import Predictor

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
    personalized = personalized_runs(args.model, history, lead, typed, graphs)
    result["latency"].update(personalized)
    base = result["latency"].get("fp32/threads=1/cache=off")
    if base:
        for stats in result["latency"].values():
            stats["p50_vs_baseline"] = round(stats["p50_ms"] / base["p50_ms"], 3)
            stats["throughput_vs_baseline"] = round(
                stats["predictions_per_s"] / base["predictions_per_s"], 3
            )
    if not args.no_socket:
        result["socket"] = socket_run(args.model, history, lead, typed, args.pause)
    accuracy: dict[str, Any] = {}
    scored = take_words(test, args.accuracy_words)
    for graph in [] if args.no_accuracy else graphs:
        log(f"typing {len(scored)} messages for accuracy: {graph}")
        predictor = Predictor(args.model, quantize=graph == "int8")
        report = simulate(predictor, scored, history=history[-20:], k=3)
        accuracy[graph] = {
            key: getattr(report, key) for key in ("words", "top1", "top3", "ksr", "predictions")
        }
        accuracy[graph]["latency_p50_ms"] = round(report.latency_p50_ms, 3)
    result["accuracy"] = accuracy
    if "fp32" in accuracy and "int8" in accuracy:
        from wordahead.model import quantize

        result["int8_top3_delta"] = round(accuracy["int8"]["top3"] - accuracy["fp32"]["top3"], 6)
        # The paired test: every word start of the user's whole test split (and more of the
        # history when that is short of MIN_WORDS), through both graphs.
        paired_text = take_words(test + history, max(args.paired_words, quantize.MIN_WORDS))
        log(f"paired top-3 test on {sum(len(m.split()) for m in paired_text)} words")
        ranks = {
            graph: next_word_ranks(Predictor(args.model, quantize=graph == "int8"), paired_text)
            for graph in ("fp32", "int8")
        }
        result["paired_top3"] = quantize.paired_top3_test(ranks["fp32"], ranks["int8"])
        if args.record:
            record = quantize.write_record(
                artifacts,
                result["paired_top3"],
                accuracy=accuracy,
                text=str(args.text),
                measured_by="benchmarks/predict_latency.py",
            )
            result["recorded"] = {"file": str(args.model / quantize.RECORD_FILE), **record}
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
