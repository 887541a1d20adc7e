"""Int8 dynamic quantization of the inference graph, and the record of what it costs in accuracy.

The exported graph multiplies by `Transpose(weight)` (the exporter keeps initializers unfolded so
LoRA tensors stay overridable by name), and ORT's dynamic quantizer only quantizes a MatMul whose
weight is an initializer. So the base weights' transposes are folded first; the LoRA tensors are
left alone (float, same names), so an adapter still applies to the int8 graph by replacing them.

Whether int8 is used by default is decided by `quantization.json` in the artifact set, which
`benchmarks/predict_latency.py --record` writes after measuring top-3 next-word accuracy of fp32
and int8 on the same text.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from keyboard import paths, runtime
from keyboard.artifacts import ArtifactError, ArtifactSet, write_atomic

INT8_FILE = "inference.int8.onnx"
RECORD_FILE = "quantization.json"
MAX_TOP3_LOSS = 0.0  # int8 is the default only if it loses no top-3 accuracy at all


def fold_weight_transposes(model: Any, keep: set[str]) -> int:
    """Replace each `Transpose(initializer)` of a 2-D weight not in `keep` by a transposed
    initializer with the Transpose's output name; returns how many were folded."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    folded = []
    for node in model.graph.node:
        if node.op_type != "Transpose" or node.input[0] not in inits or node.input[0] in keep:
            continue
        weight = numpy_helper.to_array(inits[node.input[0]])
        perm = [a.ints for a in node.attribute if a.name == "perm"]
        if weight.ndim != 2 or (perm and list(perm[0]) != [1, 0]):
            continue
        model.graph.initializer.append(
            numpy_helper.from_array(weight.T.copy(), name=node.output[0])
        )
        folded.append(node)
    for node in folded:
        model.graph.node.remove(node)
    used = {name for node in model.graph.node for name in node.input}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)  # weights only the folded transposes read
    return len(folded)


def quantize_model(source: Path, out: Path, keep: set[str], exclude: tuple[str, ...] = ()) -> Path:
    """Write an int8 (dynamic, per-channel 7-bit weights) copy of `source` to `out`; the
    initializers named in `keep` (the LoRA tensors) stay float32 and keep their names, and
    so do the MatMuls whose node names end with one of `exclude`."""
    import onnx

    q = runtime.quantization_api()
    model = onnx.load(str(source))
    missing = keep - {i.name for i in model.graph.initializer}
    if missing:
        raise ArtifactError(f"{source}: LoRA tensors missing from the graph: {sorted(missing)[:3]}")
    fold_weight_transposes(model, keep)
    with tempfile.TemporaryDirectory(prefix="keyboard-quantize-") as tmp:
        folded = Path(tmp) / "folded.onnx"
        onnx.save(model, str(folded))
        quantized = Path(tmp) / "int8.onnx"
        skip = [n.name for n in model.graph.node if n.name.endswith(exclude)] if exclude else []
        q.quantize_dynamic(
            str(folded),
            str(quantized),
            weight_type=q.QuantType.QInt8,
            per_channel=True,
            # 7-bit weights: without AVX512-VNNI, ORT's u8 x s8 kernels sum pairs of products
            # in int16, which saturates with full-range weights (measured: fewer top-3 misses).
            reduce_range=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=skip,
            extra_options={"MatMulConstBOnly": True},
        )
        result = onnx.load(str(quantized))
    names = {i.name for i in result.graph.initializer}
    if not keep <= names:
        raise ArtifactError("quantization renamed LoRA tensors; adapters would not apply")
    result.ir_version = min(result.ir_version, 10)  # what ORT 1.19 reads
    write_atomic(out, lambda f: f.write(result.SerializeToString()))
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def int8_model(artifacts: ArtifactSet) -> Path:
    """The int8 inference graph of `artifacts`, quantized on first use and cached next to the
    model (or under the keyboard home when the model directory is read-only)."""
    source = artifacts.inference_model
    local = artifacts.root / INT8_FILE
    if local.is_file() and local.stat().st_mtime >= source.stat().st_mtime:
        return local
    if os.access(artifacts.root, os.W_OK):
        target = local
    else:
        target = paths.private_dir(paths.home() / "models" / _sha256(source)[:16]) / INT8_FILE
        if target.is_file():
            return target
    return quantize_model(source, target, set(artifacts.lora_shapes))


def read_record(artifacts: ArtifactSet) -> dict[str, Any] | None:
    """The accuracy measurement of fp32 vs int8 stored with the model, if any."""
    path = artifacts.root / RECORD_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    return record if isinstance(record, dict) else None


def int8_by_default(artifacts: ArtifactSet) -> bool:
    """True only if a measurement for this very graph says int8 costs no top-3 accuracy."""
    record = read_record(artifacts)
    if not record or record.get("inference_sha256") != _sha256(artifacts.inference_model):
        return False
    return bool(record.get("int8_ok"))


def write_record(
    artifacts: ArtifactSet, fp32: dict[str, Any], int8: dict[str, Any], **extra: Any
) -> dict:
    """Store a measurement (`fp32`/`int8`: at least {"top3": ...}) and the decision it implies."""
    record = {
        "inference_sha256": _sha256(artifacts.inference_model),
        "fp32": fp32,
        "int8": int8,
        "max_top3_loss": MAX_TOP3_LOSS,
        "int8_ok": int8["top3"] >= fp32["top3"] - MAX_TOP3_LOSS,
        **extra,
    }
    text = json.dumps(record, indent=2) + "\n"
    write_atomic(artifacts.root / RECORD_FILE, lambda f: f.write(text.encode()))
    return record
