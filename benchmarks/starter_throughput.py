"""Pretraining throughput of scripts/train_starter.py: the recipe now against the script as it was.

Runs, in turns (so a change in the machine's load hits every variant alike), the training
script at a git revision (the baseline: fp32, eager, for-loop AdamW) and the current script with
each speed setting added in turn, on the real base corpus and the same model shape, and prints
JSON: median tokens/s per variant over the logged windows after the first (which holds
start-up and compilation), and the ratio to the baseline measured in the same run.

    python benchmarks/starter_throughput.py [--baseline-rev dec2093] [--steps 60] [--rounds 2]
        [--hidden-size 192 --layers 4 --intermediate-size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "train_starter.py"

# name -> extra arguments of the current script (None: the baseline revision's script)
VARIANTS: dict[str, list[str] | None] = {
    "baseline (revision)": None,
    "fp32, fused AdamW": ["--precision", "fp32", "--compile", "off"],
    "bf16 autocast": ["--precision", "bf16", "--compile", "off"],
    "bf16 + compile": ["--precision", "bf16", "--compile", "on"],
}


def run_variant(script: Path, extra: list[str], args: argparse.Namespace) -> dict:
    """One training run of `args.steps` steps; tokens/s of each logged window after the first."""
    cmd = [
        sys.executable,
        str(script),
        "--corpus", args.corpus, "--work", args.work, "--out", "", "--no-export",
        "--no-checkpoint", "--max-steps", str(args.steps), "--log-every", str(args.log_every),
        "--eval-max-tokens", "1", "--threads", str(args.threads),
        "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
        "--hidden-size", str(args.hidden_size), "--layers", str(args.layers),
        "--heads", str(args.heads), "--intermediate-size", str(args.intermediate_size),
        *extra,
    ]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    windows = []
    for line in proc.stdout.splitlines():
        if line.startswith("{") and '"tokens_per_s"' in line:
            windows.append(json.loads(line)["tokens_per_s"])
    return {"windows": windows[1:], "wall_s": round(time.perf_counter() - t, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline-rev", default="dec2093", help="git revision of the baseline script")
    p.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus" / "base"))
    p.add_argument("--work", default=str(REPO / "data" / "cache" / "starter"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=512)
    args = p.parse_args(argv)

    source = subprocess.run(
        ["git", "show", f"{args.baseline_rev}:scripts/train_starter.py"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    ).stdout
    windows: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "train_starter_baseline.py"
        baseline.write_text(source, encoding="utf-8")
        for _ in range(args.rounds):
            for name, extra in VARIANTS.items():
                script = baseline if extra is None else SCRIPT
                result = run_variant(script, extra or [], args)
                windows[name] += result["windows"]
                print(f"{name}: {result}", file=sys.stderr, flush=True)
    base = statistics.median(windows["baseline (revision)"])
    report = {
        "benchmark": "starter_throughput",
        "baseline_rev": args.baseline_rev,
        "model": {
            "hidden_size": args.hidden_size,
            "layers": args.layers,
            "intermediate_size": args.intermediate_size,
        },
        "batch": [args.batch_size, args.seq_len],
        "threads": args.threads,
        "steps_per_run": args.steps,
        "rounds": args.rounds,
        "load_average": os.getloadavg()[0],
        "variants": {
            name: {
                "tokens_per_s": round(statistics.median(w)),
                "min": round(min(w)),
                "max": round(max(w)),
                "ratio": round(statistics.median(w) / base, 2),
            }
            for name, w in windows.items()
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
