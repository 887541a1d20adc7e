"""One adapter served by the predictor's session: its LoRA inputs, the session runs (the
hypotheses of one depth as one tree), and the caches that belong to the adapter.

One session serves every adapter (the graph takes the LoRA tensors as inputs), so a swap builds
no session. An `Engine` is built completely, then swapped in by replacing one reference;
predictions in flight finish on the old engine.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wordahead.model import runtime
from wordahead.model.artifacts import (
    DAMAGED_MODEL_ADVICE,
    TREE_BIAS,
    TREE_OUTPUTS,
    ArtifactError,
    ArtifactSet,
)
from wordahead.predict.lexicon import Lexicon
from wordahead.predict.real_words import RealWords
from wordahead.predict.search import BEAM_WIDTH, Evaluate
from wordahead.predict.slots import SLOTS, Slot, Slots, common_length
from wordahead.predict.sources.base import SuggestionSource
from wordahead.predict.tokens import Next, TokenTable, next_distributions
from wordahead.types import Candidate

LRU_SIZE = 1024  # finished results


class Stopped(Exception):
    """Work ahead given up: a real request wants the CPU (see `Predictor.prefetch`)."""


_MASKED = float(np.finfo(np.float32).min)  # what the exported graphs add where attention may not go


def as_tree(rows: list[tuple[int, ...]]) -> tuple[np.ndarray, list[int], list[int]]:
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
        raise ArtifactError(f"cannot load {source}: {exc}; {DAMAGED_MODEL_ADVICE}") from exc


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
        self.slots = Slots(slots)
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

    def take_state(self, context: tuple[int, ...]) -> Slot:
        """The caches to use for one prediction of `context`: a slot of the engine's (give it
        back with `give_back`), or fresh ones (cache off)."""
        return self.slots.take(context) if self.cache else Slot()

    def give_back(self, state: Slot) -> None:
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

    def root(self, state: Slot, context: tuple[int, ...]) -> Next:
        """The next-token distribution after the context (from the cache if it is there)."""
        return state.get(context) or self.rebase(state, context)

    def rebase(self, state: Slot, context: tuple[int, ...]) -> Next:
        """Make `context` the base: run the tokens after its common prefix with the old base."""
        # The last token runs for its logits even when the base holds it.
        common = min(common_length(state.base, context), len(context) - 1)
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

    def evaluator(self, state: Slot, context: tuple[int, ...]) -> Evaluate:
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
                    ids, parents, outputs = as_tree(rows)
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
