"""Giving freed memory back to the system, so a daemon that runs all day stays its size.

glibc keeps what Python, numpy and ONNX Runtime free in its heaps (one per thread that ever
allocated, up to 8 per core) and reuses it only for the same sizes: every adapter swap frees
a whole session and a serialized graph, and a long-running daemon would hold each one's pages.
`limit_arenas` caps the heaps at two, `trim` returns their free pages; both do nothing where
the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache
from typing import Any

_M_ARENA_MAX = -8  # mallopt parameter (malloc.h)


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
    """At most `count` malloc heaps for all threads (call before starting threads)."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, count))


def trim() -> bool:
    """Return the free pages of every malloc heap to the system."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))
