"""Metric definitions of the typing simulation, checked exactly on small hand-made texts."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wordahead import cli
from wordahead.evaluate.harness import history_and_typed, read_messages, split_history
from wordahead.evaluate.simulate import (
    TypingReport,
    completed_word,
    next_word_ranks,
    percentile,
    simulate,
)
from wordahead.predict.words import partial_word, word_spans, words
from wordahead.types import Candidate, KeyboardError, Prediction


class VocabularyPredictor:
    """Stands in for a model in metric tests: the first k words of a fixed list that start
    with the partial word (case-sensitive). With `split_at`, its prefix is only the part
    after the last of those characters, as for engines that split words there (presage)."""

    def __init__(self, vocabulary: list[str], split_at: str = "") -> None:
        self.vocabulary = vocabulary
        self.split_at = split_at
        self.contexts: list[str] = []

    def predict(self, context: str, k: int = 3) -> Prediction:
        self.contexts.append(context)
        prefix = partial_word(context)
        if self.split_at:
            prefix = re.split(f"[{re.escape(self.split_at)}]", prefix)[-1]
        found = [w for w in self.vocabulary if w.startswith(prefix)][:k]
        return Prediction(
            prefix,
            [Candidate(w, 1.0, "word" if w[0].isalnum() else "punct") for w in found],
            adapter="test",
        )


def run(text: str | list[str], vocabulary: list[str], k: int = 3, **kw) -> TypingReport:
    messages = [text] if isinstance(text, str) else text
    return simulate(VocabularyPredictor(vocabulary, **kw), messages, k=k)


# --- words ---------------------------------------------------------------------------------
def test_words_are_letters_digits_apostrophes_and_inner_hyphens():
    text = "It's a well-known fact -- e-mail, 'quoted' x--y 3.5 foo_bar rock'n'roll pre- ' -"
    assert words(text) == [
        "It's", "a", "well-known", "fact", "e-mail", "'quoted'", "x", "y", "3", "5",
        "foo", "bar", "rock'n'roll", "pre",
    ]  # fmt: skip


def test_words_keep_case_and_unicode_letters():
    assert words("Café NAÏVE, naïve 2nd") == ["Café", "NAÏVE", "naïve", "2nd"]
    assert word_spans("a, bc") == [(0, 1), (3, 5)]


@pytest.mark.parametrize(
    ("text", "partial"),
    [
        ("", ""),
        ("hello wor", "wor"),
        ("end. ", ""),
        ("the well-", "well-"),
        ("x --", ""),
        ("ab--", ""),
        ("I don'", "don'"),
        ("he said '", "'"),
        ("foo_ba", "ba"),
        ("line\nnext", "next"),
    ],
)
def test_partial_word(text, partial):
    assert partial_word(text) == partial


def test_completed_word_replaces_the_predictors_prefix():
    assert completed_word("ca", "ca", "cat") == "cat"
    assert completed_word("don'", "", "t") == "don't"  # prefix after a split point
    assert completed_word("re-u", "u", "use") == "re-use"
    assert completed_word("Th", "th", "the") == "the"  # prefix not a suffix: taken as whole


# --- KSR and accuracy, exactly -------------------------------------------------------------
def test_worked_example_k2():
    # the: shown [the, a] at the start -> accepted: 1 keystroke.
    # cat: [the, a] miss; "c" typed (1); [cat, car] -> accepted (1): 2.
    # sat: miss; "s" (1); [sat] -> accepted (1): 2.  Spaces and "." cost 1 each: 3.
    r = run("the cat sat.", ["the", "a", "cat", "sat", "car"], k=2)
    assert (r.chars, r.keystrokes, r.words, r.predictions) == (12, 8, 3, 5)
    assert r.ksr == pytest.approx(1 - 8 / 12)
    # top-1/top-3 at word starts see [the, a, cat]: the (top-1), cat (top-3 only), sat missed.
    assert r.top1 == pytest.approx(1 / 3)
    assert r.top3 == pytest.approx(2 / 3)


def test_docs_example_is_case_sensitive():
    # docs/evaluation.md: "The" never matches "the", so it is typed in full.
    r = run("The cat sat.", ["the", "a", "cat", "sat", "car"], k=2)
    assert (r.chars, r.keystrokes, r.predictions) == (12, 10, 7)
    assert r.ksr == pytest.approx(1 / 6)
    assert (r.top1, r.top3) == (0.0, pytest.approx(1 / 3))


def test_no_suggestions_means_every_character_is_typed():
    r = run("Hi, there! How's it going?", [], k=3)
    assert r.keystrokes == r.chars == 26
    assert r.ksr == 0.0
    assert r.predictions == sum(len(w) for w in words("Hi, there! How's it going?"))


def test_perfect_predictor_costs_one_keystroke_per_word_plus_punctuation():
    r = run("alpha beta, alpha!", ["alpha", "beta"], k=2)
    assert (r.chars, r.keystrokes) == (18, 3 + 4)  # 3 words + " ", ",", " ", "!"
    assert r.ksr == pytest.approx(1 - 7 / 18)
    assert (r.top1, r.top3) == (pytest.approx(2 / 3), 1.0)


def test_no_queries_after_a_word_is_accepted():
    predictor = VocabularyPredictor(["internationalisation"])
    simulate(predictor, ["internationalisation"], k=1)
    assert predictor.contexts == [""]  # accepted at the first shown point


def test_apostrophes_and_inner_hyphens_with_a_splitting_predictor():
    # The fake's prefix stops at ' and -, so its suggestions complete the last part only.
    # don't: d, o, n, ' typed (4), then "t" completes it (1) = 5.  re-use: r, e, - (3) + 1 = 4.
    r = run("don't re-use", ["t", "use"], k=2, split_at="'-")
    assert (r.chars, r.keystrokes) == (12, 5 + 1 + 4)


def test_trailing_hyphen_and_dashes_are_not_word_characters():
    # "pre" is a word; "-" after it and "--" cost one keystroke each.
    r = run("pre- x--y", ["pre", "x", "y"], k=1)
    assert r.words == 3
    assert r.keystrokes == 1 + 1 + 1 + 1 + 2 + 1  # pre, "-", " ", x, "--", y


def test_messages_without_words_and_empty_messages():
    r = run(["...", "", "ok"], ["ok"], k=1)
    assert (r.messages, r.chars, r.keystrokes, r.words) == (3, 5, 4, 1)


def test_k_limits_accepted_suggestions_but_top3_uses_three():
    r = run("c", ["a", "b", "c"], k=1)
    assert r.top3 == 1.0 and r.top1 == 0.0
    assert r.keystrokes == 1  # not accepted at the start with k=1; "c" typed


def test_suggestions_typed_past_are_not_shown_again_in_the_word():
    vocabulary = ["can", "cat", "cap", "car", "care"]
    # care: [can, cat, cap] at the start, passed over; after "c" the client asks for 3 + 3
    # and drops those: [car, care] -> accepted. "c" + accept = 2 keystrokes.
    predictor = VocabularyPredictor(vocabulary)
    r = simulate(predictor, ["care"], k=3)
    assert (r.chars, r.keystrokes, r.predictions) == (4, 2, 2)
    # Showing the top 3 every time, [can, cat, cap] stays up until "car": typed in full.
    r = simulate(VocabularyPredictor(vocabulary), ["care"], k=3, client_filter=False)
    assert (r.keystrokes, r.predictions) == (4, 4)
    # Next-word accuracy is the model's own top 3 either way: hiding changes KSR only.
    r = run("cat", vocabulary, k=1)
    assert (r.top1, r.top3, r.keystrokes) == (0.0, 1.0, 2)  # after "c": [cat] (can hidden)


def test_punctuation_candidates_take_no_place_the_client_shows_words():
    # At a word start the predictor's first two answers are punctuation: the client asks for
    # up to 4 more and shows words only, so "the" is accepted at once (1 keystroke).
    vocabulary = [",", ".", "the", "cat"]
    r = run("the", vocabulary, k=2)
    assert (r.keystrokes, r.top1) == (1, 1.0)
    r = simulate(VocabularyPredictor(vocabulary), ["the"], k=2, client_filter=False)
    assert (r.keystrokes, r.top1, r.top3) == (2, 0.0, 1.0)  # [",", "."] shown; "t" then "the"


def test_shown_in_word_hides_only_what_was_typed_past():
    from wordahead.predict.shown import ShownInWord

    shown = ShownInWord()
    assert shown.ask("w1", "", 3, 20) == 3 + 4  # at a word start: room for punctuation
    assert shown.show(["can", "cat", "cap", "car"], 3) == ["can", "cat", "cap"]
    assert shown.ask("w1", "", 3, 20) == 7  # asked again at the same point: the same words
    assert shown.show(["can", "cat", "cap", "car"], 3) == ["can", "cat", "cap"]
    assert shown.ask("w1", "ca", 3, 20) == 6  # typed on: three passed words still fit
    assert shown.show(["can", "cat", "car", "cap", "care", "cab"], 3) == ["car", "care", "cab"]
    assert shown.ask("w1", "car", 3, 4) == 4  # car, care passed too; the limit holds
    assert shown.ask("w2", "c", 3, 20) == 3  # another word: nothing hidden
    assert shown.show(["can"], 3) == ["can"]


def test_k_must_be_positive():
    with pytest.raises(KeyboardError):
        run("x", ["x"], k=0)


# --- context -------------------------------------------------------------------------------
def test_context_is_history_then_earlier_messages_then_the_message_so_far():
    predictor = VocabularyPredictor([])
    simulate(predictor, ["ab", "c"], history=["one", "two"], k=3)
    assert predictor.contexts == ["one\ntwo\n", "one\ntwo\na", "one\ntwo\nab\n"]


def test_context_is_bounded_without_a_cut_word():
    predictor = VocabularyPredictor([])
    simulate(predictor, ["x"], history=["alpha beta gamma"], k=3, context_chars=9)
    # the last 9 characters are "ta gamma\n"; the cut fragment "ta" is dropped.
    assert predictor.contexts == ["gamma\n"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.text(alphabet="ab'- .,\nAB", max_size=30), max_size=4),
    st.lists(st.sampled_from(["a", "b", "ab", "a'b", "a-b", "A", "ba"]), max_size=5),
    st.integers(min_value=1, max_value=4),
)
def test_keystrokes_never_exceed_characters(messages, vocabulary, k):
    r = simulate(VocabularyPredictor(vocabulary), messages, k=k)
    assert r.chars == sum(len(m) for m in messages)
    assert 0 <= r.keystrokes <= r.chars
    assert r.words == sum(len(words(m)) for m in messages)
    assert 0.0 <= r.top1 <= r.top3 <= 1.0
    assert r.predictions >= r.words


class BigramPredictor:
    """Suggests, at a word start, the words seen after the previous word (a fixed table), so
    what is right depends on the context, as with a model."""

    TABLE = {"": ["a", "b", "ab"], "a": ["b", "ab", "a", "ba"], "b": ["a", "ba"], "ab": ["ab"]}

    def predict(self, context: str, k: int = 3) -> Prediction:
        prefix = partial_word(context)
        before = words(context[: len(context) - len(prefix)])
        found = [
            w for w in self.TABLE.get(before[-1] if before else "", []) if w.startswith(prefix)
        ]
        return Prediction(prefix, [Candidate(w, 0.5, "word") for w in found[:k]], adapter="test")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.text(alphabet="ab .\n", max_size=25), max_size=4),
    st.lists(st.text(alphabet="ab ", max_size=10), max_size=2),
)
def test_next_word_ranks_is_the_simulations_top_k(messages, history):
    """The personalization gate's measurement (next_word_ranks) and `keyboard eval`'s
    next-word top-1/top-3 are one measurement: the same words, contexts and answers."""
    ranks = next_word_ranks(BigramPredictor(), messages, history=history)
    report = simulate(BigramPredictor(), messages, history=history, k=3)
    assert len(ranks) == report.words
    n = max(1, len(ranks))
    assert math.isclose(report.top1, sum(r == 0 for r in ranks) / n)
    assert math.isclose(report.top3, sum(0 <= r < 3 for r in ranks) / n)


# --- reports -------------------------------------------------------------------------------
def test_report_json_and_percentiles():
    r = run("the cat sat.", ["the", "a", "cat", "sat", "car"], k=2)
    data = json.loads(json.dumps(r.to_json()))
    assert data["k"] == 2 and data["keystrokes"] == 8 and data["ksr"] == round(1 - 8 / 12, 6)
    assert {"latency_p50_ms", "latency_p95_ms", "latency_p99_ms"} <= data.keys()
    assert percentile([], 50) == 0.0
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([5.0], 99) == 5.0


# --- files and the split -------------------------------------------------------------------
def test_plain_text_is_one_message_per_non_empty_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first line\n\n  \nsecond, line\r\n{not json}\n", encoding="utf-8")
    assert read_messages(path) == ["first line", "second, line", "{not json}"]


def test_jsonl_messages_keep_order(tmp_path):
    path = tmp_path / "user.jsonl"
    rows = [{"ts": "2004-01-02", "text": "b"}, {"ts": "2004-01-01", "text": "a"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert read_messages(path) == ["b", "a"]
    sniffed = tmp_path / "user.txt"
    sniffed.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    assert read_messages(sniffed) == ["b", "a"]


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "user.jsonl"
    path.write_text('{"text": "ok"}\n{"ts": "2004"}\n', encoding="utf-8")
    with pytest.raises(KeyboardError, match=r"user.jsonl:2: .*text"):
        read_messages(path)
    path.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(KeyboardError, match=r"user.jsonl:2: not a JSON object"):
        read_messages(path)


def test_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(KeyboardError, match="no such file"):
        read_messages(tmp_path / "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(KeyboardError, match="not UTF-8"):
        read_messages(bad)
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    assert read_messages(tmp_path / "empty.txt") == []


def test_split_rule_is_floor_of_80_percent():
    for n in range(0, 300):
        history, test = split_history([str(i) for i in range(n)])
        assert len(history) == math.floor(Fraction(4, 5) * n)
        assert history + test == [str(i) for i in range(n)]
    assert [len(x) for x in split_history(list("abcdefg"))] == [5, 2]


def test_dev_lines_come_from_the_history_only(tmp_path):
    path = tmp_path / "user.jsonl"
    lines = [f"message {i}" for i in range(50)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    assert history_and_typed(path) == (lines[:40], lines[40:])
    assert history_and_typed(path, max_lines=3) == (lines[:40], lines[40:43])
    history, dev = history_and_typed(path, dev=True)
    assert (history, dev) == (lines[:32], lines[32:40])  # no test line, typed or trained on
    assert history_and_typed(path, dev=True, max_lines=0) == (lines[:32], [])


# --- command line --------------------------------------------------------------------------
def test_cli_reports_a_missing_file(capsys, tmp_path):
    assert cli.main(["eval", str(tmp_path / "none.jsonl")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_cli_reports_a_missing_model(capsys, tmp_path):
    path = tmp_path / "u.txt"
    path.write_text("hello\n", encoding="utf-8")
    assert cli.main(["eval", str(path), "--model", str(tmp_path / "nomodel")]) == 1
    assert "no model at" in capsys.readouterr().err


def test_cli_personalize_needs_a_history(capsys, tmp_path):
    path = tmp_path / "u.txt"
    path.write_text("only one message\n", encoding="utf-8")
    assert cli.main(["eval", str(path), "--model", str(tmp_path), "--personalize"]) == 1
    assert "needs at least 2 messages" in capsys.readouterr().err


def test_cli_types_a_file_through_the_real_predictor(capsys, tmp_path, tiny_llama):
    path = tmp_path / "user.jsonl"
    lines = ["Hello there, it's me.", "", "Second message: well-known words!", "third one"]
    path.write_text("\n".join(json.dumps({"ts": "2004", "text": t}) for t in lines if t))
    png = tmp_path / "plot.png"
    argv = ["eval", str(path), "--model", str(tiny_llama), "--json", "--max-lines", "2"]
    assert cli.main([*argv, "--plot", str(png)]) == 0
    data = json.loads(capsys.readouterr().out)
    before = data["before"]
    assert (data["messages"], data["evaluated"], data["history"]) == (3, 2, 0)
    assert before["chars"] == len(lines[0]) + len(lines[2])
    assert before["words"] == len(words(lines[0])) + len(words(lines[2]))
    assert (
        before["words"]
        <= before["predictions"]
        <= sum(len(w) for w in words(lines[0] + " " + lines[2]))
    )
    assert 0 <= before["keystrokes"] <= before["chars"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_types_with_the_active_adapter_or_the_one_named(capsys, tmp_path, tiny_llama, home):
    """`keyboard eval` measured the base model whatever the daemon served."""
    import numpy as np

    from wordahead.learn.adapter_store import AdapterStore

    store = AdapterStore.in_home(home, tiny_llama)
    rng = np.random.default_rng(0)
    shifted = {n: v + rng.normal(0, 0.5, v.shape).astype(np.float32)
               for n, v in store.artifacts.initial_adapter().items()}  # fmt: skip
    version = store.promote(shifted)
    path = tmp_path / "user.txt"
    path.write_text("Hello there, it's me.\nSecond message: well-known words!\n")
    argv = ["eval", str(path), "--model", str(tiny_llama), "--max-lines", "1"]
    assert cli.main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["served"] == version  # active by default
    assert cli.main([*argv, "--json", "--adapter", "base"]) == 0
    assert json.loads(capsys.readouterr().out)["served"] == "base"
    assert cli.main([*argv, "--adapter", version]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith(version)  # the table's row
    assert cli.main([*argv, "--adapter", "v0009"]) == 1
    assert "no adapter version v0009" in capsys.readouterr().err
    assert cli.main([*argv, "--adapter", version, "--personalize"]) == 1
    assert "base model" in capsys.readouterr().err


# --- the presage adapter's text handling (no presage needed) -------------------------------
def _peer_presage():
    spec = importlib.util.spec_from_file_location(
        "peer_presage", Path(__file__).resolve().parent.parent / "benchmarks" / "peer_presage.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["peer_presage"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_presage_completions_make_the_words_a_client_types():
    peer = _peer_presage()
    assert peer.apply_completion("Th", "e ") == "The"  # presage appends a space: not counted
    assert peer.apply_completion("don'", "t ") == "don't"  # presage splits at apostrophes
    assert peer.apply_completion("well-", "known ") == "well-known"
    assert peer.apply_completion("u", "\byou ") == "you"  # abbreviation: erase, then expand
    text = "a\\b\tc\nd\re\bf"
    assert peer.unescape(peer.escape(text)) == text
    assert "\t" not in peer.escape(text) and "\n" not in peer.escape(text)
