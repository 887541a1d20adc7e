"""Files keyboard derives (the int8 graph and its record, training graphs, the lexicon) are
checked before use: a damaged one is logged, set aside and made again or done without, and
serving goes on. Each test here failed before its fix (issue 28, failures 3, 4 and 7)."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest

from wordahead.model import quantize
from wordahead.model.artifacts import ArtifactSet
from wordahead.predict.lexicon import FILE as LEXICON_FILE
from wordahead.predict.lexicon import Lexicon, LexiconError
from wordahead.predict.predictor import Predictor


@pytest.fixture
def model(tiny_llama: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny model (derived files are cached beside it)."""
    out = tmp_path / "model"
    shutil.copytree(tiny_llama, out)
    return out


@pytest.mark.parametrize("content", [b'{"inference_sha256": "\x01"}', b"{", b"[" * 100_000])
def test_a_damaged_quantization_record_serves_fp32_and_is_set_aside(
    model: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: "cannot read .../quantization.json: Invalid control character" stopped the
    daemon (and `keyboard train`), restarting forever under systemd."""
    record = model / quantize.RECORD_FILE
    record.write_bytes(content)
    predictor = Predictor(model)
    assert not predictor.quantized and predictor.predict("Thank you ", k=3).candidates
    assert "quantization.json is damaged" in caplog.text and "fp32" in caplog.text
    assert not record.exists() and (model / "quantization.json.damaged").read_bytes() == content
    quantize.write_record(
        ArtifactSet.open(model), quantize.paired_top3_test([0] * 6000, [0] * 6000)
    )
    assert Predictor(model).quantized  # a new measurement is used again


def test_a_damaged_int8_graph_is_rebuilt(model: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: a cached int8 graph with damaged bytes failed with "Wire format was corrupt"
    at every start, and was never made again."""
    artifacts = ArtifactSet.open(model)
    graph = quantize.int8_model(artifacts)
    whole = graph.read_bytes()
    assert graph.stat().st_mode & 0o777 == 0o600
    caplog.clear()
    assert quantize.int8_model(artifacts) == graph and "damaged" not in caplog.text  # reused
    assert graph.read_bytes() == whole
    graph.write_bytes(whole[: len(whole) // 2] + b"\0" * 64 + whole[len(whole) // 2 + 64 :])
    predictor = Predictor(model, quantize=True)
    assert predictor.quantized and predictor.predict("Thank you ", k=3).candidates
    assert f"{graph.name} is damaged" in caplog.text
    assert graph.read_bytes() == whole  # made again, the same graph
    assert graph.with_name(graph.name + ".damaged").exists()


def test_damaged_training_graphs_are_made_again_and_private(
    tiny_llama: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a damaged cached graph failed every nightly job with a raw RuntimeError from
    ORT's module.cc and was never rebuilt; the graphs were 0644 until the next daemon start."""
    from wordahead.learn.trainer import LoraTrainer
    from wordahead.model.training_graphs import GRAPH_FILES

    art = ArtifactSet.open(tiny_llama)
    cache = tmp_path / "cache"
    old = os.umask(0)
    try:
        trainer = LoraTrainer(art, art.initial_adapter(), groups="lm_head", cache_dir=cache)
    finally:
        os.umask(old)
    (made,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    for path in made.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    batches = trainer.batches(["Thank you for your help with the project."] * 4, 16, 2)
    loss = trainer.evaluate(batches)
    whole = {name: (made / name).read_bytes() for name in GRAPH_FILES}
    for name in ("eval_model.onnx", "checkpoint"):
        data = bytearray(whole[name])
        data[len(data) // 3 : len(data) // 3 + 32] = b"\xff" * 32
        (made / name).write_bytes(bytes(data))
        again = LoraTrainer(art, art.initial_adapter(), groups="lm_head", cache_dir=cache)
        assert again.evaluate(batches) == pytest.approx(loss)
        assert f"{made.name} is damaged ({name} does not match" in caplog.text
        assert (made / name).read_bytes() == whole[name] or name == "checkpoint"
        assert made.with_name(made.name + ".damaged").is_dir()
        caplog.clear()


def test_an_empty_or_inflating_lexicon_is_refused_with_a_log_line(
    model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a valid but empty lexicon left no word offered and a 400 MB gzip bomb took
    530 MB, both with nothing logged."""
    import tracemalloc

    path = model / LEXICON_FILE
    Lexicon.save(path, [])
    with pytest.raises(LexiconError, match="holds no words"):
        Lexicon.load(path)
    predictor = Predictor(model)
    assert predictor.lexicon is None and len(predictor.predict("Thank you ", k=3).candidates) == 3
    assert "holds no words; offering words without it" in caplog.text
    with open(path, "wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, compresslevel=1) as f:
        for _ in range(100):
            f.write(b"a\n" * 2**19)  # 100 MB once inflated
    tracemalloc.start()
    try:
        with pytest.raises(LexiconError, match="inflates past"):
            Lexicon.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 80 * 2**20, peak
    Lexicon.save(path, ["thank", "you"])
    assert len(Lexicon.load(path)) == 2


def test_a_damaged_shipped_model_stops_with_what_to_do(model: Path) -> None:
    """The one damage keyboard cannot repair: the message says how to restore the model."""
    from wordahead.model.artifacts import ArtifactError

    graph = model / "inference.onnx"
    data = graph.read_bytes()
    graph.write_bytes(data[: len(data) // 2])  # cut short, as by a full disk
    with pytest.raises(ArtifactError, match="damaged: restore them.*KEYBOARD_MODEL"):
        Predictor(model)
