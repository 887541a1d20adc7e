"""The Predictor on tiny models: whole words, prefixes and case, caches, adapter swaps, bad input."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from wordahead.model.artifacts import ArtifactSet, save_adapter
from wordahead.predict.predictor import Predictor
from wordahead.predict.query import model_window
from wordahead.predict.words import WORD_RE, partial_word, split_prefix
from wordahead.types import KeyboardError, Prediction

TYPED = (
    "Thank you so much for your help with the project. We are going to the beach this "
    "weekend if the weather is nice.\nDon't forget to water the plants, I'm away on holiday!"
)
HOLIDAY = "I'm away on holiday."


def assert_whole_words(prediction: Prediction, k: int) -> None:
    assert 1 <= len(prediction.candidates) <= k
    words = prediction.words
    assert len(set(words)) == len(words)
    scores = [c.score for c in prediction.candidates]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    for c in prediction.candidates:
        if c.kind == "word":
            assert WORD_RE.fullmatch(c.word), c.word
        else:
            assert c.kind == "punct" and not WORD_RE.search(c.word), c.word


@pytest.fixture(scope="module")
def holiday_adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter that has seen "I'm away on holiday." many times (a 4-token word)."""
    from wordahead.learn.trainer import LoraTrainer

    trainer = LoraTrainer(ArtifactSet.open(tiny_llama))
    batches = trainer.batches([HOLIDAY] * 64, seq_len=32, batch_size=8)
    trainer.fit(batches, max_steps=300, lr=3e-2, warmup=5, seed=0)
    path = tmp_path_factory.mktemp("adapters") / "holiday.npz"
    save_adapter(path, trainer.adapter())
    return path


def test_split_prefix_is_the_evaluation_partial_word():
    for text in [
        "",
        "Hello wor",
        "Hello ",
        "It's well-",
        "don'",
        "x--y",
        "3.5",
        "a\nb",
        "naïve café",
    ]:
        before, prefix = split_prefix(text)
        assert prefix == partial_word(text) and before + prefix == text
    long_word = "a" * 200
    assert len(split_prefix("x " + long_word)[1]) > 64  # too long to be completed
    assert model_window("short text", 16) == ("short text", True)
    text = "word " * 100
    window, at_start = model_window(text, 16)
    assert not at_start and text.endswith(window) and 32 <= len(window) < 48
    assert model_window(text + "more", 16)[0].startswith(window[:8])  # the window stays put


def test_completions_start_with_the_prefix_and_keep_its_case(tiny_llama: Path):
    predictor = Predictor(tiny_llama)
    for context, prefix in [
        ("I would like to b", "b"),
        ("The quick bro", "bro"),
        ("Th", "Th"),
        ("Happy birthday! I hope you have a WOND", "WOND"),
        ("Don'", "Don'"),
        ("It is a well-", "well-"),
        ("for two at the restaur", "restaur"),
    ]:
        prediction = predictor.predict(context, k=5)
        assert prediction.prefix == prefix
        assert_whole_words(prediction, 5)
        for c in prediction.candidates:
            assert c.kind == "word" and c.word.startswith(prefix), (context, c.word)


def test_next_words_are_whole_words_and_punctuation_is_marked(tiny_llama: Path):
    predictor = Predictor(tiny_llama)
    seen_kinds = set()
    for context in ["The quick brown ", "Hello,", "Thank you so much\n", "(", "a - "]:
        prediction = predictor.predict(context, k=8)
        assert prediction.prefix == ""
        assert_whole_words(prediction, 8)
        seen_kinds |= {c.kind for c in prediction.candidates}
    assert "word" in seen_kinds


def test_multi_token_words_come_back_whole(tiny_llama: Path, holiday_adapter: Path):
    predictor = Predictor(tiny_llama)
    assert predictor.load_adapter(holiday_adapter, "holiday")
    tokenizer = predictor.tokenizer
    # " holiday" is 4 tokens (Ġh o l iday) while the typed " holi" is Ġh o l i: the prefix
    # splits differently from the finished word.
    assert len(tokenizer.encode(" holiday").ids) >= 3
    assert tokenizer.encode(" holi").tokens[-1] != tokenizer.encode(" holiday").tokens[-1]
    prediction = predictor.predict("I'm away on holi", k=3)
    assert prediction.words[0] == "holiday"
    assert "holiday" in predictor.predict("I'm away on hol", k=3).words
    # The score is the probability of the whole word: its tokens, then a word boundary.
    assert prediction.candidates[0].score == pytest.approx(
        _reference_word_probability(predictor, "I'm away on", " holiday"), rel=1e-3
    )


def _reference_word_probability(predictor: Predictor, text: str, spelled: str) -> float:
    """P(spelled's tokens, then a token that cannot continue the word), by plain full runs."""
    tokenizer, engine = predictor.tokenizer, predictor._engine  # plain runs, no caches
    context = [predictor.eos_id, *tokenizer.encode(text).ids]
    word = tokenizer.encode(spelled).ids

    def next_probs(ids: list[int]) -> np.ndarray:
        logits, _ = engine.run(np.array([ids]), engine._empty_past(), 0, presents=False)
        z = np.exp(logits[0].astype(np.float64) - logits[0].max())
        return z / z.sum()

    p = 1.0
    for i, token in enumerate(word):
        p *= float(next_probs(context + word[:i])[token])
    return p * float(next_probs(context + word)[predictor.table.boundary].sum())


def test_tokens_are_classified_as_word_starts_continuations_and_boundaries(tiny_llama: Path):
    table = Predictor(tiny_llama).table
    tok = ArtifactSet.open(tiny_llama).tokenizer()

    def ids(*pieces: str) -> list[int]:
        return [tok.token_to_id(p) for p in pieces]

    for t in ids("Ġthe", "Ġre", "ĠT"):
        assert table.first_spaced[t] and not table.cont[t] and table.boundary[t]
    for t in ids("s", "iday", "'", "-"):
        assert table.cont[t] and not table.boundary[t] and not table.first_spaced[t]
    for t in ids("Ġ", ".", ",", "Ċ", "<|endoftext|>"):
        assert table.boundary[t] and not table.cont[t]
    assert table.punct[tok.token_to_id(".")] == "."
    assert table.space_id == tok.token_to_id("Ġ")


def test_cached_and_uncached_results_are_identical_over_a_typing_session(tiny_llama: Path):
    # A small window so that it moves several times while typing.
    cached = Predictor(tiny_llama, cache=True, context_tokens=16)
    fresh = Predictor(tiny_llama, cache=False, context_tokens=16)
    calls = 0
    for end in range(0, len(TYPED) + 1):
        context = TYPED[:end]
        a, b = cached.predict(context, k=3), fresh.predict(context, k=3)
        assert a.prefix == b.prefix and a.words == b.words, context
        assert [c.score for c in a.candidates] == pytest.approx(
            [c.score for c in b.candidates], rel=1e-4, abs=1e-6
        )
        calls += 1
    # Asking again (LRU) and after other text (prompt cache rebuilt) changes nothing.
    again = cached.predict(TYPED[:60], k=3)
    assert again.words == fresh.predict(TYPED[:60], k=3).words
    assert calls == len(TYPED) + 1


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_a_tree_of_hypotheses_scores_as_one_row_each(family: str, request: pytest.FixtureRequest):
    # One run over one copy of the context's key/values, the hypotheses' tokens as a tree
    # (shared beginnings once), gives each hypothesis the logits of a run of its own.
    from wordahead.predict.engine import as_tree

    predictor = Predictor(request.getfixturevalue(family))
    engine = predictor._engine
    assert engine.tree and not engine.masked  # the graph took the tree inputs
    context = (predictor.eos_id, *predictor.tokenizer.encode("Thank you so much for").ids)
    _, kv = engine.run(np.array([context]), engine._empty_past(), 0, presents=True)
    rows = [(5, 9, 14), (5, 9, 20), (5, 11), (7,), (5, 9)]
    ids, parents, outputs = as_tree(rows)
    assert ids.shape == (1, 6) and parents == [-1, 0, 1, 1, 0, -1]
    tree, _ = engine.run(ids, kv, len(context), False, None, parents, outputs)
    for row, logits in zip(rows, tree, strict=True):
        alone, _ = engine.run(np.array([row]), kv, len(context), presents=False)
        np.testing.assert_allclose(logits, alone[0], rtol=1e-4, atol=1e-5)


def test_answers_are_the_same_on_a_graph_without_the_tree_inputs(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
):
    # A graph the tree rewrite does not recognise is served as exported (a batch row per
    # hypothesis): the same answers over a replayed typing session.
    import wordahead.model.artifacts

    tree = Predictor(tiny_llama, context_tokens=16)
    monkeypatch.setattr(wordahead.model.artifacts, "tree_attention", lambda model: False)
    rows = Predictor(tiny_llama, context_tokens=16)
    assert tree._engine.tree and not rows._engine.tree and rows._engine.masked
    for context in _keystrokes(TYPED[:90]):
        a, b = tree.predict(context, k=3), rows.predict(context, k=3)
        assert a.words == b.words, context
        assert [c.score for c in a.candidates] == pytest.approx(
            [c.score for c in b.candidates], rel=1e-4, abs=1e-6
        )


CLIENTS = [
    "Thank you so much for your help with the project. We are going",
    "Could you please send me the report by Friday afternoon? The meeting",
    "Happy birthday! I hope you have a wonderful day with your family.",
]


def _keystrokes(text: str) -> list[str]:
    return [text[:end] for end in range(1, len(text) + 1)]


def test_cache_slots_never_answer_for_another_clients_context(tiny_llama: Path):
    # Three clients typing in turn through two slots: every slot changes hands mid-word.
    reference = Predictor(tiny_llama, cache=False, context_tokens=16)
    shared = Predictor(tiny_llama, cache=True, context_tokens=16, slots=2)
    streams = [_keystrokes(text) for text in CLIENTS]
    for step in range(max(map(len, streams))):
        for stream in streams:
            if step < len(stream):
                a, b = shared.predict(stream[step], k=3), reference.predict(stream[step], k=3)
                assert a.words == b.words, stream[step]
                assert [c.score for c in a.candidates] == pytest.approx(
                    [c.score for c in b.candidates], rel=1e-4, abs=1e-6
                )
    # Each slot holds one client's context: the one it computed last.
    engine = shared._engine
    bases = {s.base for s in engine.slots.states}
    contexts = {shared.context_ids(q) for q in _queries(shared, [s[-1] for s in streams])}
    assert bases <= contexts | {()}


def _queries(predictor: Predictor, texts: list[str]) -> list:
    from wordahead.predict.query import make_query

    return [make_query(t, 3, predictor.context_tokens) for t in texts]


def test_clients_typing_at_once_get_their_own_answers(tiny_llama: Path):
    reference = Predictor(tiny_llama, cache=False, context_tokens=16)
    expected = {
        ctx: reference.predict(ctx, k=3).words for text in CLIENTS for ctx in _keystrokes(text)
    }
    shared = Predictor(tiny_llama, cache=True, context_tokens=16, slots=2, threads=1)
    wrong: list[str] = []

    def client(text: str) -> None:
        for ctx in _keystrokes(text):
            if shared.predict(ctx, k=3).words != expected[ctx]:
                wrong.append(ctx)

    threads = [threading.Thread(target=client, args=(text,)) for text in CLIENTS * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert not any(s.busy for s in shared._engine.slots.states)  # every slot given back


def _spared_runs(
    predictor: Predictor, reference: Predictor, ahead: bool, stop_after: int | None = None
) -> tuple[int, int]:
    """Replay TYPED keystroke by keystroke, checking every answer against `reference`; how
    many keystrokes needed no model run, and how many predictions were computed ahead (given
    up after `stop_after` session runs each time, when given)."""
    engine = predictor._engine
    runs = 0
    run = engine.run

    def counted(*args, **kwargs):
        nonlocal runs
        runs += 1
        return run(*args, **kwargs)

    engine.run = counted  # type: ignore[method-assign]
    spared = computed = 0
    for context in _keystrokes(TYPED):
        before = runs
        a, b = predictor.predict(context, k=3), reference.predict(context, k=3)
        assert a.words == b.words, context
        assert [c.score for c in a.candidates] == pytest.approx(
            [c.score for c in b.candidates], rel=1e-4, abs=1e-6
        )
        spared += runs == before
        if ahead:
            allowed = runs + stop_after if stop_after is not None else None
            computed += predictor.prefetch(
                context,
                k=3,
                stop=allowed and (lambda: runs >= allowed),  # noqa: B023
            )
    return spared, computed


def test_computing_ahead_changes_no_answer_and_spares_model_runs(tiny_llama: Path):
    # A replayed typing session; after every keystroke the next one is computed ahead (as the
    # daemon does while idle): every answer is still the one computed from scratch.
    reference = Predictor(tiny_llama, cache=False, context_tokens=16)
    plain, _ = _spared_runs(Predictor(tiny_llama, context_tokens=16), reference, ahead=False)
    spared, computed = _spared_runs(Predictor(tiny_llama, context_tokens=16), reference, True)
    assert computed > 0
    assert spared > 2 * plain  # keystrokes that needed no model run of their own
    assert Predictor(tiny_llama, cache=False).prefetch("Thank you so", k=3) == 0


def test_work_ahead_gives_way_at_once_and_changes_no_answer(tiny_llama: Path):
    # Work ahead is given up between session runs (a request waits): whatever run it stops
    # at, the caches it leaves give the answers computed from scratch.
    reference = Predictor(tiny_llama, cache=False, context_tokens=16)
    for stop_after in (1, 2, 3, 5):
        predictor = Predictor(tiny_llama, context_tokens=16)
        _spared_runs(predictor, reference, ahead=True, stop_after=stop_after)
        assert not any(s.busy or s.stop for s in predictor._engine.slots.states)
    predictor = Predictor(tiny_llama)
    predictor.predict("Thank you so", k=3)
    engine = predictor._engine
    session, engine.session = engine.session, None  # a run would fail
    assert predictor.prefetch("Thank you so", k=3, stop=lambda: True) == 0
    engine.session = session
    assert predictor.prefetch("Thank you so", k=3, stop=lambda: False) > 0


def test_answers_computed_ahead_are_known_without_the_model(tiny_llama: Path):
    predictor = Predictor(tiny_llama)
    assert predictor.predict_cached("Thank you so", k=3) is None  # never asked
    first = predictor.predict("Thank you so", k=3)
    assert predictor.predict_cached("Thank you so", k=3).words == first.words
    assert predictor.prefetch("Thank you so", k=3) > 0
    nexts = {w[len("so")] for w in first.words if len(w) > len("so")} or {" "}
    for letter in nexts:
        known = predictor.predict_cached("Thank you so" + letter, k=3)
        if known is not None:
            assert (
                known.words
                == Predictor(tiny_llama, cache=False).predict("Thank you so" + letter, k=3).words
            )
    assert any(predictor.predict_cached("Thank you so" + c, k=3) for c in nexts)


def test_adapter_switch_mid_stream(tiny_llama: Path, holiday_adapter: Path, tmp_path: Path):
    contexts = ["I'm away on ", "I'm away on hol", "Thank you so ", "We are going to the b"]
    expected = {}
    for version in ("base", "holiday"):
        reference = Predictor(tiny_llama, cache=False)
        if version == "holiday":
            reference.load_adapter(holiday_adapter, "holiday")
        expected[version] = {c: reference.predict(c, k=3).words for c in contexts}
    assert expected["base"] != expected["holiday"]  # the adapter changes predictions

    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not an npz file")
    predictor = Predictor(tiny_llama)
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: list[tuple[str, str, list[str]]] = []

    def typist() -> None:
        try:
            while not stop.is_set():
                for context in contexts:
                    p = predictor.predict(context, k=3)
                    seen.append((p.adapter, context, p.words))
        except BaseException as exc:  # noqa: BLE001 - any failure fails the test
            errors.append(exc)

    threads = [threading.Thread(target=typist) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            assert predictor.load_adapter(holiday_adapter, "holiday")
            assert predictor.adapter_version == "holiday"
            assert not predictor.load_adapter(broken, "broken")  # falls back to base
            assert predictor.adapter_version == "base"
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert {version for version, _, _ in seen} <= {"base", "holiday"}
    for version, context, words in seen:
        assert words == expected[version][context], (version, context)


def test_a_missing_or_corrupt_adapter_serves_the_base_model(
    tiny_llama: Path, holiday_adapter: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    predictor = Predictor(tiny_llama, cache=False)
    base = predictor.predict("I'm away on ", k=3)
    good = dict(np.load(holiday_adapter))
    nan = {name: np.full_like(value, np.nan) for name, value in good.items()}
    wrong = {name: value[:1] for name, value in good.items()}
    bad_file = tmp_path / "truncated.npz"
    bad_file.write_bytes(holiday_adapter.read_bytes()[:100])
    for adapter in [tmp_path / "missing.npz", bad_file, nan, wrong, {"x": np.zeros(3)}]:
        assert predictor.load_adapter(good, "v2")
        assert predictor.adapter_version == "v2"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="wordahead.predict.predictor"):
            assert predictor.load_adapter(adapter, "v3") is False
        assert predictor.adapter_version == "base"
        assert "adapter v3 could not be loaded, serving the base model" in caplog.text
        again = predictor.predict("I'm away on ", k=3)
        assert (again.adapter, again.candidates) == ("base", base.candidates)
    assert predictor.load_adapter(None)
    assert predictor.adapter_version == "base"


def test_bad_input_gives_a_clear_error_or_an_answer(tiny_llama: Path):
    predictor = Predictor(tiny_llama)
    for context in ["", " ", "   \n\t "]:
        start = predictor.predict(context, k=3)
        assert start.prefix == "" and start.candidates  # the start of a text
        assert start.words == predictor.predict("", k=3).words
    huge = "All work and no play makes Jack a dull boy. " * 23_000  # 1 MB
    assert_whole_words(predictor.predict(huge, k=3), 3)
    assert predictor.predict(huge + "pl", k=3).prefix == "pl"
    for odd in ["\ud800", "abc \udfff", "a\x00b\x01 ", "\x00" * 1000, "\ufffd\ufffe ", "e\u0301t"]:
        prediction = predictor.predict(odd, k=3)
        assert isinstance(prediction, Prediction)
    assert predictor.predict("x" * 5000, k=3).candidates == []  # no word is that long
    for context in [b"bytes", None, 42, ["list"]]:
        with pytest.raises(KeyboardError, match="context must be text"):
            predictor.predict(context, k=3)  # type: ignore[arg-type]
    for k in [0, 21, -1, 2.5, "3", True]:
        with pytest.raises(KeyboardError, match="k must be"):
            predictor.predict("Hello ", k=k)  # type: ignore[arg-type]
    assert len(predictor.predict("Hello ", k=20).candidates) >= 3


def test_int8_graph_is_used_when_asked_and_adapters_still_apply(
    tiny_llama: Path, holiday_adapter: Path, tmp_path: Path
):
    from wordahead.model import quantize

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    artifacts = ArtifactSet.open(model)
    assert not Predictor(model).quantized  # no measurement: fp32
    int8 = Predictor(model, quantize=True)
    variant = quantize.INT8_FILE if quantize.cpu_has_vnni() else quantize.INT8_7BIT_FILE
    assert int8.quantized and int8.model_path == model / variant
    assert_whole_words(int8.predict("I'm away on ", k=3), 3)
    base = int8.predict("I'm away on hol", k=3).words
    assert int8.load_adapter(holiday_adapter, "holiday")
    assert int8.predict("I'm away on hol", k=3).words != base
    same = quantize.paired_top3_test([0, 1, -1] * 2000, [1, 0, -1] * 2000)
    quantize.write_record(artifacts, quantize.paired_top3_test([0, 1], [0, 1]))
    assert not Predictor(model).quantized  # too few words to decide
    worse = quantize.paired_top3_test([0] * 6000, [0] * 5940 + [-1] * 60)
    quantize.write_record(artifacts, worse)
    assert not Predictor(model).quantized  # int8 lost accuracy: not the default
    quantize.write_record(artifacts, same)
    assert Predictor(model).quantized


def test_paired_top3_test_counts_only_the_words_the_graphs_disagree_on():
    from wordahead.model import quantize

    # 30 words only fp32 gets, 10 only int8 gets, 960 both: int8 is significantly worse.
    fp32 = [0] * 30 + [-1] * 10 + [2] * 960
    int8 = [-1] * 30 + [1] * 10 + [0] * 960
    test = quantize.paired_top3_test(fp32, int8)
    assert (test["int8_only_misses"], test["int8_only_hits"]) == (30, 10)
    assert test["p_loss"] < 0.01 and test["significant_loss"]
    # 12 against 10 is noise; rank 3 or worse is a miss like -1.
    even = quantize.paired_top3_test([0] * 12 + [5] * 10, [3] * 12 + [2] * 10)
    assert not even["significant_loss"] and even["p_loss"] > 0.3
    with pytest.raises(ValueError):
        quantize.paired_top3_test([0], [0, 1])


def test_gpt2_models_predict_too(tiny_gpt2: Path):
    predictor = Predictor(tiny_gpt2, threads=2)
    assert_whole_words(predictor.predict("The quick brown ", k=3), 3)
    completion = predictor.predict("Could you please se", k=3)
    assert all(w.startswith("se") for w in completion.words) and completion.words


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS from /proc")
def test_memory_stays_flat_across_adapter_swaps(tiny_llama: Path, tmp_path: Path):
    import json
    import subprocess
    import sys

    from wordahead.predict.sources.phrases import PhraseModel

    # About 60,000 n-grams, read from their file at every swap as the daemon does.
    rng = np.random.default_rng(0)
    words = [f"w{n}" for n in range(6000)]
    lines = [" ".join(rng.choice(words, 12)) for _ in range(6000)]
    phrases = tmp_path / "phrases.bin"
    phrases.write_bytes(PhraseModel.from_texts([TYPED, HOLIDAY, *lines]).to_bytes())
    # In a process of its own, as the daemon: the test process's heaps say nothing about it.
    run = subprocess.run(
        [sys.executable, "-m", "tests.swap_memory", str(tiny_llama), str(phrases)],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    swaps = json.loads(run.stdout.strip().splitlines()[-1])
    assert swaps["version"] == "v21"
    assert swaps["same_session"]  # a swap builds no session
    assert swaps["engines_alive"] == 1  # no replaced engine kept alive
    assert swaps["rss_after_21_swaps_mb"] <= swaps["rss_after_1_swap_mb"] + 5.0
