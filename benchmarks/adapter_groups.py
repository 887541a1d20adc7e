"""Which adapter groups the nightly job should train: sparse backprop, the PockEngine way.

For each user history (the first 80% of each user file; test lines are never read), the last
--dev-fraction of the history is a dev split and the rest is training text. Each candidate
set of LoRA groups (each group alone, each pair, all) is trained from the initial adapter for
the same short budget (--steps, the job's lr schedule, one thread) with the ORT trainer, and
we record the dev loss gain (nats per token). Then the step time of each set is timed apart:
--timing-rounds rounds, each timing --timing-steps steps of every set in turn, and the fastest
round's median counts (on a shared machine the minimum is the cost of the step itself, not of
the neighbours' load). The chosen set is the one that keeps at least --keep (90%) of the
all-groups gain, mean over users, at the lowest step time. Prints JSON (and a table on stderr).

    nice python benchmarks/adapter_groups.py --model DIR [--users 'blogger_*'] [--steps 60]
        [--lr 0.001] [--max-words 30000] [--out groups.json] [--gains-from groups.json]

`--gains-from` takes the gains of an earlier run's JSON and only times the steps.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_USERS = REPO.parent / "shared" / "corpus" / "users"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def candidate_sets(groups: list[str]) -> list[tuple[str, ...]]:
    sets: list[tuple[str, ...]] = []
    for size in range(1, len(groups) + 1):
        sets += list(itertools.combinations(groups, size))
    return sets


def words_tail(texts: list[str], max_words: int) -> list[str]:
    """The newest texts, up to about `max_words` words (the job trains on recent text)."""
    out: list[str] = []
    n = 0
    for text in reversed(texts):
        if n >= max_words:
            break
        out.append(text)
        n += len(text.split())
    return out[::-1]


def run_set(
    model: Path,
    cache: Path,
    groups: tuple[str, ...],
    train_texts: list[str],
    dev_texts: list[str],
    steps: int,
    lr: float,
    seed: int,
) -> dict[str, Any]:
    from wordahead.learn.trainer import LoraTrainer
    from wordahead.model.artifacts import ArtifactSet

    artifacts = ArtifactSet.open(model)
    trainer = LoraTrainer(
        artifacts, artifacts.initial_adapter(), threads=1, groups=list(groups), cache_dir=cache
    )
    seq_len = artifacts.seq_len
    train = trainer.batches(train_texts, seq_len, 8)
    dev = trainer.batches(dev_texts, seq_len, 8)
    before = trainer.evaluate(dev)
    fit = trainer.fit(
        train, max_steps=steps, lr=lr, warmup=max(1, steps // 10), seed=seed
    )  # no held-out: the full budget, no early stopping
    after = trainer.evaluate(dev)
    elapsed = [h["elapsed"] for h in fit.history]
    step_ms = [1000 * (b - a) for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True)]
    return {
        "groups": "+".join(groups),
        "trainable": sum(int(trainer.state.parameters[n].data.size) for n in trainer.lora_names),
        "dev_loss_before": before,
        "dev_loss_after": after,
        "gain": before - after,
        "ms_per_step": statistics.median(step_ms),
        "steps": fit.steps,
    }


def time_steps(
    model: Path, cache: Path, sets: list[tuple[str, ...]], texts: list[str], rounds: int, steps: int
) -> dict[str, float]:
    """ms per training step of each set: the fastest round's median, rounds interleaved."""
    from wordahead.learn.trainer import LoraTrainer
    from wordahead.model.artifacts import ArtifactSet

    artifacts = ArtifactSet.open(model)
    seq_len = artifacts.seq_len
    best: dict[str, float] = {}
    for _ in range(rounds):
        for groups in sets:
            trainer = LoraTrainer(
                artifacts, artifacts.initial_adapter(), groups=list(groups), cache_dir=cache
            )
            batches = trainer.batches(texts, seq_len, 8)[: steps + 1]
            trainer.train_step(batches[0], 1e-3)  # warm-up: the first step allocates
            times = []
            for batch in batches[1:]:
                t0 = time.perf_counter()
                trainer.train_step(batch, 1e-3)
                times.append(1000 * (time.perf_counter() - t0))
            name = "+".join(groups)
            best[name] = min(best.get(name, float("inf")), statistics.median(times))
            del trainer
    return best


def choose(summary: dict[str, dict[str, float]], keep: float) -> str:
    """The set with at least `keep` of the all-groups gain at the lowest step time."""
    everything = max(summary, key=lambda s: s.count("+"))
    floor = keep * summary[everything]["gain"]
    good = [s for s, m in summary.items() if m["gain"] >= floor]
    return min(good, key=lambda s: summary[s]["ms_per_step"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("users_dir", nargs="?", type=Path, default=DEFAULT_USERS)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--users", default="*.jsonl")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dev-fraction", type=float, default=0.1)
    parser.add_argument("--max-words", type=int, default=30_000, help="training words per user")
    parser.add_argument("--keep", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument("--timing-steps", type=int, default=12)
    parser.add_argument("--gains-from", type=Path, help="an earlier run's JSON: time steps only")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from wordahead.evaluate.harness import read_messages, split_history
    from wordahead.model.artifacts import ArtifactSet
    from wordahead.model.training_graphs import groups_of

    groups = list(groups_of(ArtifactSet.open(args.model)))
    sets = candidate_sets(groups)
    files = sorted(p for p in args.users_dir.glob(args.users) if p.is_file())
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if args.gains_from:
        rows = json.loads(args.gains_from.read_text())["rows"]
    timing_texts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="keyboard-groups-") as cache:
        for path in files if not args.gains_from else []:
            history, _ = split_history(read_messages(path))  # the test lines are never used
            n_dev = max(1, int(len(history) * args.dev_fraction))
            train, dev = history[:-n_dev], history[-n_dev:]
            train = words_tail(train, args.max_words)
            for groups_set in sets:
                row = run_set(
                    args.model, Path(cache), groups_set, train, dev, args.steps, args.lr, args.seed
                )
                row["file"] = path.name
                rows.append(row)
                log(
                    f"{path.name} {row['groups']}: dev loss {row['dev_loss_before']:.4f} -> "
                    f"{row['dev_loss_after']:.4f} (gain {row['gain']:.4f}), "
                    f"{row['ms_per_step']:.0f} ms/step, {row['trainable']:,} parameters"
                )
        history, _ = split_history(read_messages(files[0]))
        timing_texts = words_tail(history, 20_000)
        step_ms = time_steps(
            args.model, Path(cache), sets, timing_texts, args.timing_rounds, args.timing_steps
        )
        log(f"ms per step (fastest of {args.timing_rounds} rounds): {step_ms}")
    summary: dict[str, dict[str, float]] = {}
    for name in ("+".join(s) for s in sets):
        mine = [r for r in rows if r["groups"] == name]
        gain = statistics.mean(r["gain"] for r in mine)
        ms = step_ms[name]
        summary[name] = {
            "gain": round(gain, 5),
            "ms_per_step": round(ms, 1),
            "ms_per_step_while_training": round(statistics.mean(r["ms_per_step"] for r in mine), 1),
            "gain_per_ms": round(gain / ms, 7),
            "trainable": mine[0]["trainable"],
        }
    chosen = choose(summary, args.keep)
    everything = "+".join(groups)
    report = {
        "benchmark": "adapter_groups",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": round(time.perf_counter() - started, 1),
        "summary": summary,
        "chosen": chosen,
        "all": everything,
        "chosen_vs_all": {
            "gain_ratio": round(summary[chosen]["gain"] / summary[everything]["gain"], 3),
            "ms_per_step": [summary[chosen]["ms_per_step"], summary[everything]["ms_per_step"]],
        },
        "rows": rows,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    log("\n| groups | trainable | dev loss gain | ms/step | gain per ms |")
    log("|---|---:|---:|---:|---:|")
    for name, m in summary.items():
        mark = " **(chosen)**" if name == chosen else ""
        log(
            f"| {name}{mark} | {m['trainable']:,} | {m['gain']:.4f} | {m['ms_per_step']:.0f} "
            f"| {m['gain_per_ms'] * 1000:.3f}e-3 |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
