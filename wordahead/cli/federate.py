"""`keyboard federate`: opt this machine in (or out) and run it as a Flower SuperNode."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from wordahead.cli.command import Command
from wordahead.paths import Home, default_model_dir


def _federate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--superlink", metavar="HOST:PORT", help="the federation's SuperLink")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--root-certificates", metavar="PEM", help="CA of the SuperLink's TLS cert")
    tls.add_argument("--insecure", action="store_true", help="no TLS (loopback and tests only)")
    p.add_argument("--min-new-words", type=int, help="decline runs with less new text (200)")
    p.add_argument("--train-on-battery", action="store_true", help="also train on battery")
    p.add_argument(
        "--model", type=Path, help="the model directory (default: KEYBOARD_MODEL or the starter)"
    )
    p.add_argument("--runtime-port", type=int, default=9094, help="SuperNode's local API port")
    p.add_argument(
        "--allow-plain-updates",
        action="store_true",
        help="also answer servers without SecAgg+ (the server then sees this machine's update)",
    )
    p.add_argument("--off", action="store_true", help="stop taking part (declines every round)")
    p.add_argument("--json", action="store_true", help="print the settings as JSON")


def run_federate(args: argparse.Namespace) -> int:
    # The federation's settings import numpy: only when this command runs.
    from wordahead.federated.join import describe, supernode_command
    from wordahead.federated.local import FederationSettings

    home = Home.from_env()
    settings = FederationSettings.load(home.root)
    changes: dict[str, Any] = {}
    if args.off:
        changes["enabled"] = False
    elif args.superlink:
        changes.update(enabled=True, superlink=args.superlink, insecure=args.insecure)
        changes["root_certificates"] = str(args.root_certificates or "")
    if args.min_new_words is not None:
        changes["min_new_words"] = max(1, args.min_new_words)
    if args.train_on_battery:
        changes["train_on_battery"] = True
    for key, value in changes.items():
        setattr(settings, key, value)
    if changes:
        settings.save(home.root)
    if args.json:
        print(json.dumps(vars(settings), indent=2))
    else:
        print(describe(settings))
    if args.off or not args.superlink:
        return 0
    model = (args.model or default_model_dir()).resolve()
    cmd = supernode_command(settings, home.root, model, args.runtime_port, args.allow_plain_updates)
    print("joining: " + " ".join(cmd), file=sys.stderr)
    # The SuperNode starts Flower's other programs (flower-superexec) from PATH.
    bindir = str(Path(cmd[0]).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    sys.stdout.flush()
    os.execve(cmd[0], cmd, env)  # the SuperNode takes this process's place (and signals)
    return 1  # not reached


FEDERATE = Command(
    "federate",
    help="help train the shared community adapter (opt-in; only adapter updates leave)",
    description="Join a federation as a Flower SuperNode: this machine trains the community "
    "adapter on its typing log and sends only the clipped, securely aggregated adapter "
    "update. Off until you run this; --off leaves. Without arguments: show the settings.",
    arguments=_federate_arguments,
    run=run_federate,
)
