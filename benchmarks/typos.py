"""Typo tolerance: today's predictor against typo correction, on clean and slipped typing.

For each public user (../shared/corpus/users/*.jsonl), the first `--max-lines` lines typed
after the history (the test lines, or with `--dev` the last fifth of the history: tune on
those only), the base model and the user's personalized model (the nightly job's result in
`--homes`/USER/job.json, as benchmarks/personalization.py serves it) are each typed with
corrections off ("today") and on, by the noisy typist of wordahead.evaluate.noise: one slip
in each word of 4+ letters (is the word meant in the top 3?), false corrections on clean
text, KSR@3 clean and at `--rate` slips per letter (the same slips for both), latency.

    python benchmarks/typos.py [--dev] [--max-lines 40] [--rate 0.03] [--users 'blogger_*']
        [--homes /tmp/trained-homes/test] [--no-personal] [--misspellings FILE] [--max-chars N]
        [--presage]
    python benchmarks/typos.py --socket [--chars 600] [--rounds 2] [--pause 0.05]

--socket: latency per keystroke over the socket instead: a daemon (base model) with
KEYBOARD_TYPOS=off and one with corrections on, in turns (`--rounds` each, so a change in the
machine's load falls on both), one client typing the same keystrokes of the first user's test
text (clean, as people mostly type) at `--pause` seconds a keystroke; p50/p95 and the ratio.

Prints JSON on stdout (per user and the means); progress on stderr. Heavy: `nice -n 10`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from wordahead.evaluate.harness import history_and_typed  # noqa: E402
from wordahead.evaluate.noise import Slips, read_misspellings, typo_report  # noqa: E402
from wordahead.predict.layouts import layout  # noqa: E402
from wordahead.predict.predictor import Predictor  # noqa: E402
from wordahead.predict.sources.phrases import PhraseModel  # noqa: E402
from wordahead.predict.sources.typos import TypoSettings  # noqa: E402

USERS = REPO.parent / "shared" / "corpus" / "users"
MODEL = REPO / "models" / "starter"
SEED = 26


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def personal(predictor: Predictor, home: Path) -> str:
    """Serve the user's nightly result from `home`/job.json; what was served."""
    job = json.loads((home / "job.json").read_text())
    metrics = job.get("metrics", {})
    adapter = job["adapter_path"] if job["status"] == "promoted" else None
    if "phrases_only" in metrics:
        adapter = None
    phrases = PhraseModel.load(job["phrases_path"]) if job.get("phrases_path") else None
    predictor.load_adapter(adapter, phrases=phrases)
    return f"adapter {'yes' if adapter else 'no'}, phrases {'yes' if phrases else 'no'}"


def first_chars(lines: list[str], limit: int | None) -> list[str]:
    """The first lines up to `limit` characters in all (the last one cut at a space)."""
    if limit is None:
        return lines
    out: list[str] = []
    left = limit
    for line in lines:
        if left <= 0:
            break
        if len(line) > left:
            cut = line.rfind(" ", 0, left)
            line = line[: cut if cut > 0 else left]
        out.append(line)
        left -= len(line) + 1
    return out


def presage_report(
    history: list[str], typed: list[str], args: argparse.Namespace, misspellings: Any
) -> dict[str, Any]:
    """presage (Debian's database, a user model that learned the history) on the same slips."""
    import tempfile

    from peer_presage import learned_presage

    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="typos-presage-", dir=shm) as work:
        presage = learned_presage(history, Path(work))
        try:
            slips = Slips(layout(args.layout), SEED, misspellings)
            report = typo_report(presage, typed, history=history, rate=args.rate, slips=slips)
        finally:
            presage.close()
    log(f"presage: {report.to_json()}")
    return report.to_json()


def run_user(path: Path, args: argparse.Namespace, predictors: dict[str, Predictor]) -> dict:
    history, typed = history_and_typed(path, dev=args.dev, max_lines=args.max_lines)
    typed = first_chars(typed, args.max_chars)
    misspellings = read_misspellings(args.misspellings) if args.misspellings else None
    out: dict[str, Any] = {"user": path.stem, "lines": len(typed), "chars": sum(map(len, typed))}
    if args.presage:
        out["presage"] = presage_report(history, typed, args, misspellings)
    served = ["base"] if args.no_personal else ["base", "personal"]
    for model in served:
        for name, predictor in predictors.items():
            if model == "personal":
                out["personal_served"] = personal(predictor, args.homes / path.stem)
            else:
                predictor.load_adapter(None)
            slips = Slips(layout(args.layout), SEED, misspellings)
            report = typo_report(
                predictor, typed, history=history, rate=args.rate, slips=slips,
                is_word=predictor.is_real_word,
            )  # fmt: skip
            out[f"{model}/{name}"] = report.to_json()
            log(f"{path.stem} {model}/{name}: {report.to_json()}")
    return out


def means(results: list[dict]) -> dict[str, dict[str, float]]:
    keys = sorted({k for r in results for k, v in r.items() if isinstance(v, dict)})
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        rows = [r[key] for r in results if key in r]
        out[key] = {
            m: round(statistics.fmean(row[m] for row in rows), 6)
            for m in ("slip_top3", "false_corrections", "ksr_clean", "ksr_noisy", "latency_p50_ms")
        }
        out[key]["ksr_lost"] = round(out[key]["ksr_clean"] - out[key]["ksr_noisy"], 6)
    return out


def socket_latency(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio
    import os
    import shutil
    import tempfile

    import serve_load

    from wordahead.evaluate.simulate import percentile

    path = sorted(USERS.glob(args.users))[0]
    history, typed = history_and_typed(path, dev=args.dev, max_lines=args.max_lines)
    text = "\n".join(typed)[: args.chars]
    lead = "\n".join(history)[-1000:] + "\n"
    texts = [lead + text[:end] for end in range(1, len(text) + 1)]
    runs: dict[str, list[float]] = {"today": [], "typos": []}
    for round_ in range(args.rounds):
        for name, setting in (("today", "off"), ("typos", "on")):
            os.environ["KEYBOARD_TYPOS"] = setting
            root = Path(tempfile.mkdtemp(prefix="kb-typos", dir="/tmp"))
            try:
                process, sock, _ = serve_load.start_daemon(args.model, 1, root)
                try:
                    asyncio.run(serve_load.level(sock, 1, 20, 3, seed=7000))  # warm-up
                    latencies: list[float] = []
                    asyncio.run(
                        serve_load.client(sock, texts, 3, latencies, [], (args.pause, args.pause))
                    )
                finally:
                    serve_load.stop_daemon(process)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            runs[name] += latencies
            log(f"round {round_ + 1} {name}: p50 {percentile(latencies, 50):.2f} ms")
    out: dict[str, Any] = {"user": path.stem, "keystrokes": len(texts), "rounds": args.rounds}
    for name, latencies in runs.items():
        out[name] = {
            "p50_ms": round(percentile(latencies, 50), 3),
            "p95_ms": round(percentile(latencies, 95), 3),
        }
    out["p50_ratio"] = round(out["typos"]["p50_ms"] / out["today"]["p50_ms"], 3)
    return out


def tuned(args: argparse.Namespace, **changes: Any) -> TypoSettings:
    return replace(TypoSettings(layout=args.layout), **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dev", action="store_true", help="type the dev lines (for tuning)")
    parser.add_argument("--max-lines", type=int, default=40)
    parser.add_argument(
        "--max-chars", type=int, default=None, help="only the first lines up to N characters"
    )
    parser.add_argument("--rate", type=float, default=0.03, help="slips per letter")
    parser.add_argument("--users", default="*.jsonl")
    parser.add_argument(
        "--homes", type=Path, default=None, help="default /tmp/trained-homes/{dev,test}"
    )
    parser.add_argument("--no-personal", action="store_true")
    parser.add_argument(
        "--presage", action="store_true", help="presage (benchmarks/setup_presage.sh) as well"
    )
    parser.add_argument("--layout", default="qwerty")
    parser.add_argument("--misspellings", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument(
        "--settings", action="append", default=None,
        help='TypoSettings changes as JSON, e.g. {"keep_literal": 3} (repeat: one run each)',
    )  # fmt: skip
    parser.add_argument("--socket", action="store_true", help="latency over the socket only")
    parser.add_argument("--chars", type=int, default=600, help="--socket: keystrokes typed")
    parser.add_argument("--rounds", type=int, default=2, help="--socket: runs of each daemon")
    parser.add_argument("--pause", type=float, default=0.05, help="--socket: s per keystroke")
    args = parser.parse_args(argv)
    if args.socket:
        print(json.dumps(socket_latency(args), indent=1))
        return 0
    if args.homes is None:
        args.homes = Path("/tmp/trained-homes") / ("dev" if args.dev else "test")
    predictors = {"today": Predictor(args.model, typos=TypoSettings(enabled=False))}
    for i, changes in enumerate(args.settings or ["{}"]):
        name = "typos" if i == 0 else f"typos {changes}"
        predictors[name] = Predictor(args.model, typos=tuned(args, **json.loads(changes)))
    results = [run_user(path, args, predictors) for path in sorted(USERS.glob(args.users))]
    print(json.dumps({"settings": vars(args) | {"homes": str(args.homes), "model": str(args.model),
                      "misspellings": str(args.misspellings)},
                      "means": means(results), "users": results}, indent=1, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
