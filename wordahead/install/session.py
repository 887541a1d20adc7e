"""keyboard in the user's session: the command on PATH, the daemon as a systemd user service,
and taking them away again (uninstall; the keyboard home only when the user confirms)."""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from wordahead.install.systemd import (
    captured_environment,
    environment_lines,
    exec_start,
    systemctl,
    unit_dir,
    user_manager_available,
)
from wordahead.paths import Home, keyboard_command
from wordahead.types import KeyboardError

SERVICE = "keyboard.service"  # the daemon; the nightly job is timer.UNIT

# Every path keyboard makes in a home, relative to it (regular expressions over the whole
# path). A home holding anything else, at any depth, is not deleted wholesale.
_ATOMIC = r"(?:\.[^/]+\.tmp)?"  # the temp file of an atomic write beside any of them
_DAMAGED = r"(?:\.damaged)?"  # a derived file found damaged and set aside
_STORE = r"adapters/[^/]+"  # one store per model
_VERSION = r"(?:v\d{4,}|\.tmp-v\d{4,}-[^/]+|\.trash-v\d{4,})"  # whole, being written, pruned
_GRAPHS = r"cache/training/(?:[\w+]+-[0-9a-f]{16}" + _DAMAGED + r"|\.partial-[^/]+)"
HOME_FILES = tuple(
    re.compile(pattern)
    for pattern in (
        r"typing_log\.db(?:-wal|-shm|-journal)?",
        r"(?:\.?)(?:personalize|federated)\.json" + _ATOMIC,
        r"personalize\.lock|daemon\.lock|job-failure\.json",
        r"daemon\.log(?:\.1)?|daemon\.pid|keyboard\.sock|keyboard\.pid",
        r"adapters|" + _STORE,
        _STORE + r"/(?:\.lock|\.?ACTIVE" + _ATOMIC + r")",
        _STORE + r"/" + _VERSION + r"(?:/(?:adapter\.npz|meta\.json|phrases\.zlib))?",
        r"models|models/[0-9a-f]{16}",
        r"models/[0-9a-f]{16}/\.?inference\.int8(?:-7bit)?\.onnx(?:\.sha256)?" + _ATOMIC + _DAMAGED,
        r"cache|cache/training|" + _GRAPHS,
        _GRAPHS + r"/[^/]+",  # the graphs, their checksum, ORT's own files while made
    )
)


def keyboard_made(relative: str) -> bool:
    """Whether keyboard makes the entry at `relative` (a path inside a home, `/`-separated)."""
    return any(pattern.fullmatch(relative) for pattern in HOME_FILES)


def foreign_entries(root: Path) -> list[str]:
    """The entries under `root` keyboard did not make, as paths relative to it, at any
    depth (a directory of them is named once); symbolic links are never keyboard's."""
    foreign: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath).relative_to(root)
        for name in sorted(dirnames):
            relative = (here / name).as_posix()
            if (Path(dirpath) / name).is_symlink() or not keyboard_made(relative):
                foreign.append(relative + ("" if (Path(dirpath) / name).is_symlink() else "/"))
                dirnames.remove(name)  # named once; its contents are not keyboard's either
        for name in sorted(filenames):
            relative = (here / name).as_posix()
            if (Path(dirpath) / name).is_symlink() or not keyboard_made(relative):
                foreign.append(relative)
    return sorted(foreign)


@dataclass
class Changes:
    """What a command did, for a person to read."""

    done: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- the command on PATH ------------------------------------------------------------------------
def installed_command() -> Path:
    """The `keyboard` script of this installation (the virtualenv's), whatever is on PATH."""
    return Path(sys.executable).parent / "keyboard"


def default_link_dir() -> Path:
    """Where `link` puts the command: ~/.local/bin (on PATH in most desktop sessions)."""
    return Path.home() / ".local" / "bin"


def command_name() -> str:
    """How to run this installation's command from a shell: "keyboard" when PATH finds it,
    else its full path."""
    found = shutil.which("keyboard")
    target = installed_command()
    if found and Path(found).resolve() == target.resolve():
        return "keyboard"
    return str(target)


def link(directory: Path | None = None) -> Changes:
    """Put `keyboard` on PATH: a symlink in `directory` to this installation's script. A link
    to another keyboard is replaced; any other file there is left alone (an error)."""
    directory = directory or default_link_dir()
    target = installed_command()
    if not target.is_file():
        raise KeyboardError(f"{target} does not exist: run this from keyboard's virtualenv")
    path = directory / "keyboard"
    changes = Changes()
    if path.is_symlink():
        if path.resolve() == target.resolve():
            changes.done.append(f"{path} already points to {target}")
        else:
            path.unlink()
    elif path.exists():
        raise KeyboardError(f"{path} exists and is not a link; move it away first")
    if not path.is_symlink():
        directory.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
        changes.done.append(f"linked {path} -> {target}")
    if not _on_path(directory):
        changes.notes.append(
            f"{directory} is not on your PATH; add it, for example:\n"
            f"  echo 'export PATH=\"{directory}:$PATH\"' >> ~/.profile   (then log in again)"
        )
    return changes


def unlink(directory: Path | None = None) -> Changes:
    """Remove the link `link` made (only a link to this installation's script)."""
    path = (directory or default_link_dir()) / "keyboard"
    changes = Changes()
    if path.is_symlink() and path.resolve() == installed_command().resolve():
        path.unlink()
        changes.done.append(f"removed the link {path}")
    return changes


def _on_path(directory: Path) -> bool:
    entries = os.environ.get("PATH", "").split(os.pathsep)
    return any(e and Path(e).expanduser().resolve() == directory.resolve() for e in entries)


# --- the daemon as a systemd user service ---------------------------------------------------
def service_text(model_dir: Path | None = None, socket: Path | None = None) -> str:
    """The user unit that runs the daemon in the foreground; systemd restarts it if it fails.

    Not socket-activated: the daemon binds its socket itself (0600 from the first moment,
    after checking that no other daemon answers there) and holds the home's lock; a socket
    systemd created would skip both checks.
    """
    command = keyboard_command("serve", "--foreground")
    if model_dir is not None:
        command += ["--model", str(model_dir)]
    if socket is not None:
        command += ["--socket", str(socket)]
    env = {**captured_environment(), "MALLOC_ARENA_MAX": "2"}
    if os.environ.get("KEYBOARD_SOCKET"):
        env["KEYBOARD_SOCKET"] = os.environ["KEYBOARD_SOCKET"]
    return (
        "[Unit]\n"
        "Description=keyboard: private next-word prediction (the daemon)\n"
        "\n[Service]\n"
        "Type=simple\n"
        f"{exec_start(command)}"
        f"{environment_lines(env)}"
        "Restart=on-failure\n"
        "RestartSec=2\n"
        "TimeoutStopSec=30\n"  # SIGTERM: requests in flight finish first
        "\n[Install]\n"
        "WantedBy=default.target\n"
    )


def install_service(
    model_dir: Path | None = None, socket: Path | None = None, enable: bool = True
) -> Changes:
    """Write keyboard.service into the user unit directory and, with `enable`, start it now
    and at every login."""
    path = unit_dir() / SERVICE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(service_text(model_dir, socket))
    changes = Changes(done=[f"wrote {path}"])
    if enable and user_manager_available():
        systemctl("daemon-reload")
        systemctl("enable", "--now", SERVICE)
        changes.done.append(
            f"enabled and started {SERVICE} (see `systemctl --user status keyboard`)"
        )
    else:
        changes.notes.append(f"start it with `systemctl --user enable --now {SERVICE}`")
    return changes


def remove_service(enable: bool = True) -> Changes:
    """Stop and disable keyboard.service and delete its unit file."""
    path = unit_dir() / SERVICE
    changes = Changes()
    if not path.exists():
        return changes
    if enable and user_manager_available():
        try:
            systemctl("disable", "--now", SERVICE)
        except KeyboardError as exc:
            changes.notes.append(str(exc))
    path.unlink()
    changes.done.append(f"removed {path}")
    if enable and user_manager_available():
        systemctl("daemon-reload")
    return changes


# --- uninstall ------------------------------------------------------------------------------
def delete_home(home: Home) -> Changes:
    """Delete the keyboard home: the typing log, adapters, settings. Refused when it holds
    anything keyboard did not put there, at any depth (a KEYBOARD_HOME pointed at another
    directory, a file saved among the adapters). A home that is a symbolic link: its
    directory is deleted, then the link."""
    link = home.root if home.root.is_symlink() else None
    root = home.root.resolve()
    if not root.is_dir():
        return Changes()
    foreign = foreign_entries(root)
    if foreign:
        more = f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
        raise KeyboardError(
            f"{home.root} holds files keyboard did not make ({', '.join(foreign[:10])}{more}); "
            "not deleting it: move those away, or remove what is keyboard's by hand"
        )
    shutil.rmtree(root)
    done = [f"deleted {root} (typing log, adapters, settings)"]
    if link is not None:
        link.unlink()
        done.append(f"removed the link {link}")
    return Changes(done=done)
