"""Tune how much recently typed text counts in the live phrases (live_phrases.RECENT_BOOST), on
the users' history only: no test line is read.

Each user file's history (its first 80% of lines) is split once more by the same rule: the
user phrases are counted from its first 80% (what the nightly job would have stored), and its
last 20% (the first --max-lines of them) are typed through the base model with those phrases,
once without learning (nightly only) and once per boost with each message learned right after
it is typed, as the daemon's `observe` does. Prints a table on stderr and JSON on stdout: KSR@3
per user and boost, and the mean paired gain over nightly only.

    nice python benchmarks/recent_boost.py [USERS_DIR] [--model models/starter]
        [--boosts 1,3,10] [--max-lines 20] [--users '*.jsonl']
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_USERS = REPO.parent / "shared" / "corpus" / "users"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def user_ksr(path: Path, model: Path, boosts: list[float], max_lines: int) -> dict[str, Any]:
    """KSR@3 on the user's dev lines: nightly only, then learning as you type per boost."""
    from wordahead.evaluate.harness import history_and_typed
    from wordahead.evaluate.simulate import simulate
    from wordahead.predict.predictor import Predictor
    from wordahead.predict.sources.live_phrases import LivePhrases
    from wordahead.predict.sources.phrases import PhraseModel

    train, dev = history_and_typed(path, dev=True, max_lines=max_lines)
    stored = PhraseModel.from_texts(train)
    predictor = Predictor(model, threads=1)
    predictor.load_adapter(None, phrases=stored)
    ksr = {"nightly": simulate(predictor, dev, history=train).ksr}
    for boost in boosts:
        live = LivePhrases(stored, recent_boost=boost)
        predictor.load_adapter(None, phrases=live)

        def learn(message: str, live: LivePhrases = live) -> None:
            live.learn(message)
            predictor.user_phrases_changed()

        ksr[f"boost {boost:g}"] = simulate(predictor, dev, history=train, after_message=learn).ksr
    return {"file": path.name, "dev_lines": len(dev), "ksr": ksr}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("users_dir", nargs="?", type=Path, default=DEFAULT_USERS)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "starter")
    parser.add_argument("--boosts", default="1,3,10")
    parser.add_argument("--max-lines", type=int, default=20)
    parser.add_argument("--users", default="*.jsonl")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    boosts = [float(b) for b in args.boosts.split(",")]
    results = []
    for path in sorted(args.users_dir.glob(args.users)):
        results.append(user_ksr(path, args.model, boosts, args.max_lines))
        log(
            f"{path.name}: "
            + ", ".join(f"{k} {100 * v:.2f}" for k, v in results[-1]["ksr"].items())
        )
    names = list(results[0]["ksr"]) if results else []
    mean = {
        name: round(100 * sum(r["ksr"][name] for r in results) / len(results), 3) for name in names
    }
    gain = {
        name: {
            "mean": round(mean[name] - mean["nightly"], 3),
            "positive": sum(r["ksr"][name] > r["ksr"]["nightly"] for r in results),
        }
        for name in names[1:]
    }
    log("mean KSR@3: " + ", ".join(f"{k} {v:.2f}" for k, v in mean.items()))
    out = {"benchmark": "recent_boost", "settings": vars(args) | {"users_dir": str(args.users_dir),
           "model": str(args.model)}, "results": results, "mean_ksr": mean, "gain": gain}  # fmt: skip
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
