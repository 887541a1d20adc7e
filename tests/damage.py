"""Random damage to a file's bytes, for fuzzing the loaders."""

from __future__ import annotations

import random


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random corruption of a file: flipped bytes (often in the zip and array headers),
    a cut, an insertion, a deletion, or a zeroed run."""
    out = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:  # a few random bytes anywhere
        for _ in range(rng.randint(1, 6)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif kind == 1:  # the zip local header and the .npy header of the first member
        out[rng.randrange(min(len(out), 200))] = rng.randrange(256)
    elif kind == 2:  # the zip's central directory at the end
        out[len(out) - 1 - rng.randrange(min(len(out), 300))] = rng.randrange(256)
    elif kind == 3:
        del out[rng.randrange(len(out)) :]
    elif kind == 4:
        at = rng.randrange(len(out))
        out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
    else:
        at = rng.randrange(len(out))
        out[at : at + rng.randint(1, 64)] = b"\0" * 8
    return bytes(out)
