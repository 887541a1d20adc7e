"""Giving freed memory back to the system, so a daemon that runs all day stays its size.

glibc keeps what Python, numpy and ONNX Runtime free in its heaps (one per thread that ever
allocated, up to 8 per core) and gives back only what lies at the top of a heap: every adapter
swap frees an engine's caches, every prediction its temporaries, and a long-running daemon
would keep each one's pages. `limit_arenas` caps the heaps at two and fixes the size from which
blocks are mapped on their own (glibc raises it to the largest block freed, up to 32 MB, so the
key/value arrays of the cache slots would stay in the heaps); `trim` collects reference cycles
and returns the heaps' free pages (after a swap, and when the daemon goes idle). Both do
nothing where the C library is not glibc. `peak_rss_mb` says how large this process got.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from functools import cache
from typing import Any

_M_ARENA_MAX = -8  # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 1024  # blocks this large are mapped, and unmapped when freed


@cache
def _glibc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - absent outside glibc (musl)
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas(count: int = 2) -> bool:
    """At most `count` malloc heaps for all threads, and large blocks always mapped on their
    own (call before starting threads)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(
        libc.mallopt(_M_ARENA_MAX, count) and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    )


def trim(collect: bool = True) -> bool:
    """Free what only reference cycles still hold (`collect`), then return the free pages of
    every malloc heap to the system. The collection holds the interpreter for a moment: after
    an adapter swap (rare) it is affordable; a daemon gone idle trims without it (the C call
    lets other threads run)."""
    if collect:
        gc.collect()
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    VmHWM where /proc has it: `ru_maxrss` survives exec, so a job started by the daemon (or a
    benchmark) would report its parent's peak when that was higher.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
