"""Suggestions that learn as you type: the live phrases, alone and in a real daemon."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_process import Served, short_dir, start_daemon
from wordahead.daemon.client import DaemonClient
from wordahead.predict.sources.live_phrases import LivePhrases
from wordahead.predict.sources.phrases import START, PhraseModel

NAME = "Zorblaxian"  # a word no tiny model offers on its own
LINE = f"Greetings to {NAME} from the whole team."
CONTEXT = "Greetings to "


# --- the layer alone ----------------------------------------------------------------------------
def test_a_word_typed_once_is_offered_in_its_context() -> None:
    live = LivePhrases(PhraseModel.from_texts(["Greetings from Rome.", "See you soon."] * 5))
    lm = {"you": 0.3, "the": 0.2, "all": 0.1}
    assert NAME not in live.blend(lm, CONTEXT, True, "", 3)
    live.learn(LINE)
    blended = live.blend(lm, CONTEXT, True, "", 3)
    assert sorted(blended, key=blended.__getitem__, reverse=True).index(NAME) < 3
    assert NAME in live.blend(lm, "Greetings to Zo", True, "Zo", 3)  # and as a completion
    assert live.recent_words == 7


def test_recent_text_counts_as_if_typed_boost_times_more() -> None:
    stored = PhraseModel.from_texts(["I like tea."] * 10)
    live = LivePhrases(stored, recent_boost=3)
    ctx = ("I", "like")
    assert live.probability("tea", ctx) == pytest.approx(stored.probability("tea", ctx))
    live.learn("We love coffee.")
    # No context of the two texts is followed by the same token in both: the live model is
    # exactly the counts of all the text, the recent message counted three times.
    both = PhraseModel.from_texts(["I like tea."] * 10 + ["We love coffee."] * 3)
    for word in ("tea", "coffee", "We", "I", "love"):
        for context in (("I", "like"), ("We", "love"), (START,), ("love",), ("nothing",), ()):
            want = both.probability(word, context)
            assert live.probability(word, context) == pytest.approx(want), (word, context)
    once = LivePhrases(stored, recent_boost=1, texts=["We love coffee."])
    assert live.probability("We", (START,)) > once.probability("We", (START,)) > 0
    assert live.candidates(("We", "love"), "", 3)["coffee"] == pytest.approx(
        both.probability("coffee", ("We", "love"))
    )
    alone = LivePhrases(None, texts=["I like coffee."])  # nothing stored: the recent text alone
    recent = PhraseModel.from_texts(["I like coffee."])
    assert alone.probability("coffee", ctx) == pytest.approx(recent.probability("coffee", ctx))
    assert LivePhrases(None).blend({"a": 1.0}, "x ", False, "", 3) == {"a": 1.0}
    assert LivePhrases(None).probability("coffee", ctx) == 0.0  # nothing typed at all
    empty = LivePhrases(PhraseModel(), texts=["I like coffee."])  # a stored model of no words
    thrice = PhraseModel.from_texts(["I like coffee."] * 3)
    assert empty.probability("coffee", ctx) == pytest.approx(thrice.probability("coffee", ctx))


# --- in the daemon ------------------------------------------------------------------------------
@pytest.fixture
def root() -> Iterator[Path]:
    path = short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _daemon(model: Path, root: Path) -> tuple[Served, DaemonClient]:
    served = start_daemon(model, root / "home", root / "kb.sock")
    return served, DaemonClient(root / "kb.sock", timeout=30.0)


def _offered(client: DaemonClient, context: str = CONTEXT) -> list[str]:
    result = client.call("predict", context=context, k=3)
    return [c["word"] for c in result["candidates"]]


def test_observed_text_is_offered_at_once_and_survives_kill_9(tiny_llama: Path, root: Path) -> None:
    served, client = _daemon(tiny_llama, root)
    try:
        assert NAME not in _offered(client)
        assert client.call("observe", text=LINE, source="chat")["stored"] is True
        assert NAME in _offered(client)  # no job ran: the live phrases learned it
        served.process.send_signal(signal.SIGKILL)  # right after the acknowledgement
        served.process.wait(timeout=30)
        served, client = _daemon(tiny_llama, root)
        assert NAME in _offered(client)  # rebuilt from the typing log: nothing acknowledged lost
        # forget takes effect in memory at once, without a restart
        assert client.call("forget", source="chat")["deleted"] == 1
        assert NAME not in _offered(client)
    finally:
        served.stop()


def test_the_privacy_rules_hold_on_the_live_path(tiny_llama: Path, root: Path) -> None:
    served, client = _daemon(tiny_llama, root)
    try:
        assert client.call("observe", text=LINE, private=True)["stored"] is False
        assert client.call("observe", text=LINE, source="/srv/app/.env")["stored"] is False
        client.call("pause")
        assert client.call("observe", text=LINE, source="chat")["stored"] is False
        client.call("resume")
        assert NAME not in _offered(client)
        # Redacted before it is learned: a secret is never offered back.
        secret = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"
        client.call("observe", text=f"the key is {secret} ok", source="chat")
        assert secret not in _offered(client, "the key is ")
        assert secret not in _offered(client, "the key is sk_")
        # A forgotten time range goes from memory at once, too.
        client.call("observe", text=LINE, source="chat")
        assert NAME in _offered(client)
        assert client.call("forget", since="2000-01-01")["deleted"] >= 1
        assert NAME not in _offered(client)
    finally:
        served.stop()


def test_phrases_off_stores_and_serves_no_ngrams(tiny_llama: Path, root: Path) -> None:
    from wordahead.evaluate.harness import personalize_in_throwaway_home
    from wordahead.paths import Home

    home = root / "home"
    home.mkdir(mode=0o700)
    (home / "personalize.json").write_text(json.dumps({"phrases": False}))
    history = [LINE] + [f"Line {i} of what I wrote, about the garden and tea." for i in range(300)]
    job = personalize_in_throwaway_home(history, tiny_llama, home)
    assert job.status in ("promoted", "rejected"), job.reason
    assert job.phrases_path is None
    assert not list(home.rglob("phrases.zlib"))
    assert job.metrics.get("phrases") is None
    store_meta = [json.loads(p.read_text()) for p in home.rglob("meta.json")]
    assert all("phrases" not in m for m in store_meta)
    served, client = _daemon(tiny_llama, root)
    try:
        client.call("observe", text=LINE, source="chat")
        assert NAME not in _offered(client)  # nothing learned as typed either
        assert client.call("status")["adapter"]["phrases"] is None
    finally:
        served.stop()
    assert Home.at(home).typing_log.exists()  # the text itself is still logged
