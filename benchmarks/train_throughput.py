"""ORT LoRA training step time and peak RSS: LoRA on all layers vs the top N layers.

Builds a 4-layer, 256-wide Llama-style model from a config (no download), exports it twice
(`--layers all` and `--layers top:N`), then times `LoraTrainer.train_step` on batch 8 x 64 in a
fresh subprocess per variant (so each peak RSS is its own). Prints JSON.

    python benchmarks/train_step.py [--steps 30] [--threads 2] [--top 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, resource, sys, time
import numpy as np
from keyboard.artifacts import ArtifactSet
from keyboard.trainer import LoraTrainer, make_batches
art = ArtifactSet.open(sys.argv[1]); steps = int(sys.argv[2]); threads = int(sys.argv[3])
trainer = LoraTrainer(art, art.initial_adapter(), threads=threads)
rng = np.random.default_rng(0)
stream = rng.integers(1, art.manifest["base_model"]["vocab_size"], 8 * 65 * 4).tolist()
batches = [b for b in make_batches(stream, 64, 8) if b.input_ids.shape[0] == 8]
for b in batches[:3]:
    trainer.train_step(b, 1e-3)  # warm-up: session initialisation and allocator
times = []
for i in range(steps):
    t = time.perf_counter(); trainer.train_step(batches[i % len(batches)], 1e-3)
    times.append((time.perf_counter() - t) * 1000)
print(json.dumps({"ms_per_step_median": float(np.median(times)), "ms_per_step_mean": float(np.mean(times)),
  "tokens_per_s": 8 * 64 / (np.median(times) / 1000),
  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  "torch_loaded": "torch" in sys.modules}))
"""


def build_model(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import train_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tokenizer(vocab_size=1000)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=2)
    args = parser.parse_args()
    from keyboard.export import ExportConfig, export_model

    results = {"model": "llama 4x256, vocab 1k", "batch": [8, 64], "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_model(Path(tmp) / "hf")
        for layers in ("all", f"top:{args.top}"):
            out = Path(tmp) / layers.replace(":", "")
            manifest = export_model(hf, out, ExportConfig(rank=8, alpha=16, layers=layers))
            run = subprocess.run(
                [sys.executable, "-c", CHILD, str(out), str(args.steps), str(args.threads)],
                capture_output=True,
                text=True,
                cwd=REPO,
                check=True,
            )
            row = json.loads(run.stdout.strip().splitlines()[-1])
            row["lora_parameters"] = manifest["lora"]["parameters"]
            results[f"lora_{layers}"] = row
    base, top = results["lora_all"], results[f"lora_top:{args.top}"]
    results["ratio_top_vs_all_ms"] = round(
        top["ms_per_step_median"] / base["ms_per_step_median"], 3
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
