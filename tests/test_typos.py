"""Typo tolerance: keyboard layouts, the slip model and its search, the typo source (noisy
channel, context repair), corrections on the wire, and the noise model of the evaluation."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tests.tiny_models import TEXT
from wordahead.evaluate.noise import Slips, read_misspellings, typo_report
from wordahead.predict.layouts import layout
from wordahead.predict.lexicon import FILE, Lexicon
from wordahead.predict.predictor import Predictor
from wordahead.predict.query import Query
from wordahead.predict.slips import OneSlip, SlipCosts, near_prefixes
from wordahead.predict.sources.base import Draft
from wordahead.predict.sources.phrases import PhraseModel
from wordahead.predict.sources.typos import CORRECTION, TypoCorrection, TypoSettings
from wordahead.types import Candidate, KeyboardError, Prediction

WORDS = ["the", "then", "they", "there", "hello", "help", "from", "form", "receive", "recent"]
QWERTY = layout("qwerty")


def test_layouts_know_which_keys_are_neighbours() -> None:
    assert QWERTY.keys_near("f") == {"d", "g", "r", "t", "c", "v"}
    assert QWERTY.near("E", "w") and not QWERTY.near("e", "p")
    assert layout("qwertz").near("z", "u") and not QWERTY.near("z", "u")
    assert layout("AZERTY").near("a", "z") and layout("azerty").near("q", "s")
    assert layout("dvorak").near("e", "u")
    with pytest.raises(KeyboardError, match="qwerty, qwertz, azerty, dvorak"):
        layout("colemak-dh")


def test_next_letters_are_the_children_of_a_prefix_in_the_words() -> None:
    lexicon = Lexicon(WORDS + ["Zoë", "zoo"])
    assert lexicon.next_letters("th") == "e"
    assert lexicon.next_letters("the") == "nry"
    assert lexicon.next_letters("zo") == "oë"
    assert lexicon.next_letters("x") == ""


def test_each_kind_of_slip_finds_the_word_meant_and_neighbours_cost_less() -> None:
    lexicon = Lexicon(WORDS)
    one = OneSlip([lexicon], QWERTY, SlipCosts(max_slips=1))
    assert "the" in one.near("teh")  # transposition
    assert "hello" in one.near("hwllo")  # a neighbouring key
    assert "hello" in one.near("helo")  # a letter of a double left out
    assert "hello" in one.near("hekllo")  # a stray key
    assert "from" in one.near("frm")  # a letter left out
    assert one.near("hwllo")["hello"] < one.near("hqllo")["hello"]  # w is next to e, q is not
    assert "form" not in one.near("form")  # what was typed is not its own correction
    costs = SlipCosts()
    assert (
        near_prefixes("yhe", lexicon, QWERTY)["the"] > near_prefixes("tje", lexicon, QWERTY)["the"]
    )  # the first letter is rarely the slip
    # The search made from scratch finds what the walk letter by letter does, and two slips.
    for typed in ("recieve", "rexeive", "thw", "frmo"):
        assert one.near(typed) == near_prefixes(typed, lexicon, QWERTY, replace(costs, max_slips=1))
    assert "receiv" in near_prefixes("rexiev", lexicon, QWERTY, costs)  # spellings of prefixes
    assert "receiv" not in one.near("rexiev")


def test_corrections_keep_the_literal_words_and_the_users_own_words() -> None:
    lexicon = Lexicon(WORDS)
    typos = TypoCorrection(lexicon)
    search = typos.source()._search
    # A part no real word starts with is corrected ...
    assert "the" in typos.weights("teh", search, None, 0.0)
    # ... one real words start with only when its words are unlikely here, and at a price.
    assert typos.weights("for", search, None, 0.5) == {}
    weak = typos.weights("form", search, None, 1e-6)
    assert 0 < weak["from"] < typos.weights("frmo", search, None, 0.0)["from"]
    user = PhraseModel.from_texts(["teh is what I call my cat"]).vocabulary()
    assert typos.weights("teh", search, user, 0.0) == {}
    assert typos.weights("te", search, None, 0.0) != {}  # two letters, no word starts so
    assert typos.weights("x2", search, None, 0.0) == {}  # digits: not a word to correct


class Model:
    """A test double of the language model a source is given."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, ...]] = []

    def words(self, prefix: str, k: int, before: str | None = None) -> dict[str, float]:
        self.asked.append(("words", prefix, before or ""))
        return {"cat": 0.3, "dog": 0.2} if (before or "").endswith("the ") else {"and": 0.4}

    def probability(self, word: str, before: str | None = None) -> float:
        return 0.0

    def near_words(
        self, spellings: dict[str, float], k: int, floor: float = 0.0, before: str | None = None
    ) -> dict[str, float]:
        self.asked.append(("near", ",".join(sorted(spellings)), before or ""))
        p = {"the": 0.05, "then": 0.01, "ten": 0.001, "tea": 0.001}
        return {w: weight * p.get(w, 1e-4) for w, weight in spellings.items() if w in p}

    def is_real(self, word: str) -> bool:
        return word.lower() in WORDS


def test_a_correction_replaces_the_typed_part_and_is_scored_by_the_noisy_channel() -> None:
    source = TypoCorrection(Lexicon(WORDS + ["ten", "tea"])).source()
    draft = source.suggest(Query("Look at", False, b" ", "Teh", 3), Draft({}), Model())
    fix = max(draft.others, key=lambda c: c.score)
    assert (fix.word, fix.kind, fix.replaces) == ("The", CORRECTION, 3)  # capitals carried over
    # Two spellings one slip away: the model's probability decides (the: 0.05, ten: 0.001).
    scores = {c.word: c.score for c in draft.others}
    assert scores["The"] == pytest.approx(50 * scores["Ten"])
    assert Candidate("x", 0.1).to_json() == {"word": "x", "score": 0.1, "kind": "word"}
    assert fix.to_json()["replaces"] == 3


def test_the_next_words_follow_a_confidently_corrected_word() -> None:
    source = TypoCorrection(Lexicon(WORDS + ["ten", "tea"])).source()
    model = Model()
    draft = source.suggest(Query("I saw teh", False, b" ", "", 3), Draft({"and": 0.4}), model)
    assert draft.words == {"cat": 0.3, "dog": 0.2}  # as after "I saw the "
    assert [a for a in model.asked if a[0] == "near"][0][2] == "I saw "  # "teh" in its context
    # A real word before the cursor is left as it is.
    kept = source.suggest(Query("I saw the", False, b" ", "", 3), Draft({"and": 0.4}), Model())
    assert kept.words == {"and": 0.4}
    off = TypoCorrection(Lexicon(WORDS), TypoSettings(repair=False)).source()
    assert off.suggest(Query("I saw teh", False, b" ", "", 3), Draft({"x": 1.0}), model).words == {
        "x": 1.0
    }


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYBOARD_TYPOS", "off")
    monkeypatch.setenv("KEYBOARD_LAYOUT", "QWERTZ")
    settings = TypoSettings.from_env()
    assert not settings.enabled and settings.layout == "qwertz"
    monkeypatch.setenv("KEYBOARD_LAYOUT", "bepo")
    with pytest.raises(KeyboardError, match="unknown keyboard layout"):
        TypoSettings.from_env()


@pytest.fixture()
def model_with_lexicon(tiny_llama: Path, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    Lexicon.save(model / FILE, {w.strip(".,!?'") for w in TEXT.split()})
    return model


def test_the_predictor_offers_the_word_meant_after_a_slip(model_with_lexicon: Path) -> None:
    predictor = Predictor(model_with_lexicon, typos=TypoSettings())
    answer = predictor.predict("Could you please send me the reoprt", k=3)
    fixes = [c for c in answer.candidates if c.kind == CORRECTION]
    assert "report" in [c.word for c in fixes]
    assert all(c.replaces == len("reoprt") for c in fixes)
    assert answer.to_json()["candidates"][0].get("replaces") == 6
    today = Predictor(model_with_lexicon, typos=TypoSettings(enabled=False))
    assert "report" not in today.predict("Could you please send me the reoprt", k=3).words
    # The user's own word is theirs: not corrected away.
    predictor.load_adapter(None, phrases=PhraseModel.from_texts(["my reoprt is here"] * 3))
    assert "report" not in predictor.predict("Could you please send me the reoprt", k=3).words


class Typist:
    """A predictor double: completes nothing, corrects 'teh' (and, wrongly, 'cat')."""

    def predict(self, context: str, k: int = 3) -> Prediction:
        typed = context.rsplit(" ", 1)[-1]
        fixes = {"teh": "the", "cat": "car", "t": "the"}
        if typed in fixes:
            return Prediction(typed, [Candidate(fixes[typed], 0.5, CORRECTION, len(typed))], "b")
        return Prediction(typed, [], "base")


def test_the_noise_model_types_slips_and_counts_what_they_cost() -> None:
    slips = Slips(QWERTY, seed=3)
    for word in ("there", "hello", "receive", "typing"):
        slipped = slips.one(word)
        assert slipped != word and slipped[0] == word[0]
    assert Slips(seed=1).one("because") == Slips(seed=1).one("because")  # reproducible
    assert slips.typed("because", 0.0) == "because"
    assert Slips(seed=0, misspellings={"receive": ["recieve"]}).one("receive") == "recieve"
    report = typo_report(Typist(), ["the cat sat"], slips=Slips(seed=2), rate=0.0)
    assert report.words == 3 and report.false_corrections == pytest.approx(1 / 3)
    assert report.ksr_clean == report.ksr_noisy  # no slips at rate 0
    assert 0 < report.ksr_clean < 1  # "the" was offered at "th"


def test_misspellings_are_read_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "misspellings.txt"
    path.write_text("# meant: typed\nreceive: recieve, receeve\nthe: teh\n")
    assert read_misspellings(path) == {"receive": ["recieve", "receeve"], "the": ["teh"]}
    path.write_text("receive recieve\n")
    with pytest.raises(KeyboardError, match="1: expected"):
        read_misspellings(path)


def test_the_editor_item_of_a_correction_replaces_the_typed_word() -> None:
    from lsprotocol import types as lsp
    from pygls.workspace import TextDocument

    from wordahead.editors.corrections import correction_item
    from wordahead.editors.lsp import EditorConfig

    doc = TextDocument("file:///note.txt", "Café recieve")
    position = lsp.Position(0, 12)
    command = lsp.Command("taken", "keyboard.accept")
    cand = {"word": "receive", "score": 0.2, "kind": CORRECTION, "replaces": 7}
    item = correction_item(doc, position, "Café recieve", cand, 0, command)
    assert item.text_edit == lsp.TextEdit(lsp.Range(lsp.Position(0, 5), position), "receive")
    assert item.filter_text == "recieve"  # kept by editors that filter on the typed word
    assert item.label_details is not None and item.label_details.description == "correction"
    assert item.command is command
    assert not EditorConfig.from_options({"corrections": False}).corrections
