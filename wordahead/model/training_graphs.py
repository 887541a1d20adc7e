"""ORT training artifacts that train a chosen subset of the LoRA groups, made on the device.

An artifact set ships one forward graph, `training/loss_model.onnx`: (input_ids,
attention_mask, labels) -> loss, with every base weight and every LoRA tensor a named
initializer. `onnxruntime.training.artifacts.generate_artifacts` turns it into the training,
eval and optimizer graphs and a checkpoint for any subset of the LoRA tensors: those become
trainable, everything else (the base weights, the LoRA tensors of groups left out) frozen. The
result is cached per subset, so only the first job on a subset pays for it (seconds), and the
model directory stays one copy of the weights smaller than shipping the graphs for every subset.

Artifact sets exported before the groups existed ship the generated graphs of their one
subset (every LoRA tensor) instead; `training_files` serves those as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from wordahead.model.artifacts import file_sha256, set_aside, write_atomic
from wordahead.types import KeyboardError

if TYPE_CHECKING:
    import onnx

    from wordahead.model.artifacts import ArtifactSet

GRAPH_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
CHECKSUM_FILE = "sha256.json"  # the digests of GRAPH_FILES, written once they are complete
MAX_IR_VERSION = 10  # ORT training 1.19.2 reads IR version 10 at most


class GroupError(KeyboardError):
    """An unknown adapter group, or groups the artifact set cannot train."""


def add_layernorm_stat_outputs(model: onnx.ModelProto) -> None:
    """ORT's LayerNormalization gradient needs the optional Mean/InvStdDev outputs."""
    for i, node in enumerate(model.graph.node):
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([f"layernorm_{i}_mean", f"layernorm_{i}_inv_std_dev"])


def generate(
    loss_model: onnx.ModelProto, requires_grad: list[str], frozen: list[str], out: Path
) -> None:
    """The training/eval/optimizer graphs and checkpoint of `loss_model` into `out`, with
    only `requires_grad` trainable (AdamW)."""
    import onnx

    from wordahead.model import runtime

    ort = runtime.onnxruntime()
    from onnxruntime.training import artifacts

    ort.set_default_logger_severity(3)  # the import turned the logger verbose

    out.mkdir(parents=True, exist_ok=True)
    artifacts.generate_artifacts(
        loss_model,
        requires_grad=requires_grad,
        frozen_params=frozen,
        loss=None,  # the graph's output already is the loss
        optimizer=artifacts.OptimType.AdamW,
        artifact_directory=str(out),
    )
    for name in GRAPH_FILES[:3]:
        path = out / name
        graph = onnx.load(str(path))
        graph.ir_version = min(graph.ir_version, MAX_IR_VERSION)
        onnx.save(graph, str(path))


def groups_of(artifacts: ArtifactSet) -> dict[str, list[str]]:
    """Group name -> its LoRA tensor names (a set exported before groups: one, "attention")."""
    groups = artifacts.manifest["lora"].get("groups")
    if groups:
        return {g: list(names) for g, names in groups.items()}
    return {"attention": list(artifacts.lora_shapes)}


def default_groups(artifacts: ArtifactSet) -> list[str]:
    """The groups the nightly job trains unless told otherwise (chosen per model, measured:
    benchmarks/adapter_groups.py); every group where the manifest does not say."""
    chosen = artifacts.manifest["lora"].get("train_groups")
    return list(chosen) if chosen else list(groups_of(artifacts))


def parse_groups(artifacts: ArtifactSet, spec: str | list[str] | None) -> list[str]:
    """`spec` ("attention,mlp", a list, or None/"" for the default) as known group names,
    in the manifest's order."""
    known = groups_of(artifacts)
    if spec is None or spec == "" or spec == []:
        wanted = default_groups(artifacts)
    elif isinstance(spec, str):
        wanted = [g.strip() for g in spec.split(",") if g.strip()]
    else:
        wanted = list(spec)
    if unknown := [g for g in wanted if g not in known]:
        raise GroupError(
            f"unknown adapter group(s) {', '.join(unknown)}; {artifacts.root} has "
            f"{', '.join(known)}"
        )
    if not wanted:
        raise GroupError("no adapter group to train")
    return [g for g in known if g in wanted]


def training_files(artifacts: ArtifactSet, groups: list[str], cache_dir: Path) -> Path:
    """The directory holding GRAPH_FILES that train the LoRA tensors of `groups` (as
    `parse_groups` returns them): made from the loss graph and cached in `cache_dir` (in the
    keyboard home: private to the user), or the shipped graphs of a set exported before
    groups."""
    loss_file = artifacts.manifest["training"].get("loss_model")
    if not loss_file:  # one group, all of its tensors: the shipped graphs train exactly that
        return artifacts.training_dir
    members = groups_of(artifacts)
    requires_grad = [n for g in groups for n in members[g]]
    loss_path = artifacts.root / loss_file
    key = hashlib.sha256(
        json.dumps([_file_key(loss_path), sorted(requires_grad)], separators=(",", ":")).encode()
    ).hexdigest()[:16]
    root = cache_dir
    out = root / f"{'+'.join(groups)}-{key}"
    if out.exists():
        problem = _cache_problem(out)
        if problem is None:
            return out
        set_aside(out, f"{problem}; making the training graphs again")
    parameters = artifacts.manifest["training"]["parameters"]
    frozen = sorted(set(parameters) - set(requires_grad))
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
    try:
        # In a child process: building the gradient graph takes more memory than the job
        # itself (about 350 MB for the starter), and the job's peak RSS is what the laptop feels.
        spec = {"loss_model": str(loss_path), "requires_grad": requires_grad, "frozen": frozen}
        done = subprocess.run(
            [sys.executable, "-m", "wordahead.model.training_graphs", str(staging)],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            tail = (done.stderr or "").strip().splitlines()[-3:]
            raise GroupError(f"cannot make the training graphs for {'+'.join(groups)}: {tail}")
        digests = {name: file_sha256(staging / name) for name in GRAPH_FILES}
        text = json.dumps(digests)
        write_atomic(staging / CHECKSUM_FILE, lambda f: f.write(text.encode()))
        if out.exists():  # another job made it meanwhile, or a damaged earlier attempt
            shutil.rmtree(out, ignore_errors=True)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _cache_problem(out: Path) -> str | None:
    """Why the cached graphs in `out` may not be used (None: every file matches the digest
    recorded when they were made)."""
    try:
        expected = json.loads((out / CHECKSUM_FILE).read_text())
    except FileNotFoundError:
        return "no checksum recorded with them"
    except (OSError, ValueError, RecursionError) as exc:
        return f"their checksum cannot be read: {exc}"
    if not isinstance(expected, dict):
        return "their checksum cannot be read"
    for name in GRAPH_FILES:
        try:
            if file_sha256(out / name) != expected.get(name):
                return f"{name} does not match the checksum recorded when it was made"
        except OSError as exc:
            return f"{name} cannot be read: {exc.strerror}"
    return None


def main(argv: list[str] | None = None) -> int:
    """`python -m wordahead.model.training_graphs OUT` with {loss_model, requires_grad, frozen} as
    JSON on stdin: what `training_files` runs in its child process."""
    import onnx

    os.umask(0o077)  # the graphs are private from their first byte, like the rest of the home
    out = Path((argv if argv is not None else sys.argv[1:])[0])
    spec = json.loads(sys.stdin.read())
    model = onnx.load(spec["loss_model"])
    frozen = set(spec["frozen"]) & {i.name for i in model.graph.initializer}
    generate(model, spec["requires_grad"], sorted(frozen), out)
    return 0


def _file_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


if __name__ == "__main__":
    sys.exit(main())
