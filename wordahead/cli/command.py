"""What every `keyboard` command is made of, and the options several of them share."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wordahead import paths

Handler = Callable[[argparse.Namespace], int]
MODEL_HELP = "model directory (default: $KEYBOARD_MODEL, else the starter model)"


def no_arguments(parser: argparse.ArgumentParser) -> None:
    """For a command that takes none."""


@dataclass(frozen=True)
class Command:
    """One `keyboard` command: its name, its help, the arguments it takes and its handler."""

    name: str
    help: str
    run: Handler
    arguments: Callable[[argparse.ArgumentParser], None] = no_arguments
    description: str | None = None  # the command's own --help, when longer than `help`

    def add_to(self, sub: argparse._SubParsersAction) -> None:
        parser = sub.add_parser(self.name, help=self.help, description=self.description)
        self.arguments(parser)
        parser.set_defaults(func=self.run)


def model_dir(args: argparse.Namespace) -> Path:
    """The model a command works on: --model, else $KEYBOARD_MODEL, else the starter model."""
    return Path(args.model).expanduser() if args.model else paths.default_model_dir()


def add_socket(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket", default=None, help="the daemon's socket (default: KEYBOARD_SOCKET or standard)"
    )


def socket_path(args: argparse.Namespace) -> Path:
    """The daemon's socket: --socket, else KEYBOARD_SOCKET, else the standard place."""
    return Path(args.socket).expanduser() if args.socket else paths.socket_path()


def print_changes(changes: Any) -> None:
    """What an install step did, then its notes."""
    for line in [*changes.done, *changes.notes]:
        print(line)
