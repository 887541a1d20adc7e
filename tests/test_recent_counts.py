"""Learning as you type costs the message, not the text typed since the job (issue 28,
failure 2: `LivePhrases.learn` rebuilt the recent model on every `observe`, 2.5 s per message
after 20,000). The counts kept in place answer as the rebuilt model would; memory is bounded.
Speed itself is measured by benchmarks/observe_flood.py."""

from __future__ import annotations

import random

import pytest

from wordahead.predict.lexicon import Lexicon
from wordahead.predict.sources import live_phrases
from wordahead.predict.sources.live_phrases import LivePhrases
from wordahead.predict.sources.phrases import START, PhraseCounts, PhraseModel
from wordahead.predict.sources.recent_counts import RecentCounts

pytestmark = pytest.mark.notorch

WORDS = "I you we love like tea coffee Rome Zorblatt see soon the a to at with, .".split()


def _messages(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9))) for _ in range(n)]


def test_counts_kept_in_place_answer_as_the_rebuilt_model() -> None:
    messages = _messages(300)
    stored = PhraseModel.from_texts(_messages(100, seed=1))
    live = LivePhrases(stored, recent_boost=3)
    for message in messages:
        live.learn(message)
    counts = PhraseCounts()  # the recent model as the old learn rebuilt it, message by message
    for message in messages:
        counts.learn(message)
    rebuilt = counts.freeze()
    contexts = [(START,), ("I",), ("I", "love"), ("we", "like"), ("nothing",), (), ("to", "Rome")]
    for context in contexts:
        for prefix in ("", "t", "Z", "co", "q"):
            got = live.recent.candidates(context, prefix, 12)
            want = rebuilt.candidates(context, prefix, 12)
            assert set(want) <= set(got), (context, prefix)  # scored again, then cut to 12
        for word in WORDS + ["unseen"]:
            expected = rebuilt.evidence([word], context)
            have = live.recent.evidence([word], context)
            assert have.counts.tolist() == expected.counts.tolist() and have.n == expected.n
            assert [(lv.seen.tolist(), lv.total, lv.types) for lv in have.levels] == [
                (lv.seen.tolist(), lv.total, lv.types) for lv in expected.levels
            ], (word, context)
    alone = LivePhrases(None, texts=messages)
    for context in contexts:
        assert alone.candidates(context, "", 5) == pytest.approx(rebuilt.candidates(context, "", 5))
    vocabulary = live.vocabulary()
    assert "Zorblatt" in vocabulary and vocabulary.has_prefix("zorb") and vocabulary.has_prefix("R")
    assert not vocabulary.has_prefix("qu") and "quux" not in vocabulary


def test_learning_a_message_builds_nothing_from_the_text_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What made it O(messages): the recent PhraseModel thawed, refrozen and its words packed
    into a new Lexicon on every message. None of them may run per message now."""
    live = LivePhrases(PhraseModel.from_texts(_messages(50, seed=1)), texts=_messages(2000))
    vocabulary = live.vocabulary()

    def rebuilt(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt from all the recent text")

    monkeypatch.setattr(PhraseCounts, "freeze", rebuilt)
    monkeypatch.setattr(PhraseModel, "thaw", rebuilt)
    monkeypatch.setattr(Lexicon, "__init__", rebuilt)
    for message in _messages(50, seed=2) + ["Greetings from Zanzibar"]:
        live.learn(message)
        vocabulary = live.vocabulary()  # as the predictor asks after each message
    assert vocabulary.has_prefix("zanz") and "Zanzibar" in vocabulary
    assert "Zanzibar" in live.blend({"you": 0.5}, "Greetings from ", False, "", 3)


def test_recent_counts_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = RecentCounts(max_ngrams=500)
    rng = random.Random(3)
    for _ in range(3000):  # random text: nearly every 2- and 3-gram is new
        counts.learn(" ".join(f"w{rng.randrange(400)}" for _ in range(8)))
        assert counts.ngrams <= 2 * 500
    assert counts.ngrams == sum(len(after) for after in counts.follow.values())
    assert counts.words == 3000 * 8 == sum(counts.unigrams.values())
    monkeypatch.setattr(live_phrases, "MAX_RECENT_NGRAMS", 500)
    live = LivePhrases(None)
    for i in range(300):
        live.learn(f"note {i} about item {i * 7} and thing {i * 13}")
    assert live.recent.ngrams <= 1000
