"""Where keyboard keeps its state: the keyboard home, the database, adapters, the socket."""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "keyboard"


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) readable by the user only (0700), and return it."""
    old = os.umask(0o077)
    try:
        path.mkdir(parents=True, exist_ok=True)
    finally:
        os.umask(old)
    os.chmod(path, 0o700)
    return path


def home() -> Path:
    """The keyboard home: `$KEYBOARD_HOME`, else the platform's user data dir. Created 0700."""
    override = os.environ.get("KEYBOARD_HOME")
    if override:
        base = Path(override).expanduser()
    else:
        import platformdirs

        base = Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
    return private_dir(base)


def database_path() -> Path:
    """The typing log's SQLite file."""
    return home() / "typing_log.db"


def adapters_dir() -> Path:
    """Where adapter versions live."""
    return private_dir(home() / "adapters")


def socket_path() -> Path:
    """The daemon's Unix socket: `$KEYBOARD_SOCKET`, else `$XDG_RUNTIME_DIR/keyboard/`, else the home."""
    override = os.environ.get("KEYBOARD_SOCKET")
    if override:
        return Path(override).expanduser()
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return private_dir(Path(runtime_dir) / APP_NAME) / "keyboard.sock"
    return home() / "keyboard.sock"


def repo_root() -> Path:
    """The source checkout (or installed tree) that holds `models/`."""
    return Path(__file__).resolve().parent.parent


def starter_model_dir() -> Path:
    """The shipped starter model: `$KEYBOARD_MODEL` overrides it."""
    override = os.environ.get("KEYBOARD_MODEL")
    if override:
        return Path(override).expanduser()
    return repo_root() / "models" / "starter"
