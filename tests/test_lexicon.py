"""Real words only: the model's lexicon, the Predictor's filter and the simulation's count."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.tiny_models import TEXT
from wordahead.evaluate.simulate import simulate
from wordahead.predict.lexicon import FILE, Lexicon, LexiconError
from wordahead.predict.predictor import Predictor
from wordahead.predict.sources.phrases import PhraseModel

CONTEXTS = ["Thank you so much for ", "We are going to the b", "The meeting has been m", "I w"]


def test_lexicon_round_trip_is_case_insensitive_and_reproducible(tmp_path: Path):
    words = ["Tomorrow", "table", "don't", "well-known", "table"]
    assert Lexicon.save(tmp_path / "a.txt.gz", words) == 4
    Lexicon.save(tmp_path / "b.txt.gz", reversed(words))
    assert (tmp_path / "a.txt.gz").read_bytes() == (tmp_path / "b.txt.gz").read_bytes()
    lex = Lexicon.load(tmp_path / "a.txt.gz")
    assert len(lex) == 4
    assert "tomorrow" in lex and "TOMORROW" in lex and "Don't" in lex and "well-known" in lex
    assert "tomore" not in lex and "" not in lex and "tables" not in lex
    assert "mp3" in lex and "2nd" in lex  # words with digits are not dictionary words


def test_prefixes_and_words_beyond_ascii():
    # Packed as UTF-8: a multi-byte letter must neither shift the next word nor match a prefix
    # of another word that shares its first byte.
    lex = Lexicon(["café", "cafe", "cafés", "naïve", "zebra", "é"])
    assert "Café" in lex and "cafe" in lex and "é" in lex and "naïve" in lex and "zebra" in lex
    assert "caf" not in lex and "naive" not in lex and "cafè" not in lex
    assert lex.has_prefix("caf") and lex.has_prefix("CAFÉ") and lex.has_prefix("naï")
    assert not lex.has_prefix("cafè") and not lex.has_prefix("zebras")
    assert len(lex) == 6


def test_a_damaged_lexicon_is_a_clear_error(tmp_path: Path):
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(LexiconError, match="cannot be read"):
        Lexicon.load(bad)


@pytest.fixture()
def model_with_lexicon(tiny_llama: Path, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    Lexicon.save(model / FILE, {w.strip(".,!?'") for w in TEXT.split()} - {"beach"})
    return model


def test_the_predictor_offers_only_lexicon_words(tiny_llama: Path, model_with_lexicon: Path):
    lexicon = Lexicon.load(model_with_lexicon / FILE)
    # The random tiny model spells non-words freely (the filter has something to remove) ...
    plain = Predictor(tiny_llama)
    offered = [c.word for ctx in CONTEXTS for c in plain.predict(ctx, k=8).candidates]
    assert any(w not in lexicon for w in offered if w[0].isalpha())
    # ... and with a lexicon shipped beside the model, every word it offers is a real one.
    filtered = Predictor(model_with_lexicon)
    for ctx in CONTEXTS:
        words = [c.word for c in filtered.predict(ctx, k=8).candidates if c.kind == "word"]
        assert words, ctx
        assert all(w in lexicon for w in words), (ctx, words)
    assert "beach" not in [c.word for c in filtered.predict("to the bea", k=8).candidates]


def test_the_users_own_words_count_as_real(model_with_lexicon: Path):
    predictor = Predictor(model_with_lexicon)
    assert not predictor.is_real_word("Zanzibar")
    phrases = PhraseModel.from_texts(["We flew to Zanzibar.", "Zanzibar was warm."])
    assert predictor.is_real_word("Zanzibar", phrases) and predictor.is_real_word(
        "zanzibar", phrases
    )
    predictor.load_adapter(None, phrases=phrases)
    words = [c.word for c in predictor.predict("We flew to Z", k=5).candidates]
    assert "Zanzibar" in words


def test_simulation_counts_the_non_words_it_was_shown(tiny_llama: Path):
    lexicon = Lexicon([w.strip(".,!?'") for w in TEXT.split()])
    messages = ["Thank you so much for your help."]
    report = simulate(Predictor(tiny_llama), messages, k=3, real_word=lexicon.__contains__)
    assert report.nonwords > 0
    assert simulate(Predictor(tiny_llama), messages, k=3).nonwords == 0  # not counted
    everything = simulate(Predictor(tiny_llama), messages, k=3, real_word=lambda w: True)
    assert everything.nonwords == 0 and everything.ksr == report.ksr


def test_a_damaged_lexicon_beside_a_model_is_logged_and_serving_goes_on(
    model_with_lexicon: Path, caplog: pytest.LogCaptureFixture
):
    (model_with_lexicon / FILE).write_bytes(b"\x1f\x8b\x08\x00garbage")
    predictor = Predictor(model_with_lexicon)
    assert predictor.lexicon is None and predictor.predict("Thank you ", k=3).candidates
    assert "cannot be read" in caplog.text
