"""systemd user units: where they live, whether a user manager runs, systemctl, the settings
a unit must carry."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from wordahead.types import KeyboardError

SYSTEMCTL_TIMEOUT_S = 20


def unit_dir() -> Path:
    """Where systemd looks for user units: $XDG_CONFIG_HOME/systemd/user."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user"


def user_manager_available() -> bool:
    """True when a systemd user manager answers (absent in containers, on macOS, over some ssh)."""
    if shutil.which("systemctl") is None:
        return False
    try:
        done = subprocess.run(
            ["systemctl", "--user", "show-environment"],
            capture_output=True,
            timeout=SYSTEMCTL_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def systemctl(*args: str) -> None:
    """`systemctl --user ARGS`; a failure is a KeyboardError with systemd's message."""
    done = subprocess.run(
        ["systemctl", "--user", *args], capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S
    )
    if done.returncode != 0:
        raise KeyboardError(
            f"`systemctl --user {' '.join(args)}` failed: {done.stderr.strip() or done.returncode}"
        )


def captured_environment() -> dict[str, str]:
    """Settings a unit must see as this shell does (systemd starts it with a bare environment)."""
    keep = ("KEYBOARD_HOME", "KEYBOARD_MODEL", "HF_HUB_OFFLINE")
    return {k: os.environ[k] for k in keep if os.environ.get(k)}


def unit_escape(text: str) -> str:
    """`text` as a unit file value: systemd expands `%` specifiers (`%h`: the home
    directory) in ExecStart= and Environment=, so a literal `%` is written `%%`."""
    return text.replace("%", "%%")


def exec_start(command: list[str]) -> str:
    """The ExecStart= line that runs `command` as given (quoted, specifiers escaped)."""
    return f"ExecStart={unit_escape(shlex.join(command))}\n"


def environment_lines(env: dict[str, str]) -> str:
    """One Environment= line per setting, quoted and with specifiers escaped."""
    return "".join(
        f"Environment={unit_escape(shlex.quote(f'{k}={v}'))}\n" for k, v in sorted(env.items())
    )


def cron_escape(text: str) -> str:
    """`text` in a crontab command: cron turns an unescaped `%` into a newline."""
    return text.replace("%", "\\%")
