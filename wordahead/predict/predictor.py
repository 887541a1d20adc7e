"""Word-level next-word prediction and word completion from the ONNX inference graph.

For the text before the cursor, `Predictor.predict` finds the k most probable whole words
(`search`), blends in the suggestion sources it serves (`sources`), and adds the punctuation
marks the model finds likely at a word boundary (kind "punct"). "Never empty": when the search
finds no word (an odd prefix beyond its depth limit), the prefix itself comes back with score 0
(no model estimate) if it is a real word; only a run of word characters too long to be a word
(> MAX_PREFIX_CHARS) gets no suggestions at all.

The parts: `query` (the model's window of the text), `tokens` (the vocabulary as bytes),
`search` (the word search), `slots` (key/value cache slots), `engine` (one adapter: session
runs and caches), `context_model` (the model as sources see it), `real_words` (what may be
offered). Finished results are kept in an LRU per engine; `load_adapter` swaps engines
atomically.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from wordahead import memory
from wordahead.model.artifacts import (
    Adapter,
    ArtifactError,
    ArtifactSet,
    adaptable_graph,
    check_adapter,
    load_adapter,
    tensors_sha256,
)
from wordahead.predict.context_model import ContextModel
from wordahead.predict.engine import Answer, Engine, Stopped, open_session
from wordahead.predict.lexicon import Lexicon
from wordahead.predict.query import Query, make_query
from wordahead.predict.real_words import RealWords
from wordahead.predict.search import MAX_DEPTH, find_words
from wordahead.predict.slots import SLOTS, Slot
from wordahead.predict.sources import assemble
from wordahead.predict.sources.base import Draft, SuggestionSource
from wordahead.predict.sources.phrase_file import PhraseError
from wordahead.predict.sources.phrases import PhraseModel
from wordahead.predict.sources.typos import TypoCorrection, TypoSettings
from wordahead.predict.tokens import TokenTable
from wordahead.predict.words import WORD_RE
from wordahead.types import MAX_PUNCT, Candidate, Prediction

log = logging.getLogger(__name__)

TOKENIZED_SIZE = 2 * SLOTS  # tokenized context windows kept
PREFETCH = 2  # next keystrokes computed ahead (the letters the top suggestions go on with)


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
        typos: TypoSettings | None = None,
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
        self.lexicon = Lexicon.of_model(self.artifacts.root)  # None: any spelling goes
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
        typos = typos or TypoSettings()  # corrections; the daemon passes the user's settings
        self.typos = TypoCorrection(self.lexicon, typos) if typos.enabled and self.lexicon else None
        self._engine = self._build(None, "base", assemble(None, self.lexicon, self.typos))

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
        sources = tuple(given) if given is not None else assemble(phrases, self.lexicon, self.typos)
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
            if self._engine.version != "base" or self._engine.phrases is not None:
                self._engine = self._build(None, "base", assemble(None, self.lexicon, self.typos))
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

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

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
        self, engine: Engine, state: Slot, context: tuple[int, ...], query: Query
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
            lm = ContextModel(
                self.table, self._tokenize, self.context_ids, engine, state, query, root, evaluate
            )
            for source in sources:
                draft = source.suggest(query, draft, lm)
        candidates = [Candidate(w, p, "word") for w, p in draft.words.items()]
        candidates += draft.others
        if not query.prefix:
            punct = self.table.punctuation(root.probs, bool(query.lead), MAX_PUNCT)
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
