"""The suggestion-source seam: a source served through it changes the predictions, and the
language model it is given answers as the predictor does."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from wordahead.predict.lexicon import Lexicon
from wordahead.predict.predictor import Predictor
from wordahead.predict.query import Query
from wordahead.predict.sources.base import Draft, LanguageModel, WordSet
from wordahead.types import Candidate

CONTEXT = "Thank you so much for "


class Favourite:
    """A test double: puts one word first, corrects nothing, and offers a phrase beside."""

    lm_words = 0

    def __init__(self, word: str) -> None:
        self.word = word

    def suggest(self, query: Query, draft: Draft, lm: LanguageModel) -> Draft:
        words = {**draft.words, self.word: 0.9}
        fix = Candidate("Thanks", 0.95, "correction")
        phrase = Candidate(f"{self.word} and more", 0.5, "phrase")
        return replace(draft, words=words, others=(fix,), beside=(phrase,))

    def vocabulary(self) -> WordSet:
        return WordSet({self.word}, (Lexicon([self.word]),))


class Asking:
    """A test double that only asks the model, and keeps what it was told."""

    lm_words = 0

    def __init__(self, ask: dict[str, tuple[str, str | None]]) -> None:
        self.ask = ask  # name -> (prefix, text before the word)
        self.told: dict[str, dict[str, float]] = {}
        self.exact: dict[str, float] = {}

    def suggest(self, query: Query, draft: Draft, lm: LanguageModel) -> Draft:
        for name, (prefix, before) in self.ask.items():
            self.told[name] = lm.words(prefix, 3, before)
            for word in self.told[name]:
                self.exact[word] = lm.probability(word, before)
        assert lm.is_real("zeppelin")  # no lexicon: any spelling is a word
        return draft

    def vocabulary(self) -> None:
        return None


def test_a_source_served_through_the_seam_changes_the_predictions(tiny_llama: Path) -> None:
    predictor = Predictor(tiny_llama)
    plain = predictor.predict(CONTEXT, k=3)
    assert "zeppelin" not in plain.words
    assert set(plain.to_json()) == {"prefix", "candidates", "adapter", "latency_ms"}
    assert all(set(c) == {"word", "score", "kind"} for c in plain.to_json()["candidates"])

    assert predictor.load_adapter(None, sources=[Favourite("zeppelin")])
    served = predictor.predict(CONTEXT, k=3)
    assert served.words[:2] == ["Thanks", "zeppelin"]  # the correction ranks with the words
    assert [c.kind for c in served.candidates[:2]] == ["correction", "word"]
    assert served.to_json()["beside"] == [
        {"word": "zeppelin and more", "score": 0.5, "kind": "phrase"}
    ]
    cached = predictor.predict_cached(CONTEXT, k=3)  # the results cache keeps both
    assert cached is not None and (cached.candidates, cached.beside) == (
        served.candidates,
        served.beside,
    )

    predictor.load_adapter(None)  # no sources: the model's own answer again
    assert predictor.predict(CONTEXT, k=3).candidates == plain.candidates


def test_a_sources_words_count_as_real(tiny_llama: Path, tmp_path: Path) -> None:
    import shutil

    from wordahead.predict.lexicon import FILE

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    Lexicon.save(model / FILE, ["thank", "you", "so", "much", "for"])
    predictor = Predictor(model)
    source = Favourite("Zanzibar")
    assert not predictor.is_real_word("Zanzibar")
    assert predictor.is_real_word("Zanzibar", source) and predictor.is_real_word("zanzibar", source)


def test_the_blend_a_source_takes_scales_the_models_punctuation(tiny_llama: Path) -> None:
    class Half:
        lm_words = 0

        def suggest(self, query: Query, draft: Draft, lm: LanguageModel) -> Draft:
            return draft.blended(draft.words, 0.5)

        def vocabulary(self) -> None:
            return None

    predictor = Predictor(tiny_llama)
    context = ""  # the random tiny model's punctuation makes the top 20 at the start
    plain = {c.word: c.score for c in predictor.predict(context, k=20).candidates}
    predictor.load_adapter(None, sources=[Half()])
    served = predictor.predict(context, k=20).candidates
    assert any(c.kind == "punct" for c in served)
    for c in served:
        if c.kind == "punct":
            assert c.score == pytest.approx(plain[c.word] * 0.5)
        elif c.word in plain:  # (words from beyond the 20th moved up past halved marks)
            assert c.score == pytest.approx(plain[c.word])


def test_the_model_a_source_asks_answers_as_the_predictor_does(tiny_llama: Path) -> None:
    # The same context with another prefix, the context continued, and another text: each
    # as a predict call of its own would answer (up to float rounding of other batches).
    ask = {
        "other prefix": ("th", None),
        "continued": ("s", CONTEXT + "your "),
        "changed": ("yo", "Thank you very much for "),
    }
    asking = Asking(ask)
    predictor = Predictor(tiny_llama)
    predictor.load_adapter(None, sources=[asking])
    predictor.predict(CONTEXT, k=3)
    reference = Predictor(tiny_llama, cache=False)
    for name, (prefix, before) in ask.items():
        expected = reference.predict((before or CONTEXT) + prefix, k=3).candidates
        told = asking.told[name]
        assert sorted(told, key=told.__getitem__, reverse=True)[:3] == [c.word for c in expected]
        for c in expected:
            assert told[c.word] == pytest.approx(c.score, rel=1e-3)
            # The word as spelled: at least what its search found (other tokenizations add).
            assert asking.exact[c.word] >= c.score * (1 - 1e-3)
            assert asking.exact[c.word] == pytest.approx(c.score, rel=0.05)
