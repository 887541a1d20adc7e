"""LoRA fine-tuning throughput: ONNX Runtime training vs PyTorch + peft, all layers vs top N.

Builds a 4-layer, 256-wide Llama-style model from a config (no download), exports it with LoRA
on all layers and on the top N, and runs the same fine-tuning (same model, LoRA config, random
token batches of 8 x 64, AdamW, steps) with ORT (`LoraTrainer.train_step`) and with PyTorch +
peft, each in a fresh subprocess so its peak RSS is its own. Prints JSON with ms/step,
tokens/s, peak RSS and the ORT/PyTorch ratios.

    python benchmarks/train_throughput.py [--steps 30] [--threads 2] [--top 2] [--model HF_DIR]
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

# ru_maxrss survives exec (it would report the parent's peak); VmHWM belongs to the new image.
PEAK_RSS = r"""
def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

ORT_CHILD = (
    PEAK_RSS
    + r"""
import json, sys, time
import numpy as np
from wordahead.model.artifacts import ArtifactSet
from wordahead.learn.trainer import LoraTrainer, make_batches
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
print(json.dumps({"engine": "onnxruntime", "ms_per_step_median": float(np.median(times)), "ms_per_step_mean": float(np.mean(times)),
  "tokens_per_s": 8 * 64 / (np.median(times) / 1000),
  "peak_rss_mb": peak_rss_mb(),
  "torch_loaded": "torch" in sys.modules}))
"""
)

TORCH_CHILD = (
    PEAK_RSS
    + r"""
import json, sys, time
import numpy as np, torch
from wordahead.model.export import ExportConfig, load_base_model, wrap_with_lora
from wordahead.learn.trainer import make_batches
hf, layers, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads); torch.manual_seed(0)
model, _ = load_base_model(hf)
model = wrap_with_lora(model, ExportConfig(rank=8, alpha=16, layers=layers))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
rng = np.random.default_rng(0)
stream = rng.integers(1, model.config.vocab_size, 8 * 65 * 4).tolist()
batches = [b for b in make_batches(stream, 64, 8) if b.input_ids.shape[0] == 8]
def step(b):
    ids, mask, labels = (torch.from_numpy(x) for x in (b.input_ids, b.attention_mask, b.labels))
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
for b in batches[:3]:
    step(b)
times = []
for i in range(steps):
    t = time.perf_counter(); step(batches[i % len(batches)])
    times.append((time.perf_counter() - t) * 1000)
print(json.dumps({"engine": "pytorch+peft", "ms_per_step_median": float(np.median(times)),
  "ms_per_step_mean": float(np.mean(times)), "tokens_per_s": 8 * 64 / (np.median(times) / 1000),
  "peak_rss_mb": peak_rss_mb()}))
"""
)


def _child(code: str, *args: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, check=True
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def build_model(out: Path) -> Path:
    """A 4-layer, 256-wide Llama-style model (random weights; the tokenizer, trained on a tiny
    corpus, stops at ~520 tokens of the 1,000 asked for)."""
    from tests.tiny_models import build_model as build

    return build(
        "llama",
        out,
        layers=4,
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=704,
        num_key_value_heads=4,
        max_position_embeddings=256,
        initializer_range=0.02,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=2)
    parser.add_argument("--model", help="HF model dir (default: a 4x256 Llama built from a config)")
    args = parser.parse_args()
    from wordahead.model.export import ExportConfig, export_model

    results: dict = {"batch": [8, 64], "steps": args.steps, "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(args.model) if args.model else build_model(Path(tmp) / "hf")
        results["model"] = str(args.model or "llama 4 layers x 256 (random weights)")
        for layers in ("all", f"top:{args.top}"):
            out = Path(tmp) / layers.replace(":", "")
            manifest = export_model(hf, out, ExportConfig(rank=8, alpha=16, layers=layers))
            results["vocab_size"] = manifest["base_model"]["vocab_size"]
            ort = _child(ORT_CHILD, str(out), str(args.steps), str(args.threads))
            pt = _child(TORCH_CHILD, str(hf), layers, str(args.steps), str(args.threads))
            results[f"lora_{layers}"] = {
                "lora_parameters": manifest["lora"]["parameters"],
                "onnxruntime": ort,
                "pytorch": pt,
                "tokens_per_s_ratio_ort_vs_torch": round(
                    ort["tokens_per_s"] / pt["tokens_per_s"], 3
                ),
                "peak_rss_ratio_ort_vs_torch": round(ort["peak_rss_mb"] / pt["peak_rss_mb"], 3),
            }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
