"""Phrase completion: the greedy phrase search, and what the phrase-aware typist counts,
checked exactly on hand-made texts with a scripted predictor."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from wordahead import cli
from wordahead.evaluate.phrase_typist import PhraseTrace, replay, right_words, trace
from wordahead.evaluate.simulate import simulate
from wordahead.predict.sources.phrase_completion import (
    Chain,
    PhraseCompleter,
    PhraseSettings,
    choose,
    word_chain,
)
from wordahead.predict.words import partial_word, words
from wordahead.types import Candidate, KeyboardError, Prediction

TABLE = {
    "": [("thank", 0.3), ("that", 0.1)],
    "thank": [("you", 0.9)],
    "you": [("for", 0.8)],
    "for": [("the", 0.5), ("a", 0.2)],
    "the": [("end", 0.6)],
}


class BigramPredictor:
    """Suggests the words the table lists after the last whole word (the start of the text:
    ""), those that start with the typed part of the word, with the table's probabilities."""

    def __init__(self, table: dict[str, list[tuple[str, float]]]) -> None:
        self.table = table
        self.contexts: list[str] = []

    def predict(self, context: str, k: int = 3) -> Prediction:
        self.contexts.append(context)
        prefix = partial_word(context)
        before = words(context[: len(context) - len(prefix)].split("\n")[-1])
        last = before[-1] if before else ""
        found = [(w, p) for w, p in self.table.get(last, []) if w.startswith(prefix)][:k]
        return Prediction(prefix, [Candidate(w, p) for w, p in found], adapter="test")


def settings(**kw: object) -> PhraseSettings:
    return PhraseSettings(**{"max_words": 4, "threshold": 0.5, **kw})  # type: ignore[arg-type]


def test_the_chain_follows_the_top_word_and_stops_below_the_floor():
    chain = word_chain(BigramPredictor(TABLE), "thank ", max_words=5, floor=0.3)
    # you .9, for .72, the .36, end .216: the word that fell below the floor is kept
    assert chain.words == ("you", "for", "the", "end")
    assert chain.probabilities == (0.9, 0.8, 0.5, 0.6)
    assert word_chain(BigramPredictor(TABLE), "thank ", 2, 0.0).words == ("you", "for")


def test_the_longest_phrase_above_the_threshold_is_shown():
    chain = word_chain(BigramPredictor(TABLE), "thank ", max_words=5, floor=0.01)
    phrase = choose(chain, settings())
    assert phrase is not None and phrase.text == "you for" and phrase.words == ("you", "for")
    assert phrase.probability == pytest.approx(0.72)
    longer = choose(chain, settings(threshold=0.3))
    assert longer is not None and longer.text == "you for the"
    # normalised: the geometric mean per word, so the fourth word (0.6) keeps it above 0.6
    normalised = choose(chain, settings(threshold=0.6, normalised=True))
    assert normalised is not None and normalised.text == "you for the end"
    assert choose(chain, settings(threshold=0.8)) is None  # "you" alone is not a phrase


def test_inside_a_word_the_phrase_completes_it_first():
    completer = PhraseCompleter(BigramPredictor(TABLE), settings(max_words=2))
    phrase = completer.complete("tha")
    # "thank" is 3/4 of the words that complete "tha"; then "you" 0.9
    assert phrase is not None and phrase.text == "nk you" and phrase.prefix == "tha"
    assert phrase.probability == pytest.approx(0.75 * 0.9)


def test_the_users_phrases_can_carry_a_phrase_the_model_doubts():
    chain = Chain("", ("see", "you"), (0.4, 0.3), (0.9, 0.9))
    assert choose(chain, settings()) is None
    phrase = choose(chain, settings(threshold=0.45, user_weight=0.6))
    assert phrase is not None and phrase.probability == pytest.approx(0.7 * 0.66)


def test_bad_settings_are_refused():
    with pytest.raises(KeyboardError, match="max_words"):
        PhraseSettings(max_words=1)
    with pytest.raises(KeyboardError, match="threshold"):
        PhraseSettings(threshold=0.0)


def test_a_phrase_is_right_only_when_it_ends_where_a_word_ends():
    text = "the bookshelf is here"
    ends = {3, 13, 16, 21}
    assert right_words(text, 0, ends, ["the", "book"], "") == 1
    assert right_words(text, 0, ends, ["the", "bookshelf", "is"], "") == 3
    assert right_words(text, 1, ends, ["the", "bookshelf"], "t") == 2
    assert right_words(text, 4, ends, ["bookshelf", "was"], "") == 1


def typed(text: str | list[str], **kw: object) -> PhraseTrace:
    messages = [text] if isinstance(text, str) else text
    return trace(BigramPredictor(TABLE), messages, **kw)  # type: ignore[arg-type]


def test_accepting_a_right_phrase_costs_one_keystroke():
    traced = typed("thank you for the help")
    report = replay(traced, settings())
    # word-only: thank, you, for, the picked (1 each), help typed (4), 4 spaces
    assert report.keystrokes_words == 12
    # at the start "thank you" is only 0.27 likely; at "you", "you for" (0.72) is shown and
    # taken in one keystroke: thank (1), " ", "you for" (1), " ", the (1), " ", help (4)
    assert report.keystrokes_phrases == 10
    assert report.phrase_saved == 2 and report.phrase_ksr == pytest.approx(2 / 22)
    assert report.ksr_phrases == pytest.approx(1 - 10 / 22)
    # word starts reached: thank, you, the, help; a phrase shown (and right) at "you" only
    assert (report.word_starts, report.shown, report.right) == (4, 1, 1)
    assert report.trigger_rate == pytest.approx(1 / 4) and report.precision == 1.0
    assert replay(traced, None).keystrokes_phrases == 12


def test_a_wrong_phrase_is_counted_and_not_taken_unless_words_may_be_taken_one_by_one():
    traced = typed("thank you for a start")
    whole = replay(traced, settings(threshold=0.3))
    # shown "you for the" at "you", "for the" at "for" and "the end" at "a": all wrong
    assert (whole.shown, whole.right, whole.precision) == (3, 0, 0.0)
    assert whole.keystrokes_phrases == whole.keystrokes_words == 13
    one_word = replay(traced, settings(threshold=0.3), accept_words=True)
    # "you for" taken word by word (2 keystrokes, the space between them included)
    assert one_word.keystrokes_phrases == 12


def test_the_trace_types_exactly_as_simulate_does():
    messages = ["thank you for the end", "that is all, thank you", "the end"]
    history = ["thank you"]
    traced = trace(BigramPredictor(TABLE), messages, history=history, k=2)
    expected = simulate(BigramPredictor(TABLE), messages, history=history, k=2)
    for key in ("chars", "keystrokes", "words", "top1", "top3", "predictions"):
        assert getattr(traced.report, key) == getattr(expected, key), key
    assert replay(traced, None).keystrokes_phrases == expected.keystrokes
    again = PhraseTrace.from_json(traced.to_json())
    assert replay(again, settings()) == replay(traced, settings())


def test_keyboard_eval_reports_phrases_next_to_the_word_only_typing(capsys, tmp_path, tiny_llama):
    path = tmp_path / "user.txt"
    path.write_text("Hello there, it's me.\nSecond message: well-known words!\n")
    argv = ["eval", str(path), "--model", str(tiny_llama), "--adapter", "base", "--phrases"]
    assert cli.main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    before, phrases = data["before"], data["phrases_before"]
    assert phrases["settings"] == asdict(PhraseSettings())
    for report in (phrases["whole"], phrases["one_word"]):
        assert report["keystrokes_words"] == before["keystrokes"]
        assert report["chars"] == before["chars"]
        assert report["keystrokes_phrases"] <= report["keystrokes_words"]
    assert cli.main(argv) == 0
    assert "precision" in capsys.readouterr().out


def test_the_phrase_source_offers_the_same_phrase_beside_the_words(tiny_llama):
    from wordahead.predict.predictor import Predictor
    from wordahead.predict.sources.phrase_completion import PhraseSource

    unsure = PhraseSettings(max_words=3, threshold=1e-9)  # a tiny random model is never sure
    served = Predictor(tiny_llama)
    served.load_adapter(None, sources=[PhraseSource(unsure)])
    alone = PhraseCompleter(Predictor(tiny_llama), unsure)
    for context in ("I would like to ", "I would like to bo"):
        prediction = served.predict(context, 3)
        expected = alone.complete(context)
        assert expected is not None
        (beside,) = prediction.beside
        assert beside.kind == "phrase" and beside.word == expected.text
        assert beside.score == pytest.approx(expected.score, rel=1e-3)
        assert prediction.words == alone.predictor.predict(context, 3).words  # words unchanged
