"""A full disk for tests: a small tmpfs mounted where the runner may mount one (root), filled up."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

SIZE = "2m"


def _mount(target: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0700", "tmpfs", str(target)],
        capture_output=True,
    )
    return done.returncode == 0


@contextlib.contextmanager
def small_disk() -> Iterator[Path | None]:
    """A fresh 2 MiB tmpfs (None when this runner may not mount one: the caller simulates)."""
    target = Path(tempfile.mkdtemp(prefix="kbfull", dir="/tmp"))
    mounted = _mount(target)
    try:
        yield target if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
        shutil.rmtree(target, ignore_errors=True)


def fill(disk: Path) -> Path:
    """Take every free byte of `disk` with one file (delete it to make room again)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        block = b"\0" * 65536
        while True:
            try:
                os.write(fd, block)
            except OSError:
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
    finally:
        os.close(fd)
    return filler
