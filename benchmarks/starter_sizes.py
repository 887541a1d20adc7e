"""The starter model's size trade-off: held-out perplexity, KSR@3 and latency per candidate.

Each candidate is a run directory of scripts/train_starter.py (its HF checkpoint in
RUN/keyboard-starter). For each one this exports the checkpoint (cached in RUN/export),
then measures, in one process and one run:

- held-out base-text perplexity and token top-3 (the script's hold-out rule and `evaluate`),
  on the first --eval-tokens tokens of every source's held-out stream;
- KSR@3, next-word top-3 and non-words offered on the users' *dev* lines: the last
  --dev-lines messages of each public user's history (the first 80% of the file), typed after
  the rest of that history. Test lines are never read, so the choice does not tune on them;
- p50/p99 milliseconds per keystroke of the Predictor (1 thread, caches on, as the daemon
  serves), replaying the same typed text for every candidate (benchmarks/predict_latency.py).

Prints JSON and, with --plot, draws the trade-off (perplexity and KSR@3 against p50).

    python benchmarks/starter_sizes.py --run A=DIR --run B=DIR ... [--baseline models/starter]
        [--plot docs/starter_sizes.png] [--out sizes.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))

USERS = REPO.parent / "shared" / "corpus" / "users"
BASE = REPO.parent / "shared" / "corpus" / "base"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def corpus_lexicon(cache: Path) -> Path:
    """The lexicon train_starter.py ships (the base corpus's words and the default word lists),
    built once into `cache`."""
    import train_starter as ts

    path = cache / "lexicon-dictionaries.txt.gz"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        ts.write_lexicon(BASE, path, dictionaries=ts.dictionaries(ts.parser().parse_args([])))
    return path


def export_run(run: Path, lexicon: Path) -> Path:
    """The run's checkpoint as an artifact set with the lexicon (re-exported when newer)."""
    import shutil

    from wordahead.model.export import ExportConfig, export_model

    hf = run / "keyboard-starter"
    out = run / "export"
    stamp = (hf / "training.json").stat().st_mtime
    if not (out / "manifest.json").is_file() or (out / "manifest.json").stat().st_mtime < stamp:
        export_model(hf, out, ExportConfig(target_modules="q_proj,k_proj,v_proj,o_proj"))
    shutil.copyfile(lexicon, out / "lexicon.txt.gz")
    return out


def heldout_quality(hf: Path, eval_tokens: int) -> dict[str, Any]:
    """Token-level loss/perplexity/top-3 on the held-out 1% of every base source."""
    import numpy as np
    import torch
    import train_starter as ts
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)  # two OpenMP threads crawl on a busy 2-core machine
    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    total, tokens, top3 = 0.0, 0, 0.0
    for path in ts.source_files(BASE):
        _, held = ts.read_source(path)
        stream = ts.encode_documents(tok, held)
        m = ts.evaluate(model, np.asarray(stream), 128, eval_tokens)
        total += m["loss"] * m["tokens"]
        top3 += m["token_top3"] * m["tokens"]
        tokens += m["tokens"]
    return {
        "tokens": tokens,
        "loss": round(total / tokens, 4),
        "perplexity": round(math.exp(total / tokens), 2),
        "token_top3": round(top3 / tokens, 4),
    }


def real_word_check(corpus_words: Any, history: list[str]) -> Any:
    """Is a suggestion a word? Non-words are those neither the base corpus (its lexicon) nor the
    user's history holds."""
    from wordahead.predict.words import words as words_of

    own = {w.lower() for m in history for w in words_of(m)}
    return lambda w: w in corpus_words or w.lower() in own


def dev_typing(model_dir: Path, dev_lines: int, lexicon: Path) -> dict[str, Any]:
    """KSR@3, top-3 and non-words shown on the last dev_lines messages of every user's history.

    A non-word is a suggestion that neither the base corpus nor the user's history holds."""
    from wordahead.evaluate.harness import read_messages, split_history
    from wordahead.evaluate.simulate import simulate
    from wordahead.predict.lexicon import Lexicon
    from wordahead.predict.predictor import Predictor

    predictor = Predictor(model_dir, threads=1)
    corpus_words = Lexicon.load(lexicon)
    chars = keystrokes = words = nonwords = 0
    top3 = 0.0
    per_user = {}
    for path in sorted(USERS.glob("*.jsonl")):
        history, _test = split_history(read_messages(path))
        context, dev = history[:-dev_lines], history[-dev_lines:]
        r = simulate(
            predictor, dev, history=context, k=3, real_word=real_word_check(corpus_words, context)
        )
        nonwords += r.nonwords
        per_user[path.stem] = round(100 * r.ksr, 2)
        chars += r.chars
        keystrokes += r.keystrokes
        words += r.words
        top3 += r.top3 * r.words
    return {
        "words": words,
        "ksr3": round(100 * (1 - keystrokes / chars), 2),
        "top3": round(100 * top3 / words, 2),
        "nonwords_shown": nonwords,
        "per_user_ksr3": per_user,
    }


def latency(model_dir: Path, chars: int) -> dict[str, Any]:
    """Per-keystroke latency, 1 thread, caches on: the same replay as predict_latency.py."""
    from predict_latency import HISTORY_CHARS, replay

    from wordahead.evaluate.harness import read_messages, split_history
    from wordahead.predict.predictor import Predictor

    history, test = split_history(read_messages(USERS / "president_barack_obama.jsonl"))
    lead = "\n".join(history)[-HISTORY_CHARS:] + "\n"
    typed = "\n".join(test)[:chars]
    r = replay(Predictor(model_dir, threads=1), lead, typed)
    return {k: r[k] for k in ("p50_ms", "p99_ms", "cpu_p50_ms", "cpu_p99_ms")}


def plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, row in rows.items():
        x = row["latency"]["cpu_p50_ms"]
        label = f"{name} ({row['parameters'] / 1e6:.1f}M)"
        axes[0].scatter(x, row["heldout"]["perplexity"])
        axes[0].annotate(label, (x, row["heldout"]["perplexity"]), fontsize=8)
        axes[1].scatter(x, row["dev"]["ksr3"])
        axes[1].annotate(label, (x, row["dev"]["ksr3"]), fontsize=8)
    axes[0].set_ylabel("held-out base-text perplexity (lower is better)")
    axes[1].set_ylabel("KSR@3 on the users' dev lines, % (higher is better)")
    for ax in axes:
        ax.set_xlabel("Predictor p50 ms per keystroke (CPU time, 1 thread)")
        ax.grid(alpha=0.3)
    fig.suptitle("Starter model candidates")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR (repeat)")
    p.add_argument("--baseline", type=Path, help="an exported artifact set measured alongside")
    p.add_argument("--eval-tokens", type=int, default=20000, help="held-out tokens per source")
    p.add_argument("--dev-lines", type=int, default=6)
    p.add_argument("--chars", type=int, default=800, help="keystrokes replayed for latency")
    p.add_argument("--plot", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    rows: dict[str, dict[str, Any]] = {}
    started = time.time()
    lexicon = corpus_lexicon(REPO / "data" / "cache" / "lexicon")
    candidates = [tuple(spec.split("=", 1)) for spec in args.run]
    for name, run_dir in candidates:
        run = Path(run_dir)
        info = json.loads((run / "keyboard-starter" / "training.json").read_text())
        log(f"{name}: exporting {run}")
        model_dir = export_run(run, lexicon)
        row: dict[str, Any] = {
            "run": str(run),
            "parameters": info["parameters"],
            "shape": {
                k: info["config"][k]
                for k in ("hidden_size", "num_layers", "intermediate_size", "num_heads")
            },
            "step": info["step"],
            "tokens_seen": info.get("tokens_seen"),
            "train_tokens_per_s": info.get("last", {}).get("tokens_per_s"),
        }
        log(f"{name}: held-out perplexity")
        row["heldout"] = heldout_quality(run / "keyboard-starter", args.eval_tokens)
        log(f"{name}: dev typing")
        row["dev"] = dev_typing(model_dir, args.dev_lines, lexicon)
        row["latency"] = latency(model_dir, args.chars)
        log(f"{name}: {json.dumps(row)}")
        rows[name] = row
    if args.baseline:
        base = {"parameters": None, "run": str(args.baseline)}
        base["dev"] = dev_typing(args.baseline, args.dev_lines, lexicon)
        base["latency"] = latency(args.baseline, args.chars)
        rows["baseline"] = base
        ref = base["latency"]["cpu_p50_ms"]
        for row in rows.values():
            row["latency"]["p50_vs_baseline"] = round(row["latency"]["cpu_p50_ms"] / ref, 2)
    report = {
        "benchmark": "starter_sizes",
        "dev_lines_per_user": args.dev_lines,
        "eval_tokens_per_source": args.eval_tokens,
        "seconds": round(time.time() - started, 1),
        "candidates": rows,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.plot:
        plot({k: v for k, v in rows.items() if "heldout" in v}, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
