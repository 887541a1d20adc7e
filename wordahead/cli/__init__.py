"""cli: the `keyboard` command; one table of commands, each defined beside its handler."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from wordahead import __version__
from wordahead.cli import daemon, federate, install, learn, model, typing_log
from wordahead.cli.command import Command, Handler
from wordahead.types import KeyboardError

# Every command, in the order `keyboard --help` lists them.
COMMANDS: list[Command] = [
    model.EXPORT,
    typing_log.LOG,
    typing_log.FORGET,
    typing_log.STATS,
    typing_log.PAUSE,
    typing_log.RESUME,
    typing_log.PRIVACY,
    model.EVAL,
    daemon.SERVE,
    daemon.STOP,
    daemon.PREDICT,
    daemon.STATUS,
    daemon.LSP,
    learn.TRAIN,
    learn.ADAPTERS,
    install.SCHEDULE,
    federate.FEDERATE,
    install.LINK,
    install.SERVICE,
    install.UNINSTALL,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyboard", description="Private, personalized next-word prediction."
    )
    parser.add_argument("--version", action="version", version=f"keyboard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_to(sub)
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
