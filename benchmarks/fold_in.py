"""Tune the fold-in of the held-out slice (JobConfig.fold_in_epochs, fold_in_lr) on the users'
history only: no test line is read.

Each user file's history (its first 80% of lines) is split once more by the same rule: the
personalization job runs on its first 80% in a throwaway home with the fold-in off, and the
loss per token of the text that follows (the first --max-lines of the last 20%: what the
user typed next) is measured with the base model, with the adapter the gate passed, and with
that adapter after each fold-in setting (LoraTrainer.fold_in over the job's own held-out
slice, as the job does it). Loss, not KSR: it is cheap, and every token counts; the chosen
setting is then checked for KSR with `personalization.py --dev`. Prints a line per user on
stderr and JSON on stdout.

    nice python benchmarks/fold_in.py [USERS_DIR] [--model models/starter]
        [--settings 1x0.001,2x0.001,3x0.001,1x0.003] [--max-lines 40] [--users '*.jsonl']

A setting ExL is E passes over the held-out slice at a peak learning rate of L.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_USERS = REPO.parent / "shared" / "corpus" / "users"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def user_losses(
    path: Path, model: Path, settings: list[tuple[float, float]], max_lines: int
) -> dict[str, Any]:
    """Loss per token on the user's dev lines: base, gated adapter, each fold-in setting."""
    from wordahead.evaluate.harness import history_and_typed, personalize_in_throwaway_home
    from wordahead.learn.adapter_store import AdapterStore
    from wordahead.learn.job_log import JobLog
    from wordahead.learn.policy import JobConfig
    from wordahead.learn.trainer import LoraTrainer
    from wordahead.model.artifacts import ArtifactSet
    from wordahead.paths import Home
    from wordahead.store.typing_log import TypingLog

    train, dev = history_and_typed(path, dev=True, max_lines=max_lines)
    artifacts = ArtifactSet.open(model)
    with tempfile.TemporaryDirectory(prefix="keyboard-bench-fold-in-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir(mode=0o700)
        config = JobConfig.update(home / "personalize.json", fold_in_epochs=0.0)
        job = personalize_in_throwaway_home(train, model, home)
        with TypingLog(Home.at(home).typing_log) as typing_log:
            typing_log.set_watermark(0)  # the job's own split of the same entries
            heldout = (
                JobLog(typing_log)
                .training_text(
                    replay_fraction=config.replay_fraction,
                    holdout_fraction=config.holdout_fraction,
                    max_new_words=config.max_new_words,
                )
                .heldout
            )
        trainer = LoraTrainer(artifacts, cache_dir=Home.at(home).training_graphs)
        dev_batches = trainer.batches(dev, artifacts.seq_len, config.batch_size)
        loss = {"base": trainer.evaluate(dev_batches)}
        if job.adapter_path is not None:
            store = AdapterStore.in_home(Home.at(home), artifacts)
            gated = store.load(job.version)
            trainer.set_adapter(gated)
            loss["gated"] = trainer.evaluate(dev_batches)
            for epochs, lr in settings:
                trainer.set_adapter(gated)
                trainer.fold_in(
                    heldout, epochs=epochs, lr=lr, seq_len=artifacts.seq_len,
                    batch_size=config.batch_size, seed=1,
                )  # fmt: skip
                loss[f"{epochs:g}x{lr:g}"] = trainer.evaluate(dev_batches)
    return {"file": path.name, "job": job.status, "dev_lines": len(dev), "loss": loss}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("users_dir", nargs="?", type=Path, default=DEFAULT_USERS)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "starter")
    parser.add_argument("--settings", default="1x0.001,2x0.001,3x0.001,1x0.003,2x0.003")
    parser.add_argument("--max-lines", type=int, default=40)
    parser.add_argument("--users", default="*.jsonl")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    settings = [(float(e), float(lr)) for e, lr in (s.split("x") for s in args.settings.split(","))]
    results = []
    for path in sorted(args.users_dir.glob(args.users)):
        results.append(user_losses(path, args.model, settings, args.max_lines))
        log(f"{path.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in results[-1]["loss"].items()))
    adapted = [r for r in results if "gated" in r["loss"]]
    names = list(adapted[0]["loss"])[1:] if adapted else []
    gain = {  # loss change from the base model, mean over the users with an adapter
        name: round(sum(r["loss"][name] - r["loss"]["base"] for r in adapted) / len(adapted), 4)
        for name in names
    }
    log("mean loss change from base: " + ", ".join(f"{k} {v:+.4f}" for k, v in gain.items()))
    out = {"benchmark": "fold_in", "settings": vars(args) | {"users_dir": str(args.users_dir),
           "model": str(args.model)}, "results": results, "mean_loss_change": gain}  # fmt: skip
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
