"""Two (or more) starter models side by side, measured the same way in one run.

For each artifact set:
- held-out base-text perplexity: the ORT eval graph's loss on the held-out 1% of every base
  source (the hold-out rule of scripts/train_starter.py), in the same non-overlapping
  128-token windows the training script scores, the first --ppl-tokens tokens per source;
- next-word top-1/top-3 and KSR@3 typing the held-out base text through the Predictor
  (--base-words words per source, each document on its own), as scripts/evaluate_starter.py;
- base KSR@3, top-3 and non-words shown on the first --max-test-lines test lines of every public
  user (history as context, no personalization): what `keyboard eval --max-lines N` reports.
  A non-word is a suggestion neither the shipped lexicon's sources (the base corpus's words
  seen twice, the word lists) nor the user's history hold;
- CPU ms per keystroke (p50/p99, 1 thread, caches on) replaying the same text.

    python benchmarks/starter_compare.py --model old=OLD_DIR --model new=models/starter \
        [--max-test-lines 40] [--jobs 2] [--out compare.json] [--markdown compare.md]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for extra in (REPO, REPO / "scripts", REPO / "benchmarks"):
    sys.path.insert(0, str(extra))

USERS = REPO.parent / "shared" / "corpus" / "users"
BASE = REPO.parent / "shared" / "corpus" / "base"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def perplexity(model_dir: Path, max_tokens: int) -> dict[str, Any]:
    """Held-out loss through the model's own ORT eval graph (the model as shipped)."""
    import numpy as np
    import train_starter as ts

    from wordahead.learn.trainer import LoraTrainer, make_batches
    from wordahead.model.artifacts import ArtifactSet

    artifacts = ArtifactSet.open(model_dir)
    trainer = LoraTrainer(artifacts, threads=1)
    tok = artifacts.tokenizer()
    out: dict[str, Any] = {}
    total_loss = total_tokens = 0.0
    for path in ts.source_files(BASE):
        _, held = ts.read_source(path)
        stream = ts.encode_documents(tok, held)[: max_tokens + 1]
        n = (len(stream) - 1) // 128 * 128  # whole windows only, as train_starter.evaluate
        batches = make_batches(np.asarray(stream[: n + 1]), 128, 16)
        tokens = sum(b.tokens for b in batches)
        loss = trainer.evaluate(batches) * tokens
        out[path.stem] = {"tokens": tokens, "perplexity": round(math.exp(loss / tokens), 2)}
        total_loss += loss
        total_tokens += tokens
    out["all"] = {
        "tokens": int(total_tokens),
        "loss": round(total_loss / total_tokens, 4),
        "perplexity": round(math.exp(total_loss / total_tokens), 2),
    }
    return out


def base_typing(model_dir: Path, max_words: int) -> dict[str, Any]:
    from evaluate_starter import evaluate_base

    from wordahead.predict.predictor import Predictor

    return evaluate_base(Predictor(model_dir, threads=1), BASE, max_words, lambda _: None)["all"]


def user_typing(model_dir: Path, user: Path, max_lines: int, lexicon: Path) -> dict[str, Any]:
    from starter_sizes import real_word_check

    from wordahead.evaluate.harness import read_messages, split_history
    from wordahead.evaluate.simulate import simulate
    from wordahead.predict.lexicon import Lexicon
    from wordahead.predict.predictor import Predictor

    history, test = split_history(read_messages(user))
    report = simulate(
        Predictor(model_dir, threads=1),
        test[:max_lines],
        history=history,
        k=3,
        real_word=real_word_check(Lexicon.load(lexicon), history),
    )
    return {
        "words": report.words,
        "ksr3": round(100 * report.ksr, 2),
        "top3": round(100 * report.top3, 2),
        "nonwords_shown": report.nonwords,
        "cpu_free_p50_ms": round(report.latency_p50_ms, 3),
    }


def keystroke_latency(model_dir: Path, chars: int) -> dict[str, Any]:
    from starter_sizes import latency

    return latency(model_dir, chars)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", default=[], help="NAME=DIR (repeat)")
    p.add_argument("--ppl-tokens", type=int, default=1_000_000, help="held-out tokens per source")
    p.add_argument("--base-words", type=int, default=500, help="held-out words typed per source")
    p.add_argument("--max-test-lines", type=int, default=40)
    p.add_argument("--chars", type=int, default=1500, help="keystrokes replayed for latency")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)

    from starter_sizes import corpus_lexicon

    lexicon = corpus_lexicon(REPO / "data" / "cache" / "lexicon")
    models = {name: Path(d) for name, d in (spec.split("=", 1) for spec in args.model)}
    users = sorted(USERS.glob("*.jsonl"))
    started = time.time()
    rows: dict[str, dict[str, Any]] = {name: {"model": str(d)} for name, d in models.items()}
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {}
        for name, d in models.items():
            futures[(name, "heldout")] = pool.submit(perplexity, d, args.ppl_tokens)
            futures[(name, "base_typing")] = pool.submit(base_typing, d, args.base_words)
            for user in users:
                futures[(name, user.stem)] = pool.submit(
                    user_typing, d, user, args.max_test_lines, lexicon
                )
        for (name, what), future in futures.items():
            result = future.result()
            rows[name].setdefault("users", {})
            if what in ("heldout", "base_typing"):
                rows[name][what] = result
            else:
                rows[name]["users"][what] = result
            log(f"{name} {what}: {json.dumps(result)}")
    # Latency last and one model at a time, so the models do not compete for the CPU.
    for name, d in models.items():
        rows[name]["latency"] = keystroke_latency(d, args.chars)
        log(f"{name} latency: {json.dumps(rows[name]['latency'])}")
    for row in rows.values():
        per_user = row["users"]
        row["users_mean"] = {
            key: round(sum(u[key] for u in per_user.values()) / len(per_user), 2)
            for key in ("ksr3", "top3")
        }
        row["users_mean"]["nonwords_shown"] = sum(u["nonwords_shown"] for u in per_user.values())
    first = next(iter(rows.values()))
    for row in rows.values():
        row["latency"]["cpu_p50_vs_first"] = round(
            row["latency"]["cpu_p50_ms"] / first["latency"]["cpu_p50_ms"], 2
        )
    report = {
        "benchmark": "starter_compare",
        "max_test_lines": args.max_test_lines,
        "ppl_tokens_per_source": args.ppl_tokens,
        "base_words_per_source": args.base_words,
        "seconds": round(time.time() - started, 1),
        "models": rows,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(rows, args.max_test_lines) + "\n")
    return 0


def markdown(rows: dict[str, dict[str, Any]], max_lines: int) -> str:
    names = list(rows)
    out = [
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]

    def line(label: str, get) -> None:
        out.append(f"| {label} | " + " | ".join(str(get(rows[n])) for n in names) + " |")

    line("held-out perplexity (all)", lambda r: r["heldout"]["all"]["perplexity"])
    for src in ("dialogue", "gutenberg", "masc", "speeches"):
        line(f"held-out perplexity ({src})", lambda r, s=src: r["heldout"][s]["perplexity"])
    line("held-out next-word top-1 %", lambda r: round(100 * r["base_typing"]["top1"], 1))
    line("held-out next-word top-3 %", lambda r: round(100 * r["base_typing"]["top3"], 1))
    line("held-out KSR@3 %", lambda r: round(100 * r["base_typing"]["ksr"], 1))
    line(
        f"users KSR@3 %, first {max_lines} test lines (mean of 8)",
        lambda r: r["users_mean"]["ksr3"],
    )
    line("users next-word top-3 % (mean of 8)", lambda r: r["users_mean"]["top3"])
    line("non-words shown to the users", lambda r: r["users_mean"]["nonwords_shown"])
    for user in rows[names[0]]["users"]:
        line(f"KSR@3 % {user}", lambda r, u=user: r["users"][u]["ksr3"])
    line("CPU ms per keystroke, p50", lambda r: r["latency"]["cpu_p50_ms"])
    line("CPU ms per keystroke, p99", lambda r: r["latency"]["cpu_p99_ms"])
    line("p50 vs the first model", lambda r: r["latency"]["cpu_p50_vs_first"])
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
