"""An exported artifact set on disk: its manifest, tokenizer, LoRA adapter files, baked models."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from keyboard.types import KeyboardError

Adapter = dict[str, np.ndarray]  # LoRA tensor name -> values


class ArtifactError(KeyboardError):
    """A missing, incomplete or corrupt artifact set or adapter."""


@dataclass(frozen=True)
class ArtifactSet:
    """A directory written by `keyboard export` (layout in docs/design.md)."""

    root: Path

    @classmethod
    def open(cls, root: str | Path) -> ArtifactSet:
        art = cls(Path(root))
        if not (art.root / "manifest.json").is_file():
            raise ArtifactError(
                f"{art.root} is not a keyboard model (no manifest.json); "
                "create one with `keyboard export` or point KEYBOARD_MODEL at models/starter"
            )
        for path in (art.inference_model, art.tokenizer_file):
            if not path.is_file():
                raise ArtifactError(f"model {art.root} is incomplete: {path.name} is missing")
        return art

    @cached_property
    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read {self.root / 'manifest.json'}: {exc}") from exc

    @property
    def inference_model(self) -> Path:
        return self.root / self.manifest["inference"]["file"]

    @property
    def tokenizer_file(self) -> Path:
        return self.root / self.manifest["tokenizer"]["file"]

    @property
    def training_dir(self) -> Path:
        return self.root / self.manifest["training"]["dir"]

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["special_tokens"]["eos_id"])

    @property
    def lora_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.manifest["lora"]["tensors"].items()}

    @property
    def name(self) -> str:
        return Path(str(self.manifest["base_model"]["id"])).name

    def tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(self.tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ArtifactError(f"cannot load tokenizer {self.tokenizer_file}: {exc}") from exc

    def initial_adapter(self) -> Adapter:
        return load_adapter(self.root / self.manifest["initial_adapter"], self)


def load_adapter(path: str | Path, artifacts: ArtifactSet | None = None) -> Adapter:
    """Read LoRA tensors from an .npz file; with `artifacts`, check names and shapes match."""
    try:
        with np.load(str(path), allow_pickle=False) as data:
            tensors = {k: np.ascontiguousarray(data[k], dtype=np.float32) for k in data.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"cannot read adapter {path}: {exc}") from exc
    if artifacts is not None:
        expected = artifacts.lora_shapes
        if set(tensors) != set(expected):
            raise ArtifactError(
                f"adapter {path} does not fit model {artifacts.root}: "
                f"{len(set(tensors) ^ set(expected))} tensor names differ"
            )
        for name, shape in expected.items():
            if tensors[name].shape != shape:
                raise ArtifactError(f"adapter {path}: {name} has shape {tensors[name].shape}")
        if not all(np.isfinite(v).all() for v in tensors.values()):
            raise ArtifactError(f"adapter {path} holds NaN or infinite values")
    return tensors


def write_atomic(path: Path, write: Any) -> None:
    """Call `write(file)` on a temp file in `path`'s directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_adapter(path: str | Path, tensors: Adapter) -> None:
    """Write LoRA tensors to an .npz file atomically (a crash leaves the old file intact)."""
    write_atomic(Path(path), lambda f: np.savez(f, **tensors))


def graph_with_adapter(model_path: str | Path, adapter: Adapter) -> bytes:
    """The serialized inference graph with `adapter`'s LoRA tensors in place of its own.

    Not `SessionOptions.add_initializer`: with full graph optimisation (ORT 1.19) constant
    folding of `Transpose(lora_B)` reads the graph's own tensor, and the override is ignored.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    replaced = 0
    for init in model.graph.initializer:
        if init.name in adapter:
            init.CopyFrom(numpy_helper.from_array(adapter[init.name], init.name))
            replaced += 1
    if replaced != len(adapter):
        raise ArtifactError(f"{model_path} lacks {len(adapter) - replaced} of the LoRA tensors")
    return model.SerializeToString()


def bake_inference_model(
    artifacts: ArtifactSet, adapter: Adapter, out: str | Path, source: Path | None = None
) -> Path:
    """Write a standalone inference model with `adapter`'s LoRA tensors in place of the initial ones."""
    data = graph_with_adapter(source or artifacts.inference_model, adapter)
    out = Path(out)
    write_atomic(out, lambda f: f.write(data))
    return out
