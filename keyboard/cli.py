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


# Each area adds its commands here; keep a section per module.
_SECTIONS: list[Callable[[argparse._SubParsersAction], None]] = [_add_export]


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
