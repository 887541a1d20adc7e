"""Int8 dynamic quantization of the inference graph, and the record of what it costs in accuracy.

The exported graph multiplies by `Transpose(weight)` (the exporter keeps initializers unfolded so
LoRA tensors stay overridable by name), and ORT's dynamic quantizer only quantizes a MatMul whose
weight is an initializer. So the base weights' transposes are folded first; the LoRA tensors are
left alone (float, same names), so an adapter still applies to the int8 graph by replacing them.

Weights are 8-bit where the CPU has VNNI (AVX512-VNNI or AVX-VNNI: u8 x s8 products are summed
in int32) and 7-bit elsewhere (without VNNI, ORT's kernels sum pairs of products in int16, which
saturates with full-range weights). The two are different graphs, cached under different names.

Whether int8 is used by default is decided by `quantization.json` in the artifact set, which
`benchmarks/predict_latency.py --record` writes after a paired test of next-word top-3 of fp32
and int8 on the same words (`paired_top3_test`): int8 is the default only when at least
MIN_WORDS words were measured and int8's loss is not significant (one-sided exact McNemar test).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wordahead import paths
from wordahead.model import runtime
from wordahead.model.artifacts import (
    ArtifactError,
    ArtifactSet,
    file_sha256,
    set_aside,
    write_atomic,
)

INT8_FILE = "inference.int8.onnx"  # 8-bit weights (a CPU with VNNI)
INT8_7BIT_FILE = "inference.int8-7bit.onnx"  # 7-bit weights (any other CPU)
RECORD_FILE = "quantization.json"
MIN_WORDS = 5000  # a paired test on fewer words decides nothing
SIGNIFICANCE = 0.05  # one-sided p-value below which int8's top-3 loss counts as real


def cpu_has_vnni() -> bool:
    """Whether this CPU sums int8 products in int32 (AVX512-VNNI or AVX-VNNI)."""
    return bool(runtime.cpu_flags() & {"avx512_vnni", "avx_vnni"})


def int8_variant() -> str:
    """The int8 graph this machine gets: "8-bit" weights with VNNI, else "7-bit"."""
    return "8-bit" if cpu_has_vnni() else "7-bit"


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


def quantize_model(
    source: Path,
    out: Path,
    keep: set[str],
    exclude: tuple[str, ...] = (),
) -> Path:
    """Write an int8 (dynamic, per-channel) copy of `source` to `out`, with 7-bit weights where
    this CPU has no VNNI; the initializers named in `keep` (the LoRA tensors) stay float32 and
    keep their names, and so do the MatMuls whose node names end with one of `exclude`."""
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
            reduce_range=int8_variant() == "7-bit",
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


def _checksum_file(graph: Path) -> Path:
    """Beside a cached int8 graph: the digests of the graph and of the graph it was made from."""
    return graph.with_name(graph.name + ".sha256")


def _cached_graph_problem(graph: Path, source_sha256: str) -> str | None:
    """Why the cached int8 graph `graph` may not be used (None: it is whole and made from the
    fp32 graph whose digest is `source_sha256`)."""
    try:
        expected = json.loads(_checksum_file(graph).read_text())
    except FileNotFoundError:
        return "no checksum recorded with it"
    except (OSError, ValueError, RecursionError) as exc:
        return f"its checksum cannot be read: {exc}"
    if not isinstance(expected, dict) or expected.get("source_sha256") != source_sha256:
        return "made from another version of the model"
    if expected.get("sha256") != file_sha256(graph):
        return "its bytes do not match the checksum recorded when it was made"
    return None


def int8_model(artifacts: ArtifactSet) -> Path:
    """The int8 inference graph of `artifacts`, quantized on first use and cached next to the
    model (or under the keyboard home when the model directory is read-only). A cached graph
    is used only if its checksum matches; a damaged one is set aside and made again."""
    source = artifacts.inference_model
    source_sha256 = file_sha256(source)
    name = INT8_FILE if int8_variant() == "8-bit" else INT8_7BIT_FILE
    if os.access(artifacts.root, os.W_OK):
        target = artifacts.root / name
    else:
        target = paths.private_dir(paths.home() / "models" / source_sha256[:16]) / name
    if target.is_file():
        problem = _cached_graph_problem(target, source_sha256)
        if problem is None:
            return target
        set_aside(target, problem)
    quantize_model(source, target, set(artifacts.lora_shapes))
    record = {"source_sha256": source_sha256, "sha256": file_sha256(target)}
    write_atomic(_checksum_file(target), lambda f: f.write(json.dumps(record).encode()))
    return target


def read_record(artifacts: ArtifactSet) -> dict[str, Any] | None:
    """The accuracy measurement of fp32 vs int8 stored with the model, if any."""
    path = artifacts.root / RECORD_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    return record if isinstance(record, dict) else None


def int8_by_default(artifacts: ArtifactSet) -> bool:
    """True only if a measurement of this very graph, in the int8 variant this CPU gets, found
    no significant top-3 loss on enough words."""
    try:
        record = read_record(artifacts)
    except ArtifactError as exc:  # a derived file: serving goes on in fp32
        set_aside(artifacts.root / RECORD_FILE, f"{exc}; serving the fp32 graph")
        return False
    if not record or record.get("inference_sha256") != file_sha256(artifacts.inference_model):
        return False
    return record.get("variant") == int8_variant() and bool(record.get("int8_ok"))


def paired_top3_test(fp32_ranks: Sequence[int], int8_ranks: Sequence[int]) -> dict[str, Any]:
    """One-sided exact McNemar test of "int8 has the lower top-3" on the same words.

    Ranks are each word's place among the suggestions at its start (-1: not shown), as
    `wordahead.evaluate.simulate.next_word_ranks` measures them. Only the words one graph gets right
    and the other wrong tell the graphs apart; under "no difference" int8 misses each of those
    with probability 1/2, so p is the chance of at least as many int8-only misses.
    """
    if len(fp32_ranks) != len(int8_ranks):
        raise ValueError("the two graphs must be measured on the same words")
    fp32_hits = [0 <= r < 3 for r in fp32_ranks]
    int8_hits = [0 <= r < 3 for r in int8_ranks]
    lost = sum(a and not b for a, b in zip(fp32_hits, int8_hits, strict=True))
    gained = sum(b and not a for a, b in zip(fp32_hits, int8_hits, strict=True))
    n = lost + gained
    p_loss = sum(math.comb(n, i) for i in range(lost, n + 1)) / 2**n if n else 1.0
    words = len(fp32_ranks)
    return {
        "words": words,
        "fp32_top3": round(sum(fp32_hits) / max(1, words), 6),
        "int8_top3": round(sum(int8_hits) / max(1, words), 6),
        "int8_only_misses": lost,
        "int8_only_hits": gained,
        "p_loss": round(p_loss, 6),
        "significant_loss": p_loss < SIGNIFICANCE,
    }


def write_record(artifacts: ArtifactSet, test: dict[str, Any], **extra: Any) -> dict:
    """Store a paired measurement (`paired_top3_test`) and the decision it implies."""
    record = {
        "inference_sha256": file_sha256(artifacts.inference_model),
        "variant": int8_variant(),
        "test": test,
        "min_words": MIN_WORDS,
        "significance": SIGNIFICANCE,
        "int8_ok": test["words"] >= MIN_WORDS and not test["significant_loss"],
        **extra,
    }
    text = json.dumps(record, indent=2) + "\n"
    write_atomic(artifacts.root / RECORD_FILE, lambda f: f.write(text.encode()))
    return record
