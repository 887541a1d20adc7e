"""Taking part in a federation: what `keyboard status` says of it, and the Flower SuperNode
command `keyboard federate` runs (wordahead.cli.federate)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from wordahead.federated.local import FederationSettings
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
            "Flower is not installed: pip install 'wordahead[federated]' (Python >= 3.11)"
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
