"""Where keyboard keeps its state: the keyboard home, the database, adapters, the socket."""

from __future__ import annotations

import os
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Home:
    """One user's keyboard home and the files in it. Resolved once (`from_env`) where the
    program starts, then passed to what keeps state there: nothing else reads the environment.
    """

    root: Path

    @classmethod
    def at(cls, root: str | Path) -> Home:
        """The home at `root`, created 0700 if it does not exist."""
        return cls(private_dir(Path(root).expanduser()))

    @classmethod
    def from_env(cls) -> Home:
        return cls(home())

    @property
    def typing_log(self) -> Path:
        """The typing log's SQLite file."""
        return self.root / "typing_log.db"

    @property
    def adapters(self) -> Path:
        """Where adapter versions live (a store per model inside)."""
        return private_dir(self.root / "adapters")

    @property
    def job_config(self) -> Path:
        """The personalization job's settings."""
        return self.root / "personalize.json"

    @property
    def job_lock(self) -> Path:
        """Held by the personalization job while it runs."""
        return self.root / "personalize.lock"

    @property
    def daemon_lock(self) -> Path:
        """Held by the daemon serving this home."""
        return self.root / "daemon.lock"

    @property
    def daemon_log(self) -> Path:
        """Where a daemon started in the background writes its log."""
        return self.root / "daemon.log"


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


def default_model_dir() -> Path:
    """The model to serve and train when none is named: `$KEYBOARD_MODEL`, else the shipped
    starter model."""
    override = os.environ.get("KEYBOARD_MODEL")
    if override:
        return Path(override).expanduser()
    return starter_model_dir()


def starter_model_dir() -> Path:
    """The starter model shipped in `models/starter`."""
    return repo_root() / "models" / "starter"
