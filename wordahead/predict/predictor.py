"""Word-level next-word prediction and word completion from the ONNX inference graph.

The model predicts tokens (byte-level BPE, a word's leading space is part of its first token);
people see words. For the text before the cursor, `Predictor.predict` finds the k most
probable whole words with a small beam search over tokens:

- at a word boundary, words that come next; inside a word, completions of the typed part (the
  prefix). The search is constrained to tokens whose bytes agree with the prefix, so a prefix that
  tokenizes differently from the finished word (" holi" = Ġh o l i, " holiday" = Ġh o l iday)
  is handled. A capitalised prefix keeps its capitals.
- a word is finished when the token after it is not a word continuation (space, punctuation,
  newline, end of text): its score is P(its tokens) * P(a boundary next), summed over the
  tokenizations that spell it. Hypotheses that cannot beat the k-th finished word are pruned.
  The hypotheses of one depth share one batched session run on the context's key/value cache.
- at a word boundary, punctuation tokens the model finds likely come back as kind "punct".
- real words only: where the model ships a lexicon (`wordahead.predict.lexicon`), a word is offered only
  if the lexicon or the user's own phrases hold it; the search goes on past spellings that are
  not words ("tomore"), so they never take the place of one that is.
- "never empty": when the search finds no word (an odd prefix beyond its depth limit), the
  prefix itself comes back with score 0 (no model estimate) if it is a real word; only a run of
  word characters too long to be a word (> MAX_PREFIX_CHARS) gets no suggestions at all.

Prompt caching: the key/value cache of the last context is kept and only new tokens are run;
next-token distributions are kept by their absolute token sequence (typing on in a word reuses
those of the previous keystroke); finished results are kept in an LRU. The context is a
deterministic window of the text (see `model_window`), so results with and without the caches
are the same (up to float rounding of differently batched runs).

Adapters: one session serves every adapter (the graph takes the LoRA tensors as inputs), so a
swap builds no session. An `Engine` (the adapter's tensors, its version and its caches) is built
completely, then swapped in by replacing one reference; predictions in flight finish on the
old engine.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wordahead import memory
from wordahead.model import runtime
from wordahead.model.artifacts import (
    TREE_BIAS,
    TREE_OUTPUTS,
    Adapter,
    ArtifactError,
    ArtifactSet,
    adaptable_graph,
    check_adapter,
    load_adapter,
    tensors_sha256,
)
from wordahead.predict.lexicon import Lexicon
from wordahead.predict.query import SURROGATES, Query, make_query
from wordahead.predict.real_words import RealWords
from wordahead.predict.sources import assemble
from wordahead.predict.sources.base import Draft, SuggestionSource
from wordahead.predict.sources.phrases import PhraseError, PhraseModel
from wordahead.predict.words import WORD_RE, is_word_char
from wordahead.types import MAX_PUNCT, Candidate, Prediction

log = logging.getLogger(__name__)

BEAM_WIDTH = 8  # hypotheses scored per depth (at least k)
MAX_WORD_TOKENS = 4  # tokens a word may take beyond those its typed prefix needs
MAX_DEPTH = 12  # hard limit on search depth (long odd prefixes)
MIN_SHARE = 1e-3  # a word this much less likely than the best one found is not worth a search
LRU_SIZE = 1024  # finished results
# Next-token distributions kept (a float32 vector of the vocabulary each, 32 kB for 8k tokens):
# typing on in a word asks for those of the last keystroke again.
HYPOTHESIS_CACHE_SIZE = 96  # at least
NEXTS_PER_SLOT = 24  # ... and this many per slot holding a client's context
# Key/value cache slots: clients typing at once that each keep their context (0.6 MB each).
SLOTS = 64
HOT_SLOTS = 2  # slots taken last that keep batch copies of their key/values (no tree graph)
TOKENIZED_SIZE = 2 * SLOTS  # tokenized context windows kept
SLOT_WAIT_S = 0.05  # how long a prediction waits for the busy slot holding its context
SLOT_KEEP_TAKES = 4 * SLOTS  # a slot not taken for this many predictions lets its key/values go
PREFETCH = 2  # next keystrokes computed ahead (the letters the top suggestions go on with)
TOP_TOKENS = 24  # likeliest tokens of a kind memoised per distribution (>= MAX_K)


# --- the vocabulary, seen as bytes ---------------------------------------------------------------
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def _letter_byte(b: int) -> bool:
    """Could this byte, alone in a token, belong to a letter? Continuation bytes and the lead
    bytes of scripts with letters (Latin, Greek, Cyrillic, ..., CJK) yes; the lead bytes of
    punctuation and symbol blocks (U+0080-U+00BF, U+2000-U+2FFF, emoji) no."""
    return 0x80 <= b <= 0xBF or 0xC3 <= b <= 0xDF or b in (0xE0, 0xE1) or 0xE3 <= b <= 0xED


def _wordish(ch: str) -> bool:
    # A byte that does not decode on its own (a multi-byte character split across tokens) is
    # judged by `_letter_byte`; the finished word is checked against WORD_RE after decoding.
    if "\udc80" <= ch <= "\udcff":
        return _letter_byte(ord(ch) - 0xDC00)
    return is_word_char(ch)


def _incomplete(word: bytes) -> bool:
    """True if `word` ends inside a multi-byte UTF-8 character."""
    for back in range(1, min(4, len(word)) + 1):
        b = word[-back]
        if b < 0x80:
            return False
        if b >= 0xC0:  # the lead byte: how many bytes does its character need?
            return back < (2 if b < 0xE0 else 3 if b < 0xF0 else 4)
    return False


def _word_part(body: bytes) -> int:
    """How many leading bytes of `body` continue a word: word characters, and hyphens followed
    by one (or ending the token: the word may go on in the next token)."""
    chars = body.decode("utf-8", "surrogateescape")
    pos = 0
    for i, ch in enumerate(chars):
        if _wordish(ch):
            pos += len(ch.encode("utf-8", "surrogateescape"))
        elif ch == "-" and (i + 1 == len(chars) or _wordish(chars[i + 1])):
            pos += 1
        else:
            break
    return pos


def _is_punctuation(text: str) -> bool:
    return bool(text) and all(unicodedata.category(ch).startswith("P") for ch in text)


class TokenTable:
    """Per-token facts precomputed once, so each keystroke is numpy work on index arrays."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        from tokenizers import decoders

        if not isinstance(tokenizer.decoder, decoders.ByteLevel):
            raise ArtifactError("the predictor needs a byte-level BPE tokenizer (GPT-2 style)")
        decoder = _byte_decoder()
        special = set(tokenizer.get_added_tokens_decoder())
        n = vocab_size
        self.size = n
        self.bytes: list[bytes] = [b""] * n
        self.special = np.zeros(n, dtype=bool)
        self.spaced = np.zeros(n, dtype=bool)  # " word": a space, then something else
        self.start_ok = np.zeros(n, dtype=bool)  # body starts with a character a word starts with
        self.word_len = np.zeros(n, dtype=np.int32)  # bytes of the body that continue a word
        self.body_len = np.zeros(n, dtype=np.int32)
        self.mid_char = np.zeros(n, dtype=bool)  # body starts inside a multi-byte character
        self.punct: dict[int, str] = {}
        for i in range(n):
            piece = tokenizer.id_to_token(i) if i < tokenizer.get_vocab_size() else None
            if piece is None or i in special or any(c not in decoder for c in piece):
                self.special[i] = True
                continue
            raw = bytes(decoder[c] for c in piece)
            self.bytes[i] = raw
            spaced = len(raw) > 1 and raw[:1] == b" "
            body = raw[1:] if spaced else raw
            self.spaced[i] = spaced
            self.body_len[i] = len(body)
            text = body.decode("utf-8", "surrogateescape")
            self.mid_char[i] = bool(body) and 0x80 <= body[0] <= 0xBF
            self.start_ok[i] = bool(text) and not self.mid_char[i] and _wordish(text[0])
            self.word_len[i] = _word_part(body)
            if _is_punctuation(text) and not self.start_ok[i]:
                self.punct[i] = text
        plain = ~self.special & ~self.spaced
        self.terminal = (self.word_len > 0) & (self.word_len < self.body_len)
        # First token of a word after a space (the space is part of it) or right after the text.
        self.first_spaced = ~self.special & self.spaced & self.start_ok
        self.first_plain = plain & self.start_ok
        # Tokens that continue the word being built; all others end it (boundary).
        self.cont = plain & (self.word_len > 0) & ~self.mid_char
        self.after_hyphen = self.cont & self.start_ok
        self.finish_char = plain & (self.word_len > 0) & self.mid_char  # after a split character
        self.boundary = ~self.cont
        self.boundary_f = self.boundary.astype(np.float32)
        self.punct_spaced = np.array([i for i in self.punct if self.spaced[i]], dtype=np.int64)
        self.punct_plain = np.array([i for i in self.punct if not self.spaced[i]], dtype=np.int64)
        order = sorted((b, i) for i, b in enumerate(self.bytes) if not self.special[i])
        self.sorted_bytes = [b for b, _ in order]
        self.sorted_ids = np.array([i for _, i in order], dtype=np.int64)
        self.exact = {b: i for b, i in order}
        self.space_id = self.exact.get(b" ")

    def starting_with(self, key: bytes) -> np.ndarray:
        """Ids of the tokens whose bytes start with `key`."""
        lo = bisect.bisect_left(self.sorted_bytes, key)
        hi = bisect.bisect_right(self.sorted_bytes, key + b"\xff" * 64, lo)
        return self.sorted_ids[lo:hi]


# --- the search ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Hyp:
    tokens: tuple[int, ...]
    word: bytes  # the word so far (without the lead space)
    score: float  # P(tokens | context)


@dataclass
class Next:
    """The model's next-token distribution after one token sequence, and what the search
    reads from it (kept in the cache with the sequence)."""

    probs: np.ndarray  # float32 [vocab]
    end: float  # P(the next token ends a word)
    tops: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def top(self, name: str, mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The `n` likeliest tokens among `mask` (named for the memo), most probable first."""
        hit = self.tops.get(name)
        if hit is None or len(hit[0]) < n:
            masked = np.where(mask, self.probs, 0.0)
            m = max(n, TOP_TOKENS)
            ids = np.argpartition(masked, -m)[-m:]
            ids = ids[np.argsort(-masked[ids], kind="stable")]
            hit = self.tops[name] = (ids, masked[ids])
        return hit[0][:n], hit[1][:n]


def next_distributions(table: TokenTable, logits: np.ndarray) -> list[Next]:
    """`Next` for each row of last-position logits [rows, vocab]."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    ends = (z @ table.boundary_f).tolist()
    return [Next(z[row], ends[row]) for row in range(z.shape[0])]


Evaluate = Callable[[list[tuple[int, ...]]], list[Next]]  # token tuples after the context


def search_words(
    table: TokenTable,
    root: Next,
    evaluate: Evaluate,
    lead: bytes,
    prefix: bytes,
    k: int,
    max_depth: int,
    beam: int,
    real: RealWords | None = None,
    exact: bool = False,
) -> dict[bytes, float]:
    """The most probable whole words that start with `prefix`, as {word bytes: probability}
    (`exact`: the word `prefix` alone).

    Level by level: every hypothesis of the frontier has its next-token distribution; a
    hypothesis that spells a word (all of the prefix, not ending in a hyphen, and a real word
    when `real` is given) finishes with P(boundary next); its continuations compete for `beam`
    places, and any whose probability cannot beat the k-th finished word is dropped (its words
    can only be less probable), as is any that no real word starts with.
    """
    finished: dict[bytes, float] = {}

    def can_finish(word: bytes) -> bool:
        spelled = len(word) == len(prefix) if exact else len(word) >= len(prefix)
        return spelled and _can_end(word) and (real is None or real.accept(word))

    def kth_best() -> float:
        if len(finished) < k or exact:
            # Fewer than k words yet (a prefix few real words start with): still prune what
            # cannot come within MIN_SHARE of the best, or the search runs to its depth limit.
            # One word asked: each tokenization adds to its one score, so prune only those.
            return max(finished.values(), default=0.0) * MIN_SHARE
        return sorted(finished.values(), reverse=True)[k - 1]

    hyps, nexts = [_Hyp((), b"", 1.0)], [root]
    for _ in range(max_depth):
        expansions: list[tuple[float, _Hyp, int]] = []
        floor = kth_best()
        for h, nxt in zip(hyps, nexts, strict=True):
            if h.score <= floor or (exact and len(h.word) >= len(prefix)):
                continue  # none of its words can make the top k (or be the word asked)
            ids, ps = _next_tokens(table, h, nxt, lead, prefix, beam, floor / h.score)
            scores = (ps * h.score).tolist()
            expansions.extend(zip(scores, [h] * len(scores), ids.tolist(), strict=True))
        expansions.sort(key=lambda e: -e[0])
        grown: list[_Hyp] = []
        for score, h, t in expansions:
            if score <= floor or len(grown) == beam:
                break
            raw = table.bytes[t]
            body = raw[1:] if table.spaced[t] else raw
            word = h.word + body[: table.word_len[t]]
            if table.terminal[t]:  # the token itself ends the word ("ing.")
                if can_finish(word):
                    finished[word] = finished.get(word, 0.0) + score
                    floor = kth_best()
            elif (not exact or len(word) <= len(prefix)) and (real is None or real.viable(word)):
                grown.append(_Hyp((*h.tokens, t), word, score))
        if not grown:
            break
        # One session run for all of them: its cost is mostly reading the weights, so rows are
        # cheap and runs are not.
        hyps, nexts = grown, evaluate([h.tokens for h in grown])
        for h, nxt in zip(hyps, nexts, strict=True):
            if can_finish(h.word):
                finished[h.word] = finished.get(h.word, 0.0) + h.score * nxt.end
    return finished


def _can_end(word: bytes) -> bool:
    return bool(word) and not word.endswith(b"-") and not _incomplete(word)


def _next_tokens(
    table: TokenTable, h: _Hyp, nxt: Next, lead: bytes, prefix: bytes, beam: int, floor: float
) -> tuple[np.ndarray, np.ndarray]:
    """The tokens that may follow hypothesis `h`, with their probabilities: the `beam`
    likeliest once the prefix is spelled out, else those that agree with the rest of it.
    Tokens less probable than `floor` cannot make a word that makes the top k."""
    needs_lead = bool(lead) and not h.tokens
    if needs_lead:
        name, mask = "first_spaced", table.first_spaced
    elif not h.word:
        name, mask = "first_plain", table.first_plain
    elif _incomplete(h.word):
        name, mask = "finish_char", table.finish_char
    elif h.word.endswith(b"-"):
        name, mask = "after_hyphen", table.after_hyphen
    else:
        name, mask = "cont", table.cont
    extra: list[int] = []
    if needs_lead and table.space_id is not None:
        extra.append(table.space_id)  # a bare space token, then the word (" " + "zanzibar")
    rest = prefix[len(h.word) :]
    if not rest and floor > 0 and not extra:
        # One pass over the vocabulary: usually only a handful of tokens are that likely.
        ids = np.flatnonzero(nxt.probs > floor)
        ids = ids[mask[ids]]
        ps = nxt.probs[ids]
        if len(ids) > beam:
            keep = np.argpartition(ps, -beam)[-beam:]
            ids, ps = ids[keep], ps[keep]
        return ids, ps
    if not rest:
        ids, ps = nxt.top(name, mask, beam)
        if not extra:
            return ids, ps
    else:
        # Tokens holding all of `key` (and maybe more of the word), or a part of it.
        key = (lead if needs_lead else b"") + rest
        ids = table.starting_with(key)
        ids = ids[mask[ids] & (table.word_len[ids] >= len(rest))]
        start = len(key) - len(rest)
        for j in range(start + 1, len(key)):
            t = table.exact.get(key[:j])
            if t is not None and mask[t] and table.word_len[t] == j - start:
                extra.append(t)
    if extra:
        ids = np.concatenate([ids, np.array(extra, dtype=np.int64)])
    ps = nxt.probs[ids]
    if len(ids) > 2 * beam:  # a short prefix agrees with hundreds of tokens: keep the likeliest
        keep = np.argpartition(ps, -2 * beam)[-2 * beam :]
        ids, ps = ids[keep], ps[keep]
    return ids, ps


# --- the engine: one adapter and its caches ------------------------------------------------------
class Stopped(Exception):
    """Work ahead given up: a real request wants the CPU (see `Predictor.prefetch`)."""


class _Nexts:
    """Next-token distributions by absolute token sequence, most recently used last; shared by
    every slot of an engine (a sequence's distribution is the same whoever asks)."""

    def __init__(self, size: int = HYPOTHESIS_CACHE_SIZE) -> None:
        self.size = size
        self.items: OrderedDict[tuple[int, ...], Next] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, seq: tuple[int, ...]) -> Next | None:
        with self.lock:
            hit = self.items.get(seq)
            if hit is not None:
                self.items.move_to_end(seq)
            return hit

    def put(self, seq: tuple[int, ...], nxt: Next) -> None:
        with self.lock:
            self.items[seq] = nxt
            while len(self.items) > self.size:
                self.items.popitem(last=False)


class _State:
    """One cache slot: the key/values of a base token sequence (one client's context), and
    the next-token distributions it reads and writes.

    Hypotheses after the base are scored by running only their tokens on top of the base's
    key/values; the base moves to each new context of whoever holds the slot.
    """

    def __init__(self, nexts: _Nexts | None = None) -> None:
        self.base: tuple[int, ...] = ()
        self.kv: list[np.ndarray] = []  # [1, kv_heads, len(base), head_dim] per past input
        self.repeated: list[np.ndarray] = []  # the same, repeated along the batch axis
        self.nexts = nexts if nexts is not None else _Nexts()
        self.busy = False
        self.used = 0  # when it was last taken (the slots' clock)
        self.stop: Callable[[], bool] | None = None  # asked before each run (work ahead)

    def get(self, seq: tuple[int, ...]) -> Next | None:
        return self.nexts.get(seq)

    def put(self, seq: tuple[int, ...], nxt: Next) -> None:
        self.nexts.put(seq, nxt)

    def holds(self, context: tuple[int, ...]) -> bool:
        """True when the key/values are those of `context`."""
        return bool(self.kv) and context == self.base


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many leading tokens `a` and `b` share (a binary search of slice comparisons, done
    in C: every prediction compares its context with every slot's)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Slots:
    """The cache slots of an engine. Each prediction takes the free slot whose context shares
    the most with its own (else the least recently used one) and has it alone until it is
    done, so several clients typing at once each keep their key/values and run in parallel,
    and a slot only ever serves tokens it computed for the context it holds."""

    def __init__(self, count: int) -> None:
        self.nexts = _Nexts()
        self.states = [_State(self.nexts) for _ in range(max(1, count))]
        self.free = threading.Condition()
        self.clock = 0

    def take(self, context: tuple[int, ...]) -> _State:
        # Sharing a token or two (the start of a text) is no reason to take someone's slot:
        # a slot counts only if it holds more than the first half of the context, which one
        # token and one slice comparison tell (most slots hold other clients' texts).
        least = len(context) // 2
        head = context[: least + 1]
        pivot = head[-1] if head else None
        deadline = time.monotonic() + SLOT_WAIT_S
        with self.free:
            while True:
                sharing = {
                    s: _common(s.base, context)
                    for s in self.states
                    if len(s.base) > least
                    and s.base[least] == pivot
                    and s.base[: least + 1] == head
                }
                best = max(sharing, key=lambda s: (sharing[s], -s.used)) if sharing else None
                idle = [s for s in self.states if not s.busy]
                # The slot holding this context is busy (a prediction computed ahead for the
                # same client): waiting a moment for it beats recomputing the context.
                if idle and (best is None or not best.busy):
                    break
                left = deadline - time.monotonic()
                if idle and left <= 0:
                    break
                self.free.wait(left if idle else None)
            free = [s for s in sharing if not s.busy]
            if free:  # the one sharing the most (and of those, the least recently used)
                state = max(free, key=lambda s: (sharing[s], -s.used))
            else:  # the least recently used
                state = min(idle, key=lambda s: s.used)
            self.clock += 1
            state.busy, state.used = True, self.clock
            live = 0
            for other in self.states:
                if not other.busy and other.used <= self.clock - HOT_SLOTS:
                    # Batch copies of the key/values are large: only the slots taken last
                    # keep theirs. A context nobody asked about for a while (a window the
                    # text moved past, a client gone) is unlikely to come back: its memory goes.
                    other.repeated = []
                    if other.used < self.clock - SLOT_KEEP_TAKES:
                        other.base, other.kv = (), []
                live += bool(other.kv) or other is state
            # Distributions kept: enough for what each client typing now will ask again.
            self.nexts.size = max(HYPOTHESIS_CACHE_SIZE, NEXTS_PER_SLOT * live)
            return state

    def give_back(self, state: _State) -> None:
        with self.free:
            state.busy = False
            self.free.notify()


_MASKED = float(np.finfo(np.float32).min)  # what the exported graphs add where attention may not go


def _as_tree(rows: list[tuple[int, ...]]) -> tuple[np.ndarray, list[int], list[int]]:
    """Token sequences (after a shared past) as one tree: its tokens [1, nodes], each node's
    parent (-1: the past) and the node each sequence ends at. Shared beginnings run once."""
    index: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    for row in rows:
        for d in range(len(row)):
            key = row[: d + 1]
            if key not in index:
                index[key] = len(tokens)
                tokens.append(row[d])
                parents.append(index[row[:d]] if d else -1)
    return np.array([tokens], dtype=np.int64), parents, [index[row] for row in rows]


def _ancestry(parents: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Which nodes each node of a tree may attend to (itself and its ancestors), and depths."""
    n = len(parents)
    seen = np.zeros((n, n), dtype=bool)
    depth = np.zeros(n, dtype=np.int64)
    for i, parent in enumerate(parents):
        if parent >= 0:
            seen[i] = seen[parent]
            depth[i] = depth[parent] + 1
        seen[i, i] = True
    return seen, depth


def _tree_bias(seen: np.ndarray, past_len: int) -> np.ndarray:
    """The additive attention bias [1, 1, new, past + new]: the past for all, and `seen`."""
    new = len(seen)
    bias = np.zeros((1, 1, new, past_len + new), dtype=np.float32)
    bias[0, 0, :, past_len:][~seen] = _MASKED
    return bias


def _run_session(session: Any, outputs: list[str], feeds: dict[str, np.ndarray]) -> list:
    """`session.run` without its Python-side check of the feeds (0.05 ms a run, as long as
    a small run's share of the search): the engine builds them to fit the graph."""
    inner = getattr(session, "_sess", None)
    if inner is None:  # another ONNX Runtime than the pinned one
        return session.run(outputs, feeds)
    return inner.run(outputs, feeds, None)


def open_session(model: bytes, threads: int, source: Path) -> Any:
    """The inference session of a serialized graph (`source` names it in errors)."""
    ort = runtime.onnxruntime()
    options = runtime.session_options(threads)
    # No arena: it keeps its peak for good; runs this small allocate little (measured: the
    # same time per run).
    options.enable_cpu_mem_arena = False
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise ArtifactError(f"cannot load {source}: {exc}") from exc


@dataclass(frozen=True)
class Answer:
    """A prediction's suggestions, as the results cache keeps them."""

    candidates: tuple[Candidate, ...]
    beside: tuple[Candidate, ...] = ()  # offered beside the k places (see sources.base.Draft)


class Engine:
    """One adapter served by the predictor's session: its LoRA inputs, and the caches that
    belong to it."""

    def __init__(
        self, session: Any, lora: dict[str, np.ndarray], artifacts: ArtifactSet,
        table: TokenTable, version: str, cache: bool,
        sources: tuple[SuggestionSource, ...] = (), slots: int = SLOTS,
        lexicon: Lexicon | None = None, phrases: SuggestionSource | None = None,
    ) -> None:  # fmt: skip
        self.session = session
        self.lora = lora  # the adapter's tensors, as the graph's inputs take them
        self.table = table
        self.version = version
        self.cache = cache
        self.sources = sources  # what besides the model decides, in order (none: the LM alone)
        self.phrases = phrases  # the user's phrases among them (None: none)
        # What may be offered (None: any spelling, the model ships no lexicon).
        self.real = RealWords(lexicon, sources) if lexicon is not None else None
        inference = artifacts.manifest["inference"]
        self.kv_heads = int(inference["kv_heads"])
        self.head_dim = int(inference["head_dim"])
        layers = int(inference["layers"])
        self.past_names = [f"past.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        self.output_names = ["logits"] + [n.replace("past", "present") for n in self.past_names]
        inputs = {i.name for i in session.get_inputs()}
        self.tree = TREE_BIAS in inputs  # hypotheses scored as a tree (`tree_attention`)
        self.masked = "attention_mask" in inputs
        self.slots = _Slots(slots)
        self.lock = threading.Lock()  # guards `results`
        self.results: OrderedDict[Any, Answer] = OrderedDict()

    def run(
        self, ids: np.ndarray, past: Sequence[np.ndarray], past_len: int, presents: bool,
        stop: Callable[[], bool] | None = None, parents: Sequence[int] | None = None,
        outputs: Sequence[int] | None = None,
    ):  # fmt: skip
        """One session run of `ids` [batch, new] after `past_len` tokens whose key/values are
        `past`: the logits of each row's last position [batch, vocab], and the key/values if
        asked. On a tree graph, `parents` makes the one row of `ids` a tree (each token follows
        the token at `parents[i]` < i, or the past for -1) and the logits are those of the
        tokens at `outputs` [len(outputs), vocab].
        Raises Stopped instead when `stop` (work ahead: is a request waiting?) says so."""
        if stop is not None and stop():
            raise Stopped
        batch, new = ids.shape
        feeds = {"input_ids": ids}
        if parents is None:
            feeds["position_ids"] = np.broadcast_to(
                np.arange(past_len, past_len + new, dtype=np.int64), (batch, new)
            ).copy()
            if self.tree:
                feeds[TREE_BIAS] = _tree_bias(np.tri(new, dtype=bool), past_len)
                feeds[TREE_OUTPUTS] = np.array([new - 1], dtype=np.int64)
        else:
            seen, depth = _ancestry(parents)
            feeds["position_ids"] = (depth + past_len)[None]
            feeds[TREE_BIAS] = _tree_bias(seen, past_len)
            feeds[TREE_OUTPUTS] = np.asarray(outputs, dtype=np.int64)
        if self.masked:
            feeds["attention_mask"] = np.ones((batch, past_len + new), dtype=np.int64)
        feeds.update(zip(self.past_names, past, strict=True))
        feeds.update(self.lora)
        out = _run_session(self.session, self.output_names if presents else ["logits"], feeds)
        logits = out[0]
        return logits.reshape(-1, logits.shape[-1]), out[1:]

    def _empty_past(self, batch: int = 1) -> list[np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in self.past_names]

    def take_state(self, context: tuple[int, ...]) -> _State:
        """The caches to use for one prediction of `context`: a slot of the engine's (give it
        back with `give_back`), or fresh ones (cache off)."""
        return self.slots.take(context) if self.cache else _State()

    def give_back(self, state: _State) -> None:
        if self.cache:
            self.slots.give_back(state)

    def cached(self, query: Any) -> Answer | None:
        with self.lock:
            hit = self.results.get(query)
            if hit is not None:
                self.results.move_to_end(query)
            return hit

    def remember(self, query: Any, answer: Answer) -> None:
        with self.lock:
            self.results[query] = answer
            if len(self.results) > LRU_SIZE:
                self.results.popitem(last=False)

    def root(self, state: _State, context: tuple[int, ...]) -> Next:
        """The next-token distribution after the context (from the cache if it is there)."""
        return state.get(context) or self.rebase(state, context)

    def rebase(self, state: _State, context: tuple[int, ...]) -> Next:
        """Make `context` the base: run the tokens after its common prefix with the old base."""
        # The last token runs for its logits even when the base holds it.
        common = min(_common(state.base, context), len(context) - 1)
        if common == 0:
            past = self._empty_past()
        elif common == len(state.base):
            past = state.kv
        else:
            past = [np.ascontiguousarray(kv[:, :, :common, :]) for kv in state.kv]
        new = np.array([context[common:]], dtype=np.int64)
        logits, kv = self.run(new, past, common, presents=True, stop=state.stop)
        state.base, state.kv, state.repeated = context, kv, []
        nxt = next_distributions(self.table, logits)[0]
        state.put(context, nxt)
        return nxt

    def evaluator(self, state: _State, context: tuple[int, ...]) -> Evaluate:
        """Next-token distributions after context + each token tuple (all of one length)."""

        def evaluate(hyps: list[tuple[int, ...]]) -> list[Next]:
            seqs = [context + h for h in hyps]
            out = [state.get(s) for s in seqs]
            todo = [i for i, hit in enumerate(out) if hit is None]
            if todo:
                if not state.holds(context):
                    self.rebase(state, context)
                n = len(state.base)
                rows = [seqs[i][n:] for i in todo]
                if self.tree:  # one sequence: the hypotheses' tokens as a tree
                    ids, parents, outputs = _as_tree(rows)
                    logits, _ = self.run(ids, state.kv, n, False, state.stop, parents, outputs)
                else:  # one row per hypothesis, each with its own copy of the key/values
                    if not state.repeated or state.repeated[0].shape[0] < len(todo):
                        batch = max(len(todo), BEAM_WIDTH)
                        state.repeated = [np.repeat(kv, batch, axis=0) for kv in state.kv]
                    past = [kv[: len(todo)] for kv in state.repeated]
                    ids = np.array(rows, dtype=np.int64)
                    logits, _ = self.run(ids, past, n, presents=False, stop=state.stop)
                for i, nxt in zip(todo, next_distributions(self.table, logits), strict=True):
                    out[i] = nxt
                    state.put(seqs[i], nxt)
            return out  # type: ignore[return-value]

        return evaluate


# --- the predictor -------------------------------------------------------------------------------
class Predictor:
    """Whole-word suggestions for the text before the cursor, from an artifact set's inference
    graph with the active LoRA adapter. Thread-safe; `load_adapter` swaps atomically."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        threads: int = 1,
        quantize: bool | None = None,
        cache: bool = True,
        context_tokens: int = 96,
        slots: int = SLOTS,
    ) -> None:
        self.artifacts = ArtifactSet.open(model_dir)
        self.slots = slots  # key/value cache slots: clients typing at once (cache on)
        manifest = self.artifacts.manifest
        self.threads = threads
        self.cache = cache
        max_positions = int(manifest["base_model"].get("max_positions") or 512)
        self.context_tokens = max(8, min(int(context_tokens), max_positions - 2 * MAX_DEPTH))
        self.tokenizer = self.artifacts.tokenizer()
        vocab = int(manifest["base_model"]["vocab_size"])
        self.table = TokenTable(self.tokenizer, vocab)
        self.eos_id = self.artifacts.eos_id
        self.lexicon = self.artifacts.lexicon()  # None: the model ships none, any spelling goes
        if quantize is None:
            from wordahead.model.quantize import int8_by_default

            quantize = int8_by_default(self.artifacts)
        self.quantized = bool(quantize)
        if self.quantized:
            from wordahead.model.quantize import int8_model

            self.model_path = int8_model(self.artifacts)
        else:
            self.model_path = self.artifacts.inference_model
        model, self._lora = adaptable_graph(self.model_path, self.artifacts.lora_shapes)
        self._session = open_session(model, threads, self.model_path)
        del model
        self._swap = threading.Lock()  # one adapter load at a time
        self._tokenized: dict[tuple[str, bool], tuple[int, ...]] = {}  # oldest first
        self._tokenized_lock = threading.Lock()
        self._engine = self._build(None, "base")

    def _build(
        self,
        adapter: Adapter | None,
        version: str,
        sources: tuple[SuggestionSource, ...] = (),
        phrases: SuggestionSource | None = None,
    ) -> Engine:
        return Engine(
            self._session, self._lora.values(adapter), self.artifacts, self.table, version,
            self.cache, sources, self.slots, self.lexicon, phrases,
        )  # fmt: skip

    @property
    def adapter_version(self) -> str:
        return self._engine.version

    # --- adapters --------------------------------------------------------------------------
    @property
    def phrases(self) -> SuggestionSource | None:
        """The user phrases served with the adapter (None: none)."""
        return self._engine.phrases

    @property
    def sources(self) -> tuple[SuggestionSource, ...]:
        """The suggestion sources served with the adapter, in the order they blend."""
        return self._engine.sources

    def user_phrases_changed(self) -> None:
        """A served source learned something (the live phrases, a message): results computed
        before are stale, and the sources' words are taken again."""
        engine = self._engine
        with engine.lock:
            engine.results.clear()
            if engine.real is not None:
                engine.real.user_words_changed()

    def load_adapter(
        self,
        adapter: str | Path | dict | None,
        version: str = "base",
        phrases: SuggestionSource | str | Path | None = None,
        sources: Sequence[SuggestionSource] | None = None,
    ) -> bool:
        """Serve `adapter` (an .npz path or LoRA tensors; None: the base model) and the
        suggestion sources from now on: those `sources.assemble` makes of the user's `phrases`
        (a PhraseModel, LivePhrases or a phrase file; None: none), or `sources` as given.

        The new session is built before it replaces the old one, so predictions never stop.
        A missing or corrupt adapter is logged and the base model is served instead (False);
        a damaged phrase file is logged and left out (False), the adapter is still served.
        The memory of the engine replaced goes back to the system (once no prediction uses it).
        """
        if sources is not None and phrases is not None:
            raise ValueError("give the user's phrases or the sources, not both")
        with self._swap:
            try:
                return self._load(adapter, version, phrases, sources)
            finally:
                memory.trim()

    def _load(
        self,
        adapter: str | Path | dict | None,
        version: str,
        phrases: SuggestionSource | str | Path | None,
        given: Sequence[SuggestionSource] | None,
    ) -> bool:
        ok = True
        if isinstance(phrases, (str, Path)):
            try:
                phrases = PhraseModel.load(phrases)
            except PhraseError as exc:
                log.warning("user phrases left out: %s", exc)
                phrases, ok = None, False
        sources = tuple(given) if given is not None else assemble(phrases, self.lexicon)
        if adapter is None:
            if self._engine.version != "base" or not _same(self._engine.sources, sources):
                self._engine = self._build(None, "base", sources, phrases)
            return ok
        try:
            tensors = self._check_adapter(adapter)
            if version == "base":  # an adapter needs a name of its own
                version = _version_name(adapter, tensors)
            engine = self._build(tensors, version, sources, phrases)
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, keep serving
            name = version if version != "base" else _describe(adapter)
            log.warning(
                "adapter %s could not be loaded, serving the base model instead: %s", name, exc
            )
            if self._engine.version != "base" or self._engine.sources:
                self._engine = self._build(None, "base")
            return False
        self._engine = engine
        log.info("serving adapter %s%s", version, " with user phrases" if phrases else "")
        return ok

    def _check_adapter(self, adapter: str | Path | dict) -> Adapter:
        if isinstance(adapter, dict):
            return check_adapter(adapter, self.artifacts)
        path = Path(adapter)
        if not path.is_file():
            raise ArtifactError(f"adapter file {path} does not exist")
        return load_adapter(path, self.artifacts)

    # --- prediction ------------------------------------------------------------------------
    def predict(self, context: str, k: int = 3) -> Prediction:
        """The top-k whole words for the text before the cursor (completions of the word being
        typed, or the next word at a boundary), most probable first."""
        started = time.perf_counter()
        engine = self._engine  # one engine for the whole call, even if a swap happens
        query = make_query(context, k, self.context_tokens)
        if isinstance(query, str):  # a "word" too long to complete
            return Prediction(query, [], engine.version, _ms(started))
        answer = engine.cached(query) if engine.cache else None
        if answer is None:
            answer = self._compute(engine, query)
            if engine.cache:
                engine.remember(query, answer)
        return _prediction(query, answer, engine.version, started)

    def predict_cached(self, context: str, k: int = 3) -> Prediction | None:
        """`predict`'s answer if it is already known (asked before, or computed ahead), else
        None; never runs the model, so it is cheap enough for the daemon's event loop."""
        started = time.perf_counter()
        engine = self._engine
        if not engine.cache:
            return None
        query = make_query(context, k, self.context_tokens)
        if isinstance(query, str):
            return None
        answer = engine.cached(query)
        if answer is None:
            return None
        return _prediction(query, answer, engine.version, started)

    def prefetch(self, context: str, k: int = 3, stop: Callable[[], bool] | None = None) -> int:
        """Compute ahead what the next keystroke after `context` will likely ask: the word
        continued by the next letter of each of the top suggestions, and the next word once
        the typed word is complete. Only fills the caches (the results, the next-token
        distributions), so answers are the same with or without it; the daemon runs it while
        it has nothing else to do. `stop` is asked before every session run: once it says
        True, the work ahead is dropped (what was computed stays cached), so a real request
        never waits behind it for more than one run. Returns how many predictions it
        finished (0 with the cache off, when all were cached already, or when stopped first)."""
        engine = self._engine
        if not engine.cache:
            return 0
        query = make_query(context, k, self.context_tokens)
        if isinstance(query, str):
            return 0
        done = engine.cached(query)
        if done is None:
            return 0  # not asked yet: nothing to guess from
        ahead: list[str] = []
        for c in done.candidates:
            if c.kind != "word":
                continue
            if c.word == query.prefix:
                ahead.append(" ")  # a whole word typed: the next one
            elif len(c.word) > len(query.prefix):
                ahead.append(c.word[len(query.prefix)])
        computed = 0
        for typed in list(dict.fromkeys(ahead))[:PREFETCH]:
            nxt = make_query(context + typed, k, self.context_tokens)
            if isinstance(nxt, str) or engine.cached(nxt) is not None:
                continue
            try:
                engine.remember(nxt, self._compute(engine, nxt, stop))
            except Stopped:
                break
            computed += 1
        return computed

    def context_ids(self, query: Query) -> tuple[int, ...]:
        """Token ids the model reads for `query` (at most `context_tokens`)."""
        key = (query.window, query.at_start)
        if self.cache:
            with self._tokenized_lock:
                hit = self._tokenized.get(key)  # typing inside a word: same window as before
            if hit is not None:
                return hit
        ids = self.tokenizer.encode(query.window, add_special_tokens=False).ids
        if query.at_start:
            ids = [self.eos_id, *ids]
        out = tuple(ids[-self.context_tokens :])
        if self.cache:
            with self._tokenized_lock:
                self._tokenized[key] = out
                while len(self._tokenized) > TOKENIZED_SIZE:
                    self._tokenized.pop(next(iter(self._tokenized)))
        return out

    def _compute(
        self, engine: Engine, query: Query, stop: Callable[[], bool] | None = None
    ) -> Answer:
        context = self.context_ids(query)
        state = engine.take_state(context)
        state.stop = stop
        try:
            return self._search(engine, state, context, query)
        finally:
            state.stop = None
            engine.give_back(state)

    def _search(
        self, engine: Engine, state: _State, context: tuple[int, ...], query: Query
    ) -> Answer:
        root = engine.root(state, context)
        evaluate = engine.evaluator(state, context)
        k = query.k
        sources = engine.sources
        # Sources that reweigh the model's words see a few more of them (the same beam width,
        # but a weaker k-th-best bound to prune with: a little more search per keystroke).
        lm_words = max([k, *(s.lm_words for s in sources)])
        real = engine.real
        found = find_words(self.table, root, evaluate, query.lead, query.prefix, k, real, lm_words)
        draft = Draft(found)
        if sources:
            lm = ContextModel(self, engine, state, context, query, root, evaluate)
            for source in sources:
                draft = source.suggest(query, draft, lm)
        candidates = [Candidate(w, p, "word") for w, p in draft.words.items()]
        candidates += draft.others
        if not query.prefix:
            ids = self.table.punct_spaced if query.lead else self.table.punct_plain
            if len(ids):
                best = ids[np.argsort(-root.probs[ids], kind="stable")[:MAX_PUNCT]]
                punct: dict[str, float] = {}
                for t in best.tolist():
                    mark = self.table.punct[t]
                    punct[mark] = punct.get(mark, 0.0) + float(root.probs[t])
                share = draft.lm_share  # what the sources' blends left the model
                candidates += [Candidate(m, share * p, "punct") for m, p in punct.items()]
        candidates.sort(key=lambda c: (-c.score, c.word))
        if not candidates and query.prefix and WORD_RE.fullmatch(query.prefix):
            if real is None or real.is_word(query.prefix):
                # Nothing found within the search's limits: offer the word as typed, score 0
                # (no model estimate), so a completion list is never empty for a real word.
                candidates = [Candidate(query.prefix, 0.0, "word")]
        return Answer(tuple(candidates[:k]), draft.beside)

    def is_real_word(self, word: str, *sources: SuggestionSource) -> bool:
        """A word the model's lexicon or the vocabulary of one of `sources` holds (any word
        without a lexicon)."""
        return self.lexicon is None or RealWords(self.lexicon, sources).is_word(word)


class ContextModel:
    """The language model as the sources see it during one prediction (a `LanguageModel`):
    the engine, key/value slot and context of the prediction."""

    def __init__(
        self, predictor: Predictor, engine: Engine, state: _State, context: tuple[int, ...],
        query: Query, root: Next, evaluate: Evaluate,
    ) -> None:  # fmt: skip
        self._predictor = predictor
        self._engine = engine
        self._state = state
        self._context = context
        self._query = query
        self._root = root
        self._evaluate = evaluate

    def words(self, prefix: str, k: int, before: str | None = None) -> dict[str, float]:
        root, evaluate, lead = self._at(before)
        table, real = self._predictor.table, self._engine.real
        return find_words(table, root, evaluate, lead, prefix, k, real)

    def probability(self, word: str, before: str | None = None) -> float:
        root, evaluate, lead = self._at(before)
        raw = word.encode("utf-8")
        found = search_words(
            self._predictor.table, root, evaluate, lead, raw, 1, _depth(raw), BEAM_WIDTH,
            exact=True,
        )  # fmt: skip
        return found.get(raw, 0.0)

    def is_real(self, word: str) -> bool:
        real = self._engine.real
        return real is None or real.is_word(word)

    def _at(self, before: str | None) -> tuple[Next, Evaluate, bytes]:
        """The next-token distribution after `before`, an evaluator of the tokens after it,
        and the lead of the word that follows."""
        query = self._query
        if before is None:
            return self._root, self._evaluate, query.lead
        text, lead = (before[:-1], b" ") if before.endswith(" ") else (before, b"")
        text = SURROGATES.sub("\ufffd", text)
        predictor = self._predictor
        if text.startswith(query.window):
            # The query's text continued: its context's key/values, and the new tokens run on
            # them as hypotheses are (GPT-2's pre-tokenizer splits before a space, so the
            # continuation's tokens are those of the whole text).
            more = text[len(query.window) :]
            tail = predictor.tokenizer.encode(more, add_special_tokens=False).ids if more else []
            if not tail:
                return self._root, self._evaluate, lead
            if len(tail) <= MAX_DEPTH:
                ahead = tuple(tail)
                evaluate = self._evaluate

                def continued(hyps: list[tuple[int, ...]]) -> list[Next]:
                    return evaluate([ahead + h for h in hyps])

                return evaluate([ahead])[0], continued, lead
        # Another text: the slot moves to it, keeping the tokens it shares with the context.
        context = predictor.context_ids(Query(text, query.at_start, lead, "", query.k))
        engine, state = self._engine, self._state
        return engine.root(state, context), engine.evaluator(state, context), lead


def _depth(raw_prefix: bytes) -> int:
    # Room for the prefix (a token spells two bytes or more, but for odd text) and the rest.
    return min(MAX_DEPTH, MAX_WORD_TOKENS + (len(raw_prefix) + 1) // 2)


def _search_decoded(
    table: TokenTable,
    root: Next,
    evaluate: Evaluate,
    lead: bytes,
    prefix: str,
    k: int,
    real: RealWords | None,
) -> dict[str, float]:
    raw_prefix = prefix.encode("utf-8")
    beam = max(BEAM_WIDTH, k)
    raw = search_words(table, root, evaluate, lead, raw_prefix, k, _depth(raw_prefix), beam, real)
    words: dict[str, float] = {}
    for word_bytes, p in raw.items():
        try:
            word = word_bytes.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a multi-byte character cut off by the depth limit
        if p > 0 and WORD_RE.fullmatch(word) and word.startswith(prefix):
            words[word] = words.get(word, 0.0) + p
    return words


def find_words(
    table: TokenTable,
    root: Next,
    evaluate: Evaluate,
    lead: bytes,
    prefix: str,
    k: int,
    real: RealWords | None = None,
    wanted: int = 0,
) -> dict[str, float]:
    """The most probable whole words starting with `prefix` (at least k, `wanted` if more),
    with their probabilities. A capitalised prefix keeps its capitals."""
    found = _search_decoded(table, root, evaluate, lead, prefix, max(k, wanted), real)
    if len(found) < k and prefix != prefix.lower():
        # A capitalised prefix the model rarely saw capitalised ("THAN", "Xylo"): complete
        # its lower-case form and carry the typed capitals over.
        lower = prefix.lower()
        shout = len(prefix) > 1 and prefix.isupper()
        for word, p in _search_decoded(table, root, evaluate, lead, lower, k, real).items():
            tail = word[len(lower) :]
            cased = prefix + (tail.upper() if shout else tail)
            if WORD_RE.fullmatch(cased) and cased not in found:
                found[cased] = p
    return found


def _prediction(query: Query, answer: Answer, version: str, started: float) -> Prediction:
    return Prediction(
        query.prefix, list(answer.candidates), version, _ms(started), list(answer.beside)
    )


def _same(a: Sequence[object], b: Sequence[object]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _describe(adapter: str | Path | dict) -> str:
    return "(in-memory tensors)" if isinstance(adapter, dict) else str(adapter)


def _version_name(adapter: str | Path | dict, tensors: Adapter) -> str:
    if isinstance(adapter, dict):
        return f"tensors-{tensors_sha256(tensors)[:12]}"
    return Path(adapter).stem
