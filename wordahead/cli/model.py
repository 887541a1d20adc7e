"""`keyboard export` and `eval`: make a model's artifacts, and measure what it saves."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from wordahead.cli.command import MODEL_HELP, Command, model_dir
from wordahead.paths import Home
from wordahead.types import KeyboardError

if TYPE_CHECKING:
    from wordahead.evaluate.harness import FileEvaluation

# The export (torch) and the predictor (ONNX Runtime) are imported by the commands that use
# them: `keyboard --help` and everything on the device side stay torch-free.


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", required=True, help="local Hugging Face model dir or hub id")
    p.add_argument("--out", required=True, help="output directory for the artifact set")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default %(default)s)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default %(default)s)")
    p.add_argument(
        "--target-modules",
        default="auto",
        help="comma-separated module names to adapt instead of --groups (default: auto)",
    )
    p.add_argument(
        "--groups",
        default="attention,mlp,lm_head",
        help="adapter groups that get LoRA: attention, mlp (projections of every layer in "
        "--layers), lm_head (the output projection, tied to the embedding)",
    )
    p.add_argument(
        "--train-groups",
        default="mlp,lm_head",
        help="the groups the nightly job trains by default, of those exported (default: "
        "mlp,lm_head; '' for all; measure with benchmarks/adapter_groups.py)",
    )
    p.add_argument(
        "--layers",
        default="all",
        help="which layers carry adapters: all, top:N, or 0,2,5 (default %(default)s)",
    )
    p.add_argument(
        "--seq-len", type=int, default=64, help="training sequence length (default %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0)


def run_export(args: argparse.Namespace) -> int:
    from wordahead.model.export import ExportConfig, export_model

    config = ExportConfig(
        rank=args.rank,
        alpha=args.alpha,
        target_modules=args.target_modules,
        groups=args.groups,
        train_groups=args.train_groups,
        layers=args.layers,
        seq_len=args.seq_len,
        seed=args.seed,
    )
    manifest = export_model(args.base_model, args.out, config)
    print(f"exported {manifest['base_model']['id']} -> {args.out}")
    print(
        f"  {len(manifest['lora']['tensors'])} LoRA tensors, "
        f"{manifest['lora']['parameters']:,} trainable parameters; groups: "
        + ", ".join(f"{g} ({len(n)})" for g, n in manifest["lora"]["groups"].items())
    )
    return 0


EXPORT = Command(
    "export",
    help="export a causal LM with LoRA adapters to ORT artifacts",
    arguments=_export_arguments,
    run=run_export,
)


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "file", metavar="FILE", help='plain text (a message per line) or JSONL {"ts", "text"}'
    )
    p.add_argument("--k", type=int, default=3, help="suggestions shown (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument(
        "--max-lines",
        type=int,
        default=None,
        metavar="N",
        help="type only the first N evaluated messages (faster; history stays whole)",
    )
    p.add_argument("--plot", default=None, metavar="FILE", help="write a PNG of the metrics")
    p.add_argument(
        "--personalize",
        action="store_true",
        help="train on the first 80%% of lines with the personalization job in a throwaway "
        "home, and report the last 20%% before and after",
    )
    p.add_argument("--threads", type=int, default=1, help="inference threads (default %(default)s)")
    p.add_argument(
        "--adapter",
        default=None,
        metavar="active|base|VERSION",
        help="the adapter to type with (default: active, the one the daemon serves; with "
        "--personalize, base)",
    )
    p.add_argument(
        "--phrases",
        action="store_true",
        help="also type with phrase completion (ghost text, the daemon's settings): KSR with "
        "phrases, trigger rate, precision",
    )
    p.add_argument(
        "--slips",
        type=float,
        default=None,
        metavar="RATE",
        help="type with slips of the finger at RATE per letter (e.g. 0.03), with typo "
        "correction off and on: the word meant in the top 3 after one slip, false "
        "corrections, KSR clean and with slips (wordahead/evaluate/noise.py)",
    )
    p.add_argument(
        "--misspellings",
        default=None,
        metavar="FILE",
        help="with --slips: real misspellings to type ('meant: typed, typed' lines)",
    )


def run_eval(args: argparse.Namespace) -> int:
    from wordahead.evaluate.harness import evaluate_file, plot_reports, report_table
    from wordahead.predict.sources.phrase_completion import PhraseSettings

    model = model_dir(args)
    if args.slips is not None:
        return _eval_slips(args, model)

    def progress(stage: str, done: int, total: int) -> None:
        if sys.stderr.isatty():
            end = "\n" if done == total else ""
            print(f"\r{stage}: {done}/{total} messages", end=end, file=sys.stderr, flush=True)

    choice = args.adapter or ("base" if args.personalize else "active")
    if args.personalize and choice != "base":
        raise KeyboardError("--personalize trains from the base model; leave out --adapter")
    result = evaluate_file(
        args.file,
        model,
        adapter=choice,
        home=Home.from_env(),
        k=args.k,
        max_lines=args.max_lines,
        personalize=args.personalize,
        threads=args.threads,
        progress=progress,
        phrases=PhraseSettings() if args.phrases else None,
    )
    rows = {result.served: result.before}
    if result.after is not None:
        rows["personalized"] = result.after
    if args.plot:
        plot_reports({Path(args.file).stem: rows}, args.plot, title=Path(args.file).name)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    print(
        f"{result.file}: {result.messages} messages; typed {result.evaluated}"
        + (f" after {result.history} of history" if result.history else "")
    )
    print(report_table(rows))
    if result.phrases_before is not None:
        _print_phrases(result)
    if result.job_seconds is not None:
        print(
            f"personalization job: {result.job_status}; {result.job_seconds:.1f} s, "
            f"peak RSS {result.peak_rss_mb:.0f} MB (whole process)"
        )
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def _eval_slips(args: argparse.Namespace, model: Path) -> int:
    from wordahead.evaluate.harness import served_adapter
    from wordahead.evaluate.noise import typo_comparison

    if not 0.0 <= args.slips <= 1.0:
        raise KeyboardError(f"--slips is a rate per letter from 0 to 1 (got {args.slips})")
    if args.personalize:
        raise KeyboardError("--slips types with a stored adapter (--adapter), not --personalize")
    served = served_adapter(Home.from_env(), model, args.adapter or "active")
    misspellings = Path(args.misspellings) if args.misspellings else None
    result = typo_comparison(
        Path(args.file), model, served, args.slips, k=args.k, max_lines=args.max_lines,
        threads=args.threads, misspellings=misspellings,
    )  # fmt: skip
    if args.json:
        print(json.dumps({"file": args.file, "adapter": served.version, **result}, indent=2))
        return 0
    metrics = ("slip_top3", "false_corrections", "ksr_clean", "ksr_noisy", "latency_p50_ms")
    print(f"{args.file}: adapter {served.version}, slips at {args.slips:g} per letter")
    print(f"{'':8}" + "".join(f"{m:>19}" for m in metrics))
    for name, report in result.items():
        print(f"{name:8}" + "".join(f"{report[m]:>19.4f}" for m in metrics))
    return 0


def _print_phrases(result: FileEvaluation) -> None:
    from wordahead.evaluate.phrase_typist import phrase_table

    assert result.phrases_before is not None  # typed with phrases
    rows = {result.served: result.phrases_before}
    if result.phrases_after is not None:
        rows["personalized"] = result.phrases_after
    print("with phrases (ghost text; '1 word': words of a phrase taken one by one):")
    print(phrase_table(rows))


EVAL = Command(
    "eval",
    help="simulate typing a user's text: next-word accuracy, keystroke savings, latency",
    description="Types FILE through the Predictor the daemon uses and reports next-word "
    "top-1/top-3 accuracy, keystroke savings rate (KSR) with k suggestions and latency "
    "percentiles (definitions: docs/evaluation.md).",
    arguments=_eval_arguments,
    run=run_eval,
)
