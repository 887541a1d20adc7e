"""Keyboard layouts as key positions, for the typo model: which keys are neighbours.

A slip of the finger most often hits a key next to the one meant, so a substitution by a
neighbour costs less than any other (wordahead.predict.slips). Each layout is its three letter
rows with their stagger (in key widths, as on a laptop: the home row a quarter key right of the
top row, the bottom row three quarters); two keys are neighbours when their centres are at most
1.25 key widths apart (the same row side by side, or the rows above and below touching).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from wordahead.types import KeyboardError

# Row stagger in key widths, top to bottom (letter rows only).
_STAGGER = (0.0, 0.25, 0.75)
NEIGHBOUR_DISTANCE = 1.25

ROWS: dict[str, tuple[str, str, str]] = {
    "qwerty": ("qwertyuiop", "asdfghjkl;'", "zxcvbnm,./"),
    "qwertz": ("qwertzuiopü", "asdfghjklöä", "yxcvbnm,.-"),
    "azerty": ("azertyuiop", "qsdfghjklmù", "wxcvbn,;:!"),
    "dvorak": ("',.pyfgcrl", "aoeuidhtns-", ";qjkxbmwvz"),
}
DEFAULT_LAYOUT = "qwerty"


@dataclass(frozen=True)
class Layout:
    """One keyboard layout: the neighbours of each key (lower-case characters)."""

    name: str
    neighbours: dict[str, frozenset[str]] = field(repr=False)

    def near(self, a: str, b: str) -> bool:
        """Whether `a` and `b` are different keys next to each other (case-insensitive)."""
        return b.lower() in self.neighbours.get(a.lower(), frozenset())

    def keys_near(self, ch: str) -> frozenset[str]:
        return self.neighbours.get(ch.lower(), frozenset())


def _positions(rows: tuple[str, str, str]) -> dict[str, tuple[float, float]]:
    return {
        ch: (col + _STAGGER[row], float(row))
        for row, keys in enumerate(rows)
        for col, ch in enumerate(keys)
    }


def layout(name: str = DEFAULT_LAYOUT) -> Layout:
    """The layout called `name` (qwerty, qwertz, azerty, dvorak; case-insensitive)."""
    rows = ROWS.get(name.lower())
    if rows is None:
        raise KeyboardError(f"unknown keyboard layout {name!r}; the layouts are: {', '.join(ROWS)}")
    where = _positions(rows)
    neighbours = {
        a: frozenset(
            b
            for b, (bx, by) in where.items()
            if b != a and math.hypot(ax - bx, ay - by) <= NEIGHBOUR_DISTANCE
        )
        for a, (ax, ay) in where.items()
    }
    return Layout(name.lower(), neighbours)
