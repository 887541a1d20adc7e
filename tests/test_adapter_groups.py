"""Adapter groups: a job trains a chosen subset of the LoRA tensors; the rest stay as given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.tiny_models import corpus_lines
from wordahead.learn.trainer import LoraTrainer
from wordahead.model.artifacts import ArtifactSet
from wordahead.model.training_graphs import GroupError, default_groups, groups_of, parse_groups
from wordahead.paths import starter_model_dir


def _perturbed(art: ArtifactSet, seed: int) -> dict[str, np.ndarray]:
    """The initial adapter with every B made non-zero: each group changes the model."""
    rng = np.random.default_rng(seed)
    return {
        n: (rng.normal(0, 0.05, v.shape).astype(np.float32) if "lora_B" in n else v)
        for n, v in art.initial_adapter().items()
    }


def test_each_group_trains_alone_and_the_others_keep_their_values(
    tiny_llama: Path, tmp_path: Path
) -> None:
    art = ArtifactSet.open(tiny_llama)
    members = groups_of(art)
    assert list(members) == ["attention", "mlp", "lm_head"]
    start = _perturbed(art, 0)
    losses = []
    for group in members:
        trainer = LoraTrainer(art, start, groups=group, cache_dir=tmp_path)
        assert sorted(trainer.trainable_names()) == sorted(members[group])
        batches = trainer.batches(corpus_lines()[:30], seq_len=16, batch_size=4)
        losses.append(trainer.evaluate(batches))
        trainer.fit(batches, max_steps=8, lr=1e-2, warmup=1)
        after = trainer.adapter()
        for name, value in start.items():
            moved = not np.array_equal(value, after[name])
            assert moved == (name in members[group]), (group, name)
    # The frozen groups' values are the ones given (not the initial B = 0): every trainer
    # measured the same model before training.
    assert max(losses) - min(losses) < 1e-5
    base = LoraTrainer(art, art.initial_adapter(), groups="mlp", cache_dir=tmp_path)
    assert abs(base.evaluate(batches) - losses[0]) > 1e-4


def test_training_graphs_are_made_once_per_subset(tiny_llama: Path, tmp_path: Path) -> None:
    art = ArtifactSet.open(tiny_llama)
    LoraTrainer(art, groups="mlp,lm_head", cache_dir=tmp_path)
    made = sorted(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert [p.name.split("-")[0] for p in made] == ["mlp+lm_head"]
    stamp = (made[0] / "checkpoint").stat().st_mtime_ns
    LoraTrainer(art, groups="lm_head,mlp", cache_dir=tmp_path)  # the same subset, any order
    assert sorted(p for p in tmp_path.iterdir() if not p.name.startswith(".")) == made
    assert (made[0] / "checkpoint").stat().st_mtime_ns == stamp
    assert default_groups(art) == ["mlp", "lm_head"]  # the export's default choice
    LoraTrainer(art, groups="attention", cache_dir=tmp_path)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2


def test_group_names_are_checked(tiny_llama: Path) -> None:
    art = ArtifactSet.open(tiny_llama)
    assert parse_groups(art, "lm_head, attention") == ["attention", "lm_head"]
    assert parse_groups(art, None) == default_groups(art)
    with pytest.raises(GroupError, match="unknown adapter group.*embedding"):
        parse_groups(art, "embedding")
    with pytest.raises(GroupError, match="no adapter group"):
        parse_groups(art, ",")


def test_a_set_exported_before_groups_still_trains(tmp_path: Path) -> None:
    starter = ArtifactSet.open(starter_model_dir())
    if starter.manifest["training"].get("loss_model"):
        pytest.skip("the shipped starter is exported with groups")
    assert groups_of(starter) == {"attention": list(starter.lora_shapes)}
    trainer = LoraTrainer(starter, starter.initial_adapter(), cache_dir=tmp_path)
    batch = trainer.batches(["Thank you for your help with the move."] * 4, 16, 2)
    assert np.isfinite(trainer.train_step(batch[0], 1e-3))
    assert not list(tmp_path.iterdir())  # its own shipped graphs: nothing made
    with pytest.raises(GroupError, match="unknown adapter group.*mlp.*has attention"):
        LoraTrainer(starter, groups="attention,mlp", cache_dir=tmp_path)
