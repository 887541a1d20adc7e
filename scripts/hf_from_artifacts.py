"""Rebuild a Hugging Face model directory from an artifact set's inference graph, so a model
whose training checkpoint is gone can be exported again (other adapter groups, rank, layers).

The base weights are the graph's initializers (LoRA tensors and the ".base_layer" wrapping
of peft are dropped); the config and tokenizer come from the manifest and tokenizer.json.
Llama-family sets only. Needs the export extra (torch, transformers).

    python scripts/hf_from_artifacts.py models/starter /tmp/starter-hf
    keyboard export --base-model /tmp/starter-hf --out /tmp/starter-groups
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

PREFIX = "model.base_model.model."  # the export wrappers' attribute, then peft's


def rebuild(artifacts_dir: Path, out: Path) -> Path:
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    manifest = json.loads((artifacts_dir / "manifest.json").read_text())
    base = manifest["base_model"]
    if base.get("family") != "llama":
        raise SystemExit(f"only Llama-family artifact sets can be rebuilt, not {base['family']}")
    config = LlamaConfig(**{k: v for k, v in base["config"].items() if not k.startswith("_")})
    model = LlamaForCausalLM(config)
    graph = onnx.load(str(artifacts_dir / manifest["inference"]["file"]))
    weights = {}
    for init in graph.graph.initializer:
        if init.name.startswith(PREFIX) and ".lora_" not in init.name:
            name = init.name[len(PREFIX) :].replace(".base_layer.", ".")
            weights[name] = torch.from_numpy(numpy_helper.to_array(init).copy())
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied: lm_head.weight is the embedding; rotary buffers are recomputed.
    missing = [m for m in missing if m != "lm_head.weight" and "rotary" not in m]
    if missing or unexpected:
        raise SystemExit(f"weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    special = manifest["tokenizer"]["special_tokens"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(artifacts_dir / manifest["tokenizer"]["file"]),
        eos_token=special["eos"],
        bos_token=special["bos"],
    )
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    print(rebuild(args.artifacts, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
