"""The phrase file: a PhraseModel's flat arrays, zlib-compressed (version 2), or its counts as
JSON of dicts (version 1, what earlier jobs wrote; still read).

Version 2 inflates to a magic line, a JSON header (format, version, weight, the number of
words, the vocabulary's size in bytes and each array's length), the vocabulary (one token a
line) and the arrays in `ARRAYS` order. A file is read with every bound checked first: it never
inflates past MAX_FILE_BYTES, and every index is in range and every table sorted before a
model is made of it, so no lookup can go wrong later.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from sys import intern

import numpy as np

from wordahead.predict.words import WORD_RE
from wordahead.types import KeyboardError

FORMAT = "keyboard-phrases"
FORMAT_VERSION = 2  # 1: JSON of dicts (still read)
MAGIC = b"KBPHRASES\x02\n"  # an inflated version-2 file starts with it
MAX_FILE_BYTES = 256 * 2**20  # inflated; MAX_NGRAMS of them take about 5 MB
ARRAYS = {  # version-2 arrays, in file order, and their types
    "counts": "<i8",  # per token id: times typed (0 for punctuation and START)
    "keys": "<i8",  # sorted context keys
    "starts": "<i8",  # per context: where its continuations start (one more entry at the end)
    "totals": "<i8",  # per context: the sum of its continuations' counts
    "next_ids": "<i4",  # continuation token ids, sorted by id within each context
    "next_counts": "<i4",
}
_SEP = "\t"  # between the tokens of a context in a version-1 file


class PhraseError(KeyboardError):
    """A phrase file that cannot be read (damaged, or of another format)."""


@dataclass(frozen=True)
class StoredArrays:
    """A version-2 file: the model's vocabulary and arrays, checked."""

    vocab: list[str]
    n_words: int
    arrays: dict[str, np.ndarray]
    weight: float


@dataclass(frozen=True)
class StoredCounts:
    """A version-1 file: word counts and what followed each context, checked."""

    unigrams: Counter[str]
    follow: dict[tuple[str, ...], Counter[str]]
    weight: float


def encode(
    vocab: list[str], n_words: int, arrays: Mapping[str, np.ndarray], weight: float
) -> bytes:
    """A version-2 file of a model's vocabulary (`n_words` words first) and `arrays`."""
    text = "\n".join(vocab).encode("utf-8")
    blobs = [text]
    lengths: dict[str, int] = {}
    for name, dtype in ARRAYS.items():
        array = np.ascontiguousarray(arrays[name], dtype=dtype)
        lengths[name] = len(array)
        blobs.append(array.tobytes())
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "weight": weight,
        "n_words": n_words,
        "vocab_bytes": len(text),
        "lengths": lengths,
    }
    head = json.dumps(header).encode("utf-8") + b"\n"
    return zlib.compress(MAGIC + head + b"".join(blobs), 6)


def decode(raw: bytes) -> StoredArrays | StoredCounts:
    """What a phrase file holds; PhraseError for what is damaged or of another format."""
    inflate = zlib.decompressobj()
    try:
        # Bounded: a damaged (or hostile) file never inflates past MAX_FILE_BYTES.
        text = inflate.decompress(raw, MAX_FILE_BYTES)
        if inflate.unconsumed_tail:
            raise PhraseError(f"phrase file inflates past {MAX_FILE_BYTES:,} bytes")
        if not inflate.eof:
            raise PhraseError("phrase file is truncated")
    except zlib.error as exc:
        raise PhraseError(f"not a phrase file ({exc})") from None
    if text.startswith(MAGIC):
        return _decode_arrays(text)
    try:
        data = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PhraseError(f"not a phrase file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PhraseError("not a phrase file (unknown format)")
    if data.get("version") != 1:
        raise PhraseError(f"phrase file version {data.get('version')} is not supported")
    try:  # version 1: JSON of dicts
        unigrams = Counter({str(w): int(n) for w, n in data["unigrams"].items()})
        follow = {
            tuple(map(intern, ctx.split(_SEP))): Counter({str(w): int(n) for w, n in nxt.items()})
            for ctx, nxt in data["follow"].items()
        }
        weight = float(data["weight"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PhraseError(f"damaged phrase file ({exc})") from None
    unknown = {w for nxt in follow.values() for w in nxt} - set(unigrams)
    if unknown:
        raise PhraseError(f"damaged phrase file (words without counts: {sorted(unknown)[:3]})")
    _check_weight(weight)
    return StoredCounts(unigrams, follow, weight)


def _decode_arrays(text: bytes) -> StoredArrays:
    end = text.index(b"\n", len(MAGIC))
    header = json.loads(text[len(MAGIC) : end].decode("utf-8"))
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise PhraseError("not a phrase file (unknown format)")
    weight = float(header["weight"])
    _check_weight(weight)
    at = end + 1
    size = int(header["vocab_bytes"])
    vocab = text[at : at + size].decode("utf-8").split("\n") if size else []
    at += size
    arrays: dict[str, np.ndarray] = {}
    for name, dtype in ARRAYS.items():
        n = int(header["lengths"][name])
        nbytes = n * np.dtype(dtype).itemsize
        if n < 0 or at + nbytes > len(text):
            raise PhraseError("damaged phrase file (truncated arrays)")
        arrays[name] = np.frombuffer(text, dtype=dtype, count=n, offset=at).astype(dtype[1:])
        at += nbytes
    if at != len(text):
        raise PhraseError("damaged phrase file (trailing bytes)")
    n_words = int(header["n_words"])
    _check_arrays(vocab, n_words, arrays)
    return StoredArrays(vocab, n_words, arrays, weight)


def _check_weight(weight: float) -> None:
    if not 0.0 <= weight < 1.0:
        raise PhraseError(f"phrase weight {weight} is outside [0, 1)")


def _check_arrays(vocab: list[str], n_words: int, a: dict[str, np.ndarray]) -> None:
    """Every index in range and every table sorted, so no lookup can go wrong later."""
    size = len(vocab)
    n_ctx = len(a["keys"])

    def bad(why: str) -> PhraseError:
        return PhraseError(f"damaged phrase file ({why})")

    if not 0 <= n_words <= size or len(set(vocab)) != size or len(a["counts"]) != size:
        raise bad("vocabulary")
    if vocab[:n_words] != sorted(vocab[:n_words]) or not all(
        WORD_RE.fullmatch(w) for w in vocab[:n_words]
    ):
        raise bad("words")
    if (a["counts"][:n_words] <= 0).any() or (a["counts"][n_words:] != 0).any():
        raise bad("counts")
    if len(a["starts"]) != n_ctx + 1 or len(a["totals"]) != n_ctx:
        raise bad("context table")
    if n_ctx and ((np.diff(a["keys"]) <= 0).any() or a["keys"][0] < 0
                  or a["keys"][-1] >= (size + 1) * size):  # fmt: skip
        raise bad("context keys")
    starts, ids, counts = a["starts"], a["next_ids"], a["next_counts"]
    if starts[0] != 0 or starts[-1] != len(ids) or (np.diff(starts) <= 0).any():
        raise bad("context offsets")
    if len(counts) != len(ids) or (counts <= 0).any() or ((ids < 0) | (ids >= n_words)).any():
        raise bad("continuations")
    if len(ids):
        step = np.diff(ids.astype(np.int64))
        inner = np.ones(len(step), dtype=bool)
        inner[starts[1:-1] - 1] = False  # the first of each context may be smaller
        if (step[inner] <= 0).any():
            raise bad("continuations order")
        if (np.add.reduceat(counts.astype(np.int64), starts[:-1]) != a["totals"]).any():
            raise bad("context totals")
