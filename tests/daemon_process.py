"""A real daemon in a child process for tests, started as a user would (`keyboard serve`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from wordahead.daemon.client import DaemonClient, DaemonNotRunning

READY_TIMEOUT_S = 60.0


@dataclass
class Served:
    """A daemon running as a child process."""

    process: subprocess.Popen[bytes]
    socket: Path
    home: Path
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def short_dir() -> Path:
    """A directory whose paths fit in sun_path (108 bytes; pytest's tmp_path can be too long)."""
    return Path(tempfile.mkdtemp(prefix="kb", dir="/tmp"))


def daemon_env(home: Path, model: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, KEYBOARD_HOME=str(home), KEYBOARD_MODEL=str(model))
    env.pop("KEYBOARD_SOCKET", None)
    env.pop("XDG_RUNTIME_DIR", None)
    env.update(extra)
    return env


def start_daemon(
    model: Path,
    home: Path,
    socket_path: Path | None,
    *,
    umask: int | None = None,
    wait: bool = True,
    **env: str,
) -> Served:
    """`python -m wordahead serve --foreground` on `model` with its own home (and socket)."""
    log = home.parent / f"daemon-{time.monotonic_ns()}.log"
    args = [sys.executable, "-m", "wordahead", "serve", "--foreground"]
    if socket_path is not None:
        args += ["--socket", str(socket_path)]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args,
            env=daemon_env(home, model, **env),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,  # noqa: PLW1509
        )
    served = Served(process, socket_path or Path(), home, log)
    if wait:
        wait_ready(served)
    return served


def wait_ready(served: Served) -> None:
    """Until this daemon (not another one on the same socket) answers `status`."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            raise AssertionError(f"daemon exited early:\n{served.output()}")
        try:
            with DaemonClient(served.socket, timeout=5) as client:
                if client.call("status")["pid"] == served.process.pid:
                    return
        except (DaemonNotRunning, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"daemon not ready:\n{served.output()}")


def serve(model: Path) -> Iterator[Served]:
    """A daemon on `model` in a fresh short directory, for a fixture: yields, then stops it."""
    root = short_dir()
    served = start_daemon(model, root / "home", root / "kb.sock")
    try:
        yield served
    finally:
        served.stop()
        shutil.rmtree(root, ignore_errors=True)
