"""Export + device-side training: only LoRA changes, loss falls, ORT matches PyTorch, no torch on device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.tiny_models import corpus_lines
from wordahead.learn.trainer import IGNORE, LoraTrainer, make_batches
from wordahead.model import runtime
from wordahead.model.artifacts import ArtifactError, ArtifactSet, bake_inference_model, load_adapter
from wordahead.types import KeyboardError

# Models are built in the tests (request.getfixturevalue, build_model); wordahead.model.export
# imports torch, so it is imported where it is used.
pytestmark = pytest.mark.torch

REPO = Path(__file__).resolve().parent.parent


def _train(art_dir: Path, steps: int = 30) -> tuple[LoraTrainer, dict, dict, float, float]:
    art = ArtifactSet.open(art_dir)
    trainer = LoraTrainer(art, art.initial_adapter())
    frozen = {
        n: np.array(p.data) for n, p in trainer.state.parameters if n not in trainer.lora_names
    }
    before = trainer.adapter()
    batches = trainer.batches(corpus_lines()[:40], seq_len=32, batch_size=8)
    loss0 = trainer.evaluate(batches)
    trainer.fit(batches, max_steps=steps, lr=1e-2, warmup=2)
    return trainer, frozen, before, loss0, trainer.evaluate(batches)


def _infer(model: Path, art: ArtifactSet, ids: np.ndarray) -> np.ndarray:
    ort = runtime.onnxruntime()
    session = ort.InferenceSession(str(model), runtime.session_options(1))
    info = art.manifest["inference"]
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(ids.shape[1])[None].repeat(ids.shape[0], 0),
    }
    for i in range(info["layers"]):
        for kv in ("key", "value"):
            feeds[f"past.{i}.{kv}"] = np.zeros(
                (ids.shape[0], info["kv_heads"], 0, info["head_dim"]), np.float32
            )
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_training_changes_only_lora_and_loss_falls(family: str, request: pytest.FixtureRequest):
    trainer, frozen, before, loss0, loss1 = _train(request.getfixturevalue(family))
    after = trainer.adapter()
    assert all(not np.array_equal(before[n], after[n]) for n in trainer.lora_names)
    for name, value in frozen.items():
        assert np.array_equal(value, np.array(trainer.state.parameters[name].data)), name
    assert loss1 < loss0 - 0.3, (loss0, loss1)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_trained_inference_model_matches_pytorch_with_merged_lora(
    family: str, request: pytest.FixtureRequest, tmp_path: Path
):
    torch = pytest.importorskip("torch")
    from wordahead.model.export import ExportConfig, load_base_model, wrap_with_lora

    art_dir = request.getfixturevalue(family)
    trainer, *_ = _train(art_dir, steps=10)
    adapter = trainer.adapter()
    art = ArtifactSet.open(art_dir)
    baked = bake_inference_model(art, adapter, tmp_path / "baked.onnx")
    ids = np.array([[3, 17, 42, 99, 5, 8, 120, 7]], dtype=np.int64)
    ort_logits = _infer(baked, art, ids)

    model, _ = load_base_model(art.manifest["base_model"]["id"])
    config = ExportConfig(**art.manifest["export_config"])
    peft_model = wrap_with_lora(model, config)
    state = {k.removeprefix("model."): torch.from_numpy(v) for k, v in adapter.items()}
    result = peft_model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    # Not merged: lm_head is tied to the embedding, and merging its LoRA into the shared
    # weight would move the input embedding too, which the exported graphs do not.
    with torch.no_grad():
        ref = peft_model(torch.from_numpy(ids)).logits[:, -1].numpy()
    assert np.abs(ref - ort_logits).max() < 1e-4
    # and the adapter really matters: the base model's logits differ
    assert np.abs(_infer(art.inference_model, art, ids) - ort_logits).max() > 1e-3


def test_kv_cache_gives_the_same_logits(tiny_llama: Path):
    art = ArtifactSet.open(tiny_llama)
    ort = runtime.onnxruntime()
    session = ort.InferenceSession(str(art.inference_model), runtime.session_options(1))
    info = art.manifest["inference"]
    ids = np.array([[4, 9, 16, 25, 36, 49]], dtype=np.int64)
    full = _infer(art.inference_model, art, ids)
    empty = np.zeros((1, info["kv_heads"], 0, info["head_dim"]), np.float32)
    feeds = {"input_ids": ids[:, :4], "attention_mask": np.ones((1, 4), np.int64)}
    feeds["position_ids"] = np.arange(4)[None]
    feeds.update(
        {f"past.{i}.{kv}": empty for i in range(info["layers"]) for kv in ("key", "value")}
    )
    first = session.run(None, feeds)
    names = [o.name for o in session.get_outputs()]
    step = {"input_ids": ids[:, 4:], "attention_mask": np.ones((1, 6), np.int64)}
    step["position_ids"] = np.arange(4, 6)[None]
    step.update({n.replace("present", "past"): v for n, v in zip(names[1:], first[1:])})
    assert np.abs(session.run(["logits"], step)[0] - full).max() < 1e-5


def test_manifest_describes_the_artifact_set(tiny_llama: Path):
    manifest = json.loads((tiny_llama / "manifest.json").read_text())
    assert manifest["base_model"]["family"] == "llama"
    assert len(manifest["base_model"]["sha256"]) == 64
    assert manifest["lora"]["targets"] == [
        "down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"
    ]  # fmt: skip
    assert manifest["lora"]["layers"] == [0, 1]
    assert manifest["opset"] == 17
    assert {"onnx", "onnxruntime-training-cpu", "torch"} <= set(manifest["versions"])
    # One loss graph; the training graphs are made on the device per group subset.
    assert (tiny_llama / manifest["training"]["loss_model"]).is_file()
    assert not (tiny_llama / "training" / "checkpoint").exists()
    groups = manifest["lora"]["groups"]
    assert list(groups) == ["attention", "mlp", "lm_head"]
    assert sorted(n for names in groups.values() for n in names) == sorted(
        manifest["lora"]["tensors"]
    )
    assert all(".lm_head." in n for n in groups["lm_head"])
    assert all(".mlp." in n for n in groups["mlp"])
    assert all(".self_attn." in n for n in groups["attention"])
    initial = load_adapter(tiny_llama / "adapters" / "initial.npz", ArtifactSet.open(tiny_llama))
    assert set(initial) == set(manifest["lora"]["tensors"])
    # LoRA starts as the identity: every B is zero
    assert all(not v.any() for k, v in initial.items() if "lora_B" in k)


def test_top_layers_only_carry_adapters(tmp_path: Path):
    from tests.tiny_models import build_model
    from wordahead.model.export import ExportConfig, export_model

    hf = build_model("llama", tmp_path / "hf", layers=3)
    manifest = export_model(hf, tmp_path / "out", ExportConfig(rank=2, layers="top:1"))
    assert manifest["lora"]["layers"] == [2]
    inner = [n for n in manifest["lora"]["tensors"] if ".lm_head." not in n]
    assert inner and all(".layers.2." in name for name in inner)
    assert len(manifest["lora"]["groups"]["lm_head"]) == 2  # in no layer: always adapted


def test_parse_layers():
    from wordahead.model.export import parse_layers

    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("top:2", 4) == [2, 3]
    assert parse_layers("0, 2", 4) == [0, 2]
    for bad in ("top:9", "7", "x", ""):
        with pytest.raises(KeyboardError):
            parse_layers(bad, 4)


def test_batches_shift_labels_and_mask_padding():
    stream = list(range(1, 12))  # windows of 4: [1..4]->[2..5], [5..8]->[6..9], [9,10]->[10,11]
    batches = make_batches(stream, seq_len=4, batch_size=2)
    assert [b.input_ids.shape for b in batches] == [(2, 4), (1, 4)]
    first = batches[0]
    assert first.input_ids[0].tolist() == [1, 2, 3, 4]
    assert first.labels[0].tolist() == [2, 3, 4, 5]
    last = batches[1]
    assert last.input_ids[0].tolist() == [9, 10, 0, 0]
    assert last.labels[0].tolist() == [10, 11, IGNORE, IGNORE]
    assert last.attention_mask[0].tolist() == [1, 1, 0, 0]
    assert sum(b.tokens for b in batches) == 10


def test_corrupt_or_mismatched_adapter_is_refused(tiny_llama: Path, tmp_path: Path):
    art = ArtifactSet.open(tiny_llama)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ArtifactError):
        load_adapter(bad, art)
    wrong = {k: np.zeros((1, 1), np.float32) for k in art.lora_shapes}
    np.savez(tmp_path / "wrong.npz", **wrong)
    with pytest.raises(ArtifactError, match="shape"):
        load_adapter(tmp_path / "wrong.npz", art)
    with pytest.raises(ArtifactError, match="manifest"):
        ArtifactSet.open(tmp_path)


def test_device_side_never_imports_torch(tiny_llama: Path):
    code = f"""
import sys
from wordahead.model.artifacts import ArtifactSet
from wordahead.learn.trainer import LoraTrainer
from wordahead.model import runtime
art = ArtifactSet.open({str(tiny_llama)!r})
trainer = LoraTrainer(art, art.initial_adapter())
batches = trainer.batches(["hello there, how are you today?"] * 8, seq_len=16, batch_size=2)
trainer.train_step(batches[0], 1e-3)
ort = runtime.onnxruntime()
ort.InferenceSession(str(art.inference_model), runtime.session_options(1))
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft'))
print('HEAVY', bad)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_cli_export_on_a_local_model_dir(tmp_path: Path):
    from tests.tiny_models import build_model

    hf = build_model("gpt2", tmp_path / "hf")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "wordahead",
            "export",
            "--base-model",
            str(hf),
            "--out",
            str(tmp_path / "art"),
            "--rank",
            "2",
            "--layers",
            "top:1",
            "--seq-len",
            "8",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["lora"]["rank"] == 2 and manifest["lora"]["layers"] == [1]
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "wordahead",
            "export",
            "--base-model",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert missing.returncode == 1 and "cannot load model" in missing.stderr
