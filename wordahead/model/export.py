"""Export a causal LM with LoRA adapters to ONNX Runtime training artifacts and an inference graph.

This is the only module that needs torch, transformers and peft (the `export` extra). It writes
one artifact set (layout in docs/design.md):

    manifest.json              what the set is: base model, LoRA config, tensor names, versions
    tokenizer.json             the tokenizer (tokenizers library format)
    training/loss_model.onnx   the forward loss graph, every LoRA tensor a named initializer: the
                               device makes the ORT training artifacts for the adapter groups
                               a job trains from it (wordahead.model.training_graphs)
    inference.onnx             next-token logits (last position) with a key/value cache
    adapters/initial.npz       the LoRA tensors as exported (B = 0: the base model itself)
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from wordahead.types import KeyboardError

OPSET = 17
MANIFEST = "manifest.json"
INFERENCE = "inference.onnx"
TRAINING_DIR = "training"
INITIAL_ADAPTER = "adapters/initial.npz"

LOSS_MODEL = f"{TRAINING_DIR}/loss_model.onnx"

# Per model family: the name of the ModuleList holding the layers, and the adapter groups:
# the modules each one puts LoRA on, inside a layer (a regex over the module path after the
# layer index) or at the top (lm_head: the output projection, tied to the embedding).
_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {
        "layers_pattern": "layers",
        "groups": {
            "attention": r"self_attn\.(q_proj|k_proj|v_proj|o_proj)",
            "mlp": r"mlp\.(gate_proj|up_proj|down_proj)",
        },
    },
    "gpt2": {
        "layers_pattern": "h",
        "groups": {"attention": r"attn\.(c_attn|c_proj)", "mlp": r"mlp\.(c_fc|c_proj)"},
    },
}
TOP_GROUPS = {"lm_head": "lm_head"}
ALL_GROUPS = ("attention", "mlp", "lm_head")


@dataclass
class ExportConfig:
    """LoRA and export options."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: str | list[str] = "auto"  # "auto" (the groups) or comma-separated names
    groups: str = "attention,mlp,lm_head"  # adapter groups that get LoRA (with "auto")
    # The groups the nightly job trains by default ("": all of them): mlp+lm_head kept 91% of
    # the all-groups dev-loss gain with less work per step (docs/results.md).
    train_groups: str = "mlp,lm_head"
    layers: str = "all"  # "all", "top:N", or comma-separated indices (lm_head is not in one)
    seq_len: int = 64  # length of the sample used to trace the training graph
    seed: int = 0


def _family(model: nn.Module) -> str:
    model_type = getattr(model.config, "model_type", "")
    if model_type not in _FAMILIES:
        raise KeyboardError(
            f"unsupported model type {model_type!r}: keyboard exports {', '.join(_FAMILIES)}"
        )
    return model_type


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """`all` -> every layer, `top:N` -> the last N, `0,2,5` -> those indices."""
    spec = spec.strip()
    if spec == "all":
        return list(range(n_layers))
    if spec.startswith("top:"):
        n = int(spec[4:])
        if not 1 <= n <= n_layers:
            raise KeyboardError(f"--layers top:{n}: the model has {n_layers} layers")
        return list(range(n_layers - n, n_layers))
    try:
        indices = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError as exc:
        raise KeyboardError(f"--layers {spec!r}: expected all, top:N or indices like 0,2") from exc
    if not indices or indices[0] < 0 or indices[-1] >= n_layers:
        raise KeyboardError(f"--layers {spec!r}: indices must be within 0..{n_layers - 1}")
    return indices


def load_base_model(base_model: str | Path) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer (local directory, or hub id when online)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_model))
        model = AutoModelForCausalLM.from_pretrained(
            str(base_model), dtype=torch.float32, attn_implementation="eager"
        )
    except OSError as exc:
        raise KeyboardError(f"cannot load model {base_model}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise KeyboardError("keyboard needs a fast (tokenizers) tokenizer for the device side")
    model.eval()
    return model, tokenizer


def wrap_with_lora(model: nn.Module, config: ExportConfig) -> nn.Module:
    """Wrap `model` with peft LoRA; the LoRA A/B tensors become the only trainable parameters."""
    from peft import LoraConfig, get_peft_model

    family = _FAMILIES[_family(model)]
    layers = parse_layers(config.layers, model.config.num_hidden_layers)
    layer_re = rf"(.*\.)?{family['layers_pattern']}\.({'|'.join(map(str, layers))})\."
    if config.target_modules == "auto":
        # One regex, not target names plus layers_to_transform: peft's layer filter would
        # drop lm_head, which is in no layer.
        groups = _parse_export_groups(config.groups)
        inner = [family["groups"][g] for g in groups if g in family["groups"]]
        parts = [f"{layer_re}({'|'.join(inner)})"] if inner else []
        parts += [rf"(.*\.)?{TOP_GROUPS[g]}" for g in groups if g in TOP_GROUPS]
        targets: str | list[str] = "|".join(f"({p})" for p in parts)
    else:
        names = config.target_modules
        if isinstance(names, str):
            names = [t.strip() for t in names.split(",") if t.strip()]
        targets = rf"{layer_re}(.*\.)?({'|'.join(re.escape(n) for n in names)})"
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=_family(model) == "gpt2",  # GPT-2 uses Conv1D (weights transposed)
    )
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, lora)
    peft_model.eval()
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise KeyboardError(f"no LoRA target matched {targets} in layers {layers}")
    return peft_model


def _parse_export_groups(spec: str) -> list[str]:
    groups = [g.strip() for g in spec.split(",") if g.strip()]
    if unknown := [g for g in groups if g not in ALL_GROUPS]:
        raise KeyboardError(f"unknown adapter group(s) {unknown}; known: {', '.join(ALL_GROUPS)}")
    if not groups:
        raise KeyboardError("no adapter group to export")
    return [g for g in ALL_GROUPS if g in groups]


def lora_groups(model_type: str, lora_names: list[str]) -> dict[str, list[str]]:
    """Group name -> the LoRA tensor names in it (manifest order); a tensor no group's pattern
    matches (explicit `target_modules`) is in "other"."""
    family = _FAMILIES[model_type]
    out: dict[str, list[str]] = {}
    for name in lora_names:
        group = "other"
        for g, pattern in family["groups"].items():
            if re.search(rf"\.{family['layers_pattern']}\.\d+\.{pattern}\.lora_", name):
                group = g
                break
        else:
            for g, module in TOP_GROUPS.items():
                if re.search(rf"(^|\.){module}\.lora_", name):
                    group = g
        out.setdefault(group, []).append(name)
    return out


class TrainingGraph(nn.Module):
    """(input_ids, attention_mask, labels) -> mean cross-entropy over labels != -100.

    Labels are already shifted by the trainer (labels[t] is the token after input_ids[t]), and
    the loss is computed inside the graph because ORT's CrossEntropyLoss block wants the class
    axis at dim 1, while logits are [B, T, V].
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )


class InferenceGraph(nn.Module):
    """(input_ids, attention_mask, position_ids, past k/v per layer) -> last logits, present k/v."""

    def __init__(self, model: nn.Module, n_layers: int) -> None:
        super().__init__()
        self.model = model
        self.n_layers = n_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)]
        cache = DynamicCache(pairs, config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache_position=position_ids[0],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits[:, -1, :], *present)


def kv_shape(config: Any) -> tuple[int, int]:
    """(number of key/value heads, head dimension) of a model config."""
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_kv, head_dim


def _lora_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _save_onnx(model: onnx.ModelProto, path: Path) -> None:
    # ORT training 1.19.2 reads IR version 10 at most.
    model.ir_version = min(model.ir_version, 10)
    onnx.save(model, str(path))


def export_loss_graph(peft_model: nn.Module, out: Path, config: ExportConfig) -> dict[str, Any]:
    """Trace the loss graph (the device makes training artifacts for any subset of the LoRA
    tensors from it, wordahead.model.training_graphs); returns the manifest's `training` part."""
    from wordahead.model.training_graphs import add_layernorm_stat_outputs

    lora = _lora_names(peft_model)
    wrapper = TrainingGraph(peft_model)
    vocab = peft_model.config.vocab_size
    gen = torch.Generator().manual_seed(config.seed)
    ids = torch.randint(0, vocab, (2, config.seq_len), generator=gen)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    path = out / LOSS_MODEL
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (ids, mask, labels),
            str(path),
            input_names=["input_ids", "attention_mask", "labels"],
            output_names=["loss"],
            dynamic_axes={
                k: {0: "batch", 1: "sequence"} for k in ("input_ids", "attention_mask", "labels")
            },
            opset_version=OPSET,
            do_constant_folding=False,  # keeps the LoRA initializers separate and named
            training=torch.onnx.TrainingMode.TRAINING,
            dynamo=False,
        )
    graph = onnx.load(str(path))
    add_layernorm_stat_outputs(graph)
    initializers = {i.name for i in graph.graph.initializer}
    names = {f"model.{n}" for n, _ in peft_model.named_parameters(remove_duplicate=False)}
    requires_grad = [f"model.{n}" for n in lora]
    missing = [n for n in requires_grad if n not in initializers]
    if missing:
        raise KeyboardError(f"exporter dropped LoRA tensors: {missing[:3]}")
    _save_onnx(graph, path)
    return {
        "dir": TRAINING_DIR,
        "loss_model": LOSS_MODEL,
        "inputs": ["input_ids", "attention_mask", "labels"],
        "parameters": sorted(initializers & names),
        "optimizer": "AdamW",
        "seq_len": config.seq_len,
    }


def export_inference_graph(peft_model: nn.Module, out: Path) -> dict[str, Any]:
    """Trace the next-token graph with a key/value cache; LoRA tensors stay named initializers."""
    config = peft_model.config
    n_layers = config.num_hidden_layers
    n_kv, head_dim = kv_shape(config)
    wrapper = InferenceGraph(peft_model, n_layers)
    batch, past_len, new = 2, 3, 4
    ids = torch.randint(0, config.vocab_size, (batch, new))
    mask = torch.ones(batch, past_len + new, dtype=torch.long)
    pos = torch.arange(past_len, past_len + new).unsqueeze(0).expand(batch, -1).contiguous()
    past = [torch.randn(batch, n_kv, past_len, head_dim) for _ in range(2 * n_layers)]
    past_names = [f"past.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    dynamic = {
        "input_ids": {0: "batch", 1: "new"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "new"},
        "logits": {0: "batch"},
    }
    dynamic.update({n: {0: "batch", 2: "past"} for n in past_names})
    dynamic.update({n: {0: "batch", 2: "total"} for n in present_names})
    path = out / INFERENCE
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (ids, mask, pos, *past),
            str(path),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            do_constant_folding=False,  # LoRA initializers must stay overridable by name
            dynamo=False,
        )
    _save_onnx(onnx.load(str(path)), path)
    return {"layers": n_layers, "kv_heads": n_kv, "head_dim": head_dim}


def _restore_initial_adapter(out: Path, initial: dict[str, np.ndarray]) -> None:
    from wordahead.model.artifacts import ArtifactSet, bake_inference_model, save_adapter

    (out / "adapters").mkdir()
    save_adapter(out / INITIAL_ADAPTER, initial)
    for graph in (out / LOSS_MODEL, out / INFERENCE):
        model = onnx.load(str(graph))
        names = {i.name for i in model.graph.initializer}
        if missing := sorted(set(initial) - names):
            raise KeyboardError(f"{graph.name} lost LoRA tensors: {missing[:3]}")
        bake_inference_model(ArtifactSet(out), initial, graph, source=graph)


def _hash_model_files(base_model: str | Path) -> str:
    path = Path(str(base_model))
    digest = hashlib.sha256()
    if path.is_dir():
        for f in sorted(path.glob("*")):
            if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
                digest.update(f.name.encode())
                digest.update(f.read_bytes())
    else:
        digest.update(str(base_model).encode())
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "onnx", "onnxruntime-training-cpu"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def export_model(base_model: str | Path, out_dir: str | Path, config: ExportConfig) -> dict:
    """Export `base_model` with LoRA to a complete artifact set in `out_dir`; returns the manifest."""
    out = Path(out_dir)
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    model, tokenizer = load_base_model(base_model)
    family = _family(model)
    layers = parse_layers(config.layers, model.config.num_hidden_layers)
    peft_model = wrap_with_lora(model, config)

    lora_params = dict(peft_model.named_parameters())
    lora_names = _lora_names(peft_model)
    groups = lora_groups(family, [f"model.{n}" for n in lora_names])
    # Only the exported groups (a default the export left out, e.g. with --groups attention).
    train_groups = [g.strip() for g in config.train_groups.split(",") if g.strip() in groups]
    # Both graphs name parameters "model.<peft name>" (the wrappers' attribute).
    initial = {f"model.{n}": lora_params[n].detach().numpy().copy() for n in lora_names}
    # The exporter merges initializers with equal values, and every LoRA B starts at zero:
    # trace with distinct random values so each tensor keeps its own name, then put the
    # initial values back into the files.
    with torch.no_grad():
        for n in lora_names:
            lora_params[n].normal_(0.0, 0.02)
    training = export_loss_graph(peft_model, staging, config)
    cache = export_inference_graph(peft_model, staging)
    _restore_initial_adapter(staging, initial)
    tokenizer.backend_tokenizer.save(str(staging / "tokenizer.json"))

    special = {
        "eos": tokenizer.eos_token,
        "bos": tokenizer.bos_token,
        "eos_id": tokenizer.eos_token_id,
        "bos_id": tokenizer.bos_token_id,
    }
    manifest = {
        "format": 1,
        "base_model": {
            "id": str(base_model),
            "family": family,
            "sha256": _hash_model_files(base_model),
            "parameters": sum(
                p.numel() for n, p in peft_model.named_parameters() if n not in lora_names
            ),
            "vocab_size": model.config.vocab_size,
            "max_positions": getattr(model.config, "max_position_embeddings", None)
            or getattr(model.config, "n_positions", None),
            "config": {
                k: v
                for k, v in model.config.to_dict().items()
                if isinstance(v, (int, float, str, bool))
            },
        },
        "tokenizer": {"file": "tokenizer.json", "special_tokens": special},
        "lora": {
            "rank": config.rank,
            "alpha": config.alpha,
            "targets": sorted({re.sub(r".*\.(\w+)\.lora_[AB].*", r"\1", n) for n in lora_names}),
            "layers": layers,
            "parameters": int(sum(v.size for v in initial.values())),
            "tensors": {n: list(v.shape) for n, v in initial.items()},
            "groups": groups,
            "train_groups": train_groups,
        },
        "training": training,
        "inference": {
            "file": INFERENCE,
            "inputs": [
                "input_ids",
                "attention_mask",
                "position_ids",
                "past.{i}.key",
                "past.{i}.value",
            ],
            "outputs": ["logits", "present.{i}.key", "present.{i}.value"],
            **cache,
        },
        "initial_adapter": INITIAL_ADAPTER,
        "opset": OPSET,
        "ir_version": 10,
        "versions": _versions(),
        "export_config": asdict(config),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return manifest
