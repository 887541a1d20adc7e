"""The user phrase model: counts, Witten-Bell probabilities, the blend, files, and forgetting."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import pytest

from wordahead.learn.adapter_store import AdapterStore, forget_phrases
from wordahead.model.artifacts import ArtifactSet
from wordahead.paths import Home
from wordahead.predict.sources.phrase_file import PhraseError
from wordahead.predict.sources.phrases import START, PhraseModel, tokens

TEXTS = [
    "See you at the lake.",
    "See you at the lake tomorrow.",
    "See you at dinner.",
    "The lake is cold.",
]


def test_tokens_keep_words_and_punctuation_and_mark_message_starts() -> None:
    assert tokens("Hi, it's me.\nBye") == [START, "Hi", ",", "it's", "me", ".", START, "Bye"]
    assert tokens("at the", at_start=False) == ["at", "the"]


def test_counts() -> None:
    model = PhraseModel.from_texts(TEXTS)
    assert model.words == 19 and model.unigrams["lake"] == 3
    assert model.follow[("the",)] == {"lake": 2} and model.follow[("The",)] == {"lake": 1}
    assert model.follow[("at", "the")] == {"lake": 2}
    assert model.follow[(START,)] == {"See": 3, "The": 1}


def test_witten_bell_probabilities_by_hand() -> None:
    model = PhraseModel.from_texts(TEXTS)
    p1 = {w: n / 19 for w, n in model.unigrams.items()}
    # after "at": the (2), dinner (1): 3 tokens, 2 types
    p_the_at = (2 + 2 * p1["the"]) / (3 + 2)
    # after "you at": the (2), dinner (1), same counts
    expected = (2 + 2 * p_the_at) / (3 + 2)
    assert math.isclose(model.probability("the", ("you", "at")), expected)
    # an unseen context backs off to the shorter one; an unseen word only gets back-off mass
    assert math.isclose(model.probability("the", ("nowhere", "at")), p_the_at)
    assert model.probability("zebra", ("you", "at")) == 0.0


@pytest.mark.parametrize("context", [("you", "at"), (START,), ("lake",), ("unseen",), ()])
def test_probabilities_sum_to_one_over_the_vocabulary(context: tuple[str, ...]) -> None:
    model = PhraseModel.from_texts(TEXTS)
    total = sum(model.probability(w, context) for w in model.unigrams)
    assert math.isclose(total, 1.0)


def test_candidates_follow_context_and_prefix() -> None:
    model = PhraseModel.from_texts(TEXTS)
    after_the = model.candidates(("at", "the"), "")
    assert next(iter(after_the)) == "lake"
    assert set(model.candidates(("at", "the"), "d")) == {"dinner"}
    assert model.candidates(("at", "the"), "q") == {}
    assert list(model.candidates((START,), "", limit=1)) == ["See"]


def test_blend_is_the_weighted_mixture() -> None:
    model = PhraseModel.from_texts(TEXTS, weight=0.25)
    lm = {"lake": 0.1, "sea": 0.4}
    out = model.blend(lm, "See you at the", at_start=True, prefix="", k=3)
    p_lake = model.probability("lake", ("at", "the"))
    assert math.isclose(out["lake"], 0.75 * 0.1 + 0.25 * p_lake)
    assert math.isclose(out["sea"], 0.75 * 0.4)  # never typed by the user: the LM alone
    assert max(out, key=out.get) == "lake"
    assert PhraseModel().blend(lm, "x", True, "", 3) == lm  # an empty model changes nothing


def test_prune_bounds_the_table_keeping_frequent_ngrams() -> None:
    model = PhraseModel.from_texts(TEXTS * 3 + [f"rare{i} word{i} here{i}" for i in range(50)])
    before = model.ngrams
    model.prune(10)
    assert model.ngrams <= 10 < before
    assert model.follow[("the",)]["lake"] == 6  # the user's real phrases stay


def test_file_round_trip_and_damage(tmp_path: Path) -> None:
    model = PhraseModel.from_texts(TEXTS, weight=0.3)
    path = tmp_path / "phrases.zlib"
    path.write_bytes(model.to_bytes())
    again = PhraseModel.load(path)
    assert again.unigrams == model.unigrams and again.follow == model.follow
    assert again.weight == 0.3
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(PhraseError, match="phrases.zlib"):
        PhraseModel.load(path)
    path.write_bytes(zlib.compress(b'{"format": "other"}'))
    with pytest.raises(PhraseError, match="unknown format"):
        PhraseModel.load(path)
    with pytest.raises(PhraseError, match="cannot read"):
        PhraseModel.load(tmp_path / "missing")


def test_predictor_offers_the_users_phrase_and_survives_a_damaged_file(
    tiny_llama: Path, tmp_path: Path
) -> None:
    from wordahead.predict.predictor import Predictor

    predictor = Predictor(tiny_llama, threads=1)
    assert "dayrit" not in predictor.predict("see you at ", k=3).words
    phrases = PhraseModel.from_texts(["see you at dayrit tomorrow"] * 5)
    assert predictor.load_adapter(None, phrases=phrases)
    assert predictor.phrases is phrases
    assert predictor.predict("see you at ", k=3).words[0] == "dayrit"
    assert predictor.predict("see you at da", k=3).words[0] == "dayrit"
    damaged = tmp_path / "phrases.zlib"
    damaged.write_bytes(b"not zlib")
    assert predictor.load_adapter(None, phrases=damaged) is False  # logged, left out
    assert predictor.phrases is None
    assert "dayrit" not in predictor.predict("see you at ", k=3).words


def test_store_keeps_phrases_per_version_and_forget_deletes_them(
    home: Home, tiny_llama: Path
) -> None:
    store = AdapterStore.in_home(home, ArtifactSet.open(tiny_llama))
    tensors = store.artifacts.initial_adapter()
    plain = store.promote(tensors, {"source": "test"})
    assert store.phrases_path(plain) is None and store.phrases_path("base") is None
    model = PhraseModel.from_texts(TEXTS)
    version = store.promote(tensors, {"source": "test"}, model.to_bytes())
    path = store.phrases_path(version)
    assert path is not None and PhraseModel.load(path).unigrams == model.unigrams
    assert store.get(version).metadata["phrases_sha256"]
    assert forget_phrases(home) == 1
    assert store.phrases_path(version) is None
    assert store.active()[0] == version  # the adapter itself stays


def test_status_says_which_phrases_are_served() -> None:
    from wordahead.daemon.client import describe_status

    served = {"adapter": {"version": "v0002", "phrases": {"words": 48210, "ngrams": 71344}}}
    assert "phrases      48,210 words, 71,344 word pairs/triples" in describe_status(served)
    assert "phrases      none" in describe_status({"adapter": {"version": "base"}})


def test_compact_file_round_trip_reads_version_1_and_refuses_bad_arrays() -> None:
    import json

    import numpy as np

    from wordahead.predict.sources.phrase_file import MAGIC

    model = PhraseModel.from_texts(TEXTS, weight=0.3)
    again = PhraseModel.from_bytes(model.to_bytes())
    assert again.follow == model.follow and dict(again.unigrams) == dict(model.unigrams)
    assert again.candidates(("at", "the"), "") == model.candidates(("at", "the"), "")
    # A version-1 file (JSON of dicts, what earlier jobs wrote) reads as the same model.
    v1 = {
        "format": "keyboard-phrases", "version": 1, "weight": 0.3,
        "unigrams": dict(model.unigrams),
        "follow": {"\t".join(ctx): nxt for ctx, nxt in model.follow.items()},
    }  # fmt: skip
    old = PhraseModel.from_bytes(zlib.compress(json.dumps(v1).encode()))
    assert old.follow == model.follow and old.probability("lake", ("at", "the")) == pytest.approx(
        model.probability("lake", ("at", "the"))
    )
    # Intact compression around damaged arrays: a continuation id out of range is refused.
    text = zlib.decompress(model.to_bytes())
    assert text.startswith(MAGIC)
    ids = model.next_ids.astype("<i4").tobytes()
    at = text.index(ids)
    bad = text[:at] + np.array([10**6], dtype="<i4").tobytes() + text[at + 4 :]
    with pytest.raises(PhraseError, match="damaged"):
        PhraseModel.from_bytes(zlib.compress(bad))
    with pytest.raises(PhraseError, match="damaged"):
        PhraseModel.from_bytes(zlib.compress(text[:-3]))


def test_learning_on_a_loaded_model_counts_the_new_text() -> None:
    model = PhraseModel.from_bytes(PhraseModel.from_texts(TEXTS).to_bytes())
    model.learn("See you at the lake again.")
    assert model.unigrams["lake"] == 4 and "again" in model.unigrams
    assert model.follow[("at", "the")] == {"lake": 3}
