"""`keyboard federate`: opt this machine in (or out) and run it as a Flower SuperNode."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from wordahead.federated.local import FederationSettings
from wordahead.paths import Home, default_model_dir
from wordahead.types import KeyboardError


def describe(settings: FederationSettings) -> str:
    """One line for `keyboard status`."""
    if not settings.enabled:
        return "federation  off (keyboard federate --superlink HOST:PORT joins)"
    rounds = f"{settings.rounds} round(s) contributed" if settings.rounds else "no round yet"
    last = f", last {settings.last_round}" if settings.last_round else ""
    return f"federation  on, SuperLink {settings.superlink or '?'}: {rounds}{last}"


def supernode_command(
    settings: FederationSettings,
    home: Path,
    model: Path,
    runtime_port: int,
    allow_plain: bool = False,
) -> list[str]:
    """The flower-supernode command line for this machine (its home and model as node config)."""
    exe = Path(sys.executable).with_name("flower-supernode")
    program = str(exe) if exe.exists() else shutil.which("flower-supernode")
    if program is None:
        raise KeyboardError(
            "Flower is not installed: pip install 'keyboard[federated]' (Python >= 3.11)"
        )
    cmd = [program, "--superlink", settings.superlink, "--port", str(runtime_port)]
    if settings.insecure:
        cmd.append("--insecure")
    elif settings.root_certificates:
        cmd += ["--root-certificates", settings.root_certificates]
    node = f"keyboard-home={json.dumps(str(home))} model={json.dumps(str(model))}"
    if allow_plain:
        node += " allow-plain-updates=true"
    return cmd + ["--node-config", node]


def add_federate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "federate",
        help="help train the shared community adapter (opt-in; only adapter updates leave)",
        description="Join a federation as a Flower SuperNode: this machine trains the community "
        "adapter on its typing log and sends only the clipped, securely aggregated adapter "
        "update. Off until you run this; --off leaves. Without arguments: show the settings.",
    )
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

    def run(args: argparse.Namespace) -> int:
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
        cmd = supernode_command(
            settings, home.root, model, args.runtime_port, args.allow_plain_updates
        )
        print("joining: " + " ".join(cmd), file=sys.stderr)
        # The SuperNode starts Flower's other programs (flower-superexec) from PATH.
        bindir = str(Path(cmd[0]).parent)
        env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
        sys.stdout.flush()
        os.execve(cmd[0], cmd, env)  # the SuperNode takes this process's place (and signals)
        return 1  # not reached

    p.set_defaults(func=run)
