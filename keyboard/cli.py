"""The `keyboard` command line: parses arguments and hands off to the module that does the work."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from keyboard.types import KeyboardError

Handler = Callable[[argparse.Namespace], int]


# --- export (issue: Foundation) -------------------------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a causal LM with LoRA adapters to ORT artifacts")
    p.add_argument("--base-model", required=True, help="local Hugging Face model dir or hub id")
    p.add_argument("--out", required=True, help="output directory for the artifact set")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument(
        "--target-modules",
        default="auto",
        help="comma-separated module names to adapt (default: attention projections)",
    )
    p.add_argument(
        "--layers", default="all", help="which layers carry adapters: all, top:N, or 0,2,5"
    )
    p.add_argument("--seq-len", type=int, default=64, help="training sequence length")
    p.add_argument("--seed", type=int, default=0)

    def run(args: argparse.Namespace) -> int:
        from keyboard.export import ExportConfig, export_model

        config = ExportConfig(
            rank=args.rank,
            alpha=args.alpha,
            target_modules=args.target_modules,
            layers=args.layers,
            seq_len=args.seq_len,
            seed=args.seed,
        )
        manifest = export_model(args.base_model, args.out, config)
        print(f"exported {manifest['base_model']['id']} -> {args.out}")
        print(f"  {len(manifest['lora']['tensors'])} LoRA tensors, "
              f"{manifest['lora']['parameters']:,} trainable parameters")
        return 0

    p.set_defaults(func=run)


# --- eval (issue 9) ---------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="simulate typing a user's text: next-word accuracy, keystroke savings, latency",
        description="Types FILE through the Predictor the daemon uses and reports next-word "
        "top-1/top-3 accuracy, keystroke savings rate (KSR) with k suggestions and latency "
        "percentiles (definitions: docs/evaluation.md).",
    )
    p.add_argument(
        "file", metavar="FILE", help='plain text (a message per line) or JSONL {"ts", "text"}'
    )
    p.add_argument("--k", type=int, default=3, help="suggestions shown (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--model", default=None, help="model directory (default: the starter model)")
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
    p.add_argument("--threads", type=int, default=1, help="inference threads (default 1)")

    def run(args: argparse.Namespace) -> int:
        import json
        from pathlib import Path

        from keyboard import evaluation, paths

        model_dir = Path(args.model) if args.model else paths.starter_model_dir()

        def progress(stage: str, done: int, total: int) -> None:
            if sys.stderr.isatty():
                end = "\n" if done == total else ""
                print(f"\r{stage}: {done}/{total} messages", end=end, file=sys.stderr, flush=True)

        result = evaluation.evaluate_file(
            args.file,
            model_dir,
            k=args.k,
            max_lines=args.max_lines,
            personalize=args.personalize,
            threads=args.threads,
            progress=progress,
        )
        rows = {"base": result.before}
        if result.after is not None:
            rows["personalized"] = result.after
        if args.plot:
            evaluation.plot_reports(
                {Path(args.file).stem: rows}, args.plot, title=Path(args.file).name
            )
        if args.json:
            print(json.dumps(result.to_json(), indent=2))
            return 0
        print(
            f"{result.file}: {result.messages} messages; typed {result.evaluated}"
            + (f" after {result.history} of history" if result.history else "")
        )
        print(evaluation.report_table(rows))
        if result.job_seconds is not None:
            print(
                f"personalization job: {result.job_seconds:.1f} s, "
                f"peak RSS {result.peak_rss_mb:.0f} MB (whole process)"
            )
        if args.plot:
            print(f"plot: {args.plot}")
        return 0

    p.set_defaults(func=run)


# Each area adds its commands here; keep a section per module.
_SECTIONS: list[Callable[[argparse._SubParsersAction], None]] = [_add_export, _add_eval]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyboard", description="Private, personalized next-word prediction."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SECTIONS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except KeyboardError as exc:
        print(f"keyboard: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
