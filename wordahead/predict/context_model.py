"""The language model as the suggestion sources see it (`sources.base.LanguageModel`)."""

from __future__ import annotations

from collections.abc import Callable

from wordahead.predict.engine import Engine
from wordahead.predict.near_search import near_words_decoded
from wordahead.predict.query import SURROGATES, Query
from wordahead.predict.search import (
    BEAM_WIDTH,
    MAX_DEPTH,
    Evaluate,
    find_words,
    search_words,
    word_depth,
)
from wordahead.predict.slots import Slot
from wordahead.predict.tokens import Next, TokenTable

Tokenize = Callable[[str], list[int]]  # text -> token ids (no special tokens)
ContextIds = Callable[[Query], tuple[int, ...]]  # a query -> the token ids the model reads


class ContextModel:
    """The language model as the sources see it during one prediction (a `LanguageModel`):
    the engine, key/value slot and query of the prediction, the next-token distribution
    after its context (`root`) and the evaluator of the tokens after it."""

    def __init__(
        self, table: TokenTable, tokenize: Tokenize, context_ids: ContextIds, engine: Engine,
        slot: Slot, query: Query, root: Next, evaluate: Evaluate,
    ) -> None:  # fmt: skip
        self._table = table
        self._tokenize = tokenize
        self._context_ids = context_ids
        self._engine = engine
        self._slot = slot
        self._query = query
        self._root = root
        self._evaluate = evaluate

    def words(self, prefix: str, k: int, before: str | None = None) -> dict[str, float]:
        root, evaluate, lead = self._at(before)
        return find_words(self._table, root, evaluate, lead, prefix, k, self._engine.real)

    def probability(self, word: str, before: str | None = None) -> float:
        root, evaluate, lead = self._at(before)
        raw = word.encode("utf-8")
        found = search_words(
            self._table, root, evaluate, lead, raw, 1, word_depth(raw), BEAM_WIDTH,
            exact=True,
        )  # fmt: skip
        return found.get(raw, 0.0)

    def near_words(
        self, spellings: dict[str, float], k: int, floor: float = 0.0, before: str | None = None
    ) -> dict[str, float]:
        root, evaluate, lead = self._at(before)
        real = self._engine.real
        return near_words_decoded(self._table, root, evaluate, lead, spellings, k, real, floor)

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
        if text.startswith(query.window):
            # The query's text continued: its context's key/values, and the new tokens run on
            # them as hypotheses are (GPT-2's pre-tokenizer splits before a space, so the
            # continuation's tokens are those of the whole text).
            more = text[len(query.window) :]
            tail = self._tokenize(more) if more else []
            if not tail:
                return self._root, self._evaluate, lead
            if len(tail) <= MAX_DEPTH:
                ahead = tuple(tail)
                evaluate = self._evaluate

                def continued(hyps: list[tuple[int, ...]]) -> list[Next]:
                    return evaluate([ahead + h for h in hyps])

                return evaluate([ahead])[0], continued, lead
        # Another text: the slot moves to it, keeping the tokens it shares with the context.
        context = self._context_ids(Query(text, query.at_start, lead, "", query.k))
        engine, slot = self._engine, self._slot
        return engine.root(slot, context), engine.evaluator(slot, context), lead
