"""An exported artifact set on disk: its manifest, tokenizer, LoRA adapter files, baked models."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from wordahead.types import KeyboardError

Adapter = dict[str, np.ndarray]  # LoRA tensor name -> values
log = logging.getLogger(__name__)


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
    def seq_len(self) -> int:
        """The token window the training graphs were made for."""
        return int(self.manifest["training"].get("seq_len", 64))

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


MAX_ADAPTER_BYTES = 1 << 30  # far above any LoRA adapter; a damaged size field never allocates more
MAX_ADAPTER_TENSORS = 10_000


def load_adapter(path: str | Path, artifacts: ArtifactSet | None = None) -> Adapter:
    """Read LoRA tensors from an .npz file; with `artifacts`, check names and shapes match.

    Any damage to the file (zip structure, array headers, data, checksums) is an ArtifactError:
    every header is checked before any data is read, so a corrupt size never allocates memory,
    and no failure of the format escapes as another exception type.
    """
    try:
        tensors = _read_npz(Path(path), artifacts.lora_shapes if artifacts else None)
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile/numpy raise many types on damaged input
        raise ArtifactError(f"cannot read adapter {path}: {type(exc).__name__}: {exc}") from exc
    if artifacts is not None:
        check_adapter(tensors, artifacts, f"adapter {path}")
    return tensors


def check_adapter(
    tensors: dict[str, Any], artifacts: ArtifactSet, what: str = "adapter"
) -> Adapter:
    """`tensors` as float32 LoRA tensors of `artifacts`' model: the same names and shapes, and
    only finite values; else an ArtifactError naming `what`."""
    expected = artifacts.lora_shapes
    if set(tensors) != set(expected):
        raise ArtifactError(
            f"{what} does not fit model {artifacts.root}: "
            f"{len(set(tensors) ^ set(expected))} tensor names differ"
        )
    out = {}
    for name, shape in expected.items():
        value = np.ascontiguousarray(tensors[name], dtype=np.float32)
        if value.shape != shape:
            raise ArtifactError(f"{what}: {name} has shape {value.shape}, not {shape}")
        if not np.isfinite(value).all():
            raise ArtifactError(f"{what}: {name} holds NaN or infinite values")
        out[name] = value
    return out


def _read_npz(path: Path, shapes: dict[str, tuple[int, ...]] | None) -> Adapter:
    """The float arrays of an .npz file, every member's header checked before its data is read."""
    from numpy.lib import format as npy

    size = path.stat().st_size
    if size > MAX_ADAPTER_BYTES:
        raise ArtifactError(f"adapter {path} is {size:,} bytes, too large for an adapter")
    tensors: Adapter = {}
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        if len(members) > MAX_ADAPTER_TENSORS:
            raise ArtifactError(f"adapter {path} has {len(members):,} members")
        for info in members:
            name = info.filename.removesuffix(".npy")
            if name == info.filename or name in tensors:
                raise ArtifactError(f"adapter {path}: unexpected member {info.filename!r}")
            if info.file_size > MAX_ADAPTER_BYTES:
                raise ArtifactError(f"adapter {path}: {name} claims {info.file_size:,} bytes")
            with archive.open(info) as member:
                version = npy.read_magic(member)
                if version == (1, 0):
                    shape, fortran, dtype = npy.read_array_header_1_0(member)
                elif version == (2, 0):
                    shape, fortran, dtype = npy.read_array_header_2_0(member)
                else:
                    raise ArtifactError(f"adapter {path}: {name} has array format {version}")
                if dtype.kind != "f" or dtype.hasobject:
                    raise ArtifactError(f"adapter {path}: {name} holds {dtype}, not floats")
                if shapes is not None and shapes.get(name) != tuple(shape):
                    raise ArtifactError(
                        f"adapter {path}: {name} has shape {tuple(shape)}"
                        + (f", not {shapes[name]}" if name in shapes else " (not in the model)")
                    )
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if nbytes > info.file_size:
                    raise ArtifactError(f"adapter {path}: {name} is truncated")
                data = member.read()  # to the end: zipfile checks the member's CRC-32
            if len(data) != nbytes:
                raise ArtifactError(f"adapter {path}: {name} holds {len(data)} bytes, not {nbytes}")
            array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
            tensors[name] = np.ascontiguousarray(array, dtype=np.float32)
    return tensors


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in blocks (graphs are tens of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensors_sha256(tensors: Mapping[str, np.ndarray]) -> str:
    """A content hash of LoRA tensors (names, shapes and float32 values, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name], dtype=np.float32)
        digest.update(name.encode())
        digest.update(repr(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


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


# A damaged shipped model is the one damage keyboard cannot repair by itself.
DAMAGED_MODEL_ADVICE = (
    "the model's files are damaged: restore them (the shipped starter: `git checkout "
    "models/starter` in the checkout, or reinstall keyboard; another model: `keyboard "
    "export` it again), or point KEYBOARD_MODEL at another model"
)
DAMAGED_SUFFIX = ".damaged"  # a derived file found damaged, kept beside it for a look


def set_aside(path: Path, problem: str) -> None:
    """Log that the derived file (or directory) `path` is damaged and move it to
    `path.damaged` (replacing an older one), so whatever made it makes it again. Where it
    cannot be moved (a read-only model directory) it is only logged, and left unused."""
    aside = path.with_name(path.name + DAMAGED_SUFFIX)
    try:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)
        os.replace(path, aside)
    except OSError as exc:
        log.warning(
            "%s is damaged (%s); not using it (cannot move it aside: %s)",
            path,
            problem,
            exc.strerror,
        )
        return
    log.warning(
        "%s is damaged (%s); moved it to %s and going on without it", path, problem, aside.name
    )


def save_adapter(path: str | Path, tensors: Adapter) -> None:
    """Write LoRA tensors to an .npz file atomically (a crash leaves the old file intact)."""
    write_atomic(Path(path), lambda f: write_npz(f, tensors))


def write_npz(file: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """`arrays` as an .npz archive into `file` (a path or a binary file), one entry each."""
    np.savez(file, **arrays)  # type: ignore[arg-type]  # the stub types ** as allow_pickle


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


@dataclass(frozen=True)
class LoraInputs:
    """How an adapter is fed to a graph whose LoRA tensors are inputs (`adaptable_graph`)."""

    feeds: dict[str, tuple[str, bool]]  # graph input -> (LoRA tensor, fed transposed)
    own: Adapter  # the graph's own LoRA tensors: what serves when no adapter is given

    def values(self, adapter: Adapter | None) -> dict[str, np.ndarray]:
        """The inputs' values for `adapter` (None: the graph's own tensors)."""
        tensors = self.own if adapter is None else adapter
        return {
            name: np.ascontiguousarray(tensors[lora].T if transposed else tensors[lora])
            for name, (lora, transposed) in self.feeds.items()
        }


def adaptable_graph(model_path: str | Path, lora: Iterable[str]) -> tuple[bytes, LoraInputs]:
    """`model_path` serialized with each LoRA tensor named in `lora` turned into a graph
    input, so one session serves every adapter: a swap builds no session (no parsing,
    optimisation or weight packing, and none of the native memory those leave behind).

    The exporter multiplies by `Transpose(tensor)`: such a Transpose goes and its output
    becomes the input, fed the transposed tensor (once per adapter, not at every run).
    """
    import onnx
    from onnx import helper, numpy_helper

    try:
        model = onnx.load(str(model_path))
    except Exception as exc:  # protobuf's DecodeError, OSError: a damaged or missing graph
        raise ArtifactError(f"cannot load {model_path}: {exc}; {DAMAGED_MODEL_ADVICE}") from exc
    graph = model.graph
    names = set(lora)
    inits = {i.name: i for i in graph.initializer if i.name in names}
    if len(inits) != len(names):
        raise ArtifactError(f"{model_path} lacks {len(names) - len(inits)} of the LoRA tensors")
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                readers.setdefault(name, []).append(node)
    feeds: dict[str, tuple[str, bool]] = {}
    own: Adapter = {}
    for name, init in inits.items():
        value = own[name] = numpy_helper.to_array(init).copy()
        nodes = readers.get(name, [])
        node = nodes[0] if len(nodes) == 1 and nodes[0].op_type == "Transpose" else None
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"] if node else []
        if node is not None and value.ndim == 2 and (not perm or perm[0] == [1, 0]):
            graph.node.remove(node)
            fed, transposed = node.output[0], True
        else:
            fed, transposed = name, False
        feeds[fed] = (name, transposed)
        shape = value.shape[::-1] if transposed else value.shape
        graph.initializer.remove(init)
        dtype = helper.np_dtype_to_tensor_dtype(value.dtype)
        graph.input.append(helper.make_tensor_value_info(fed, dtype, list(shape)))
    tree_attention(model)
    return model.SerializeToString(), LoraInputs(feeds, own)


TREE_BIAS = "attention_bias"  # [batch, 1, new, past + new] float, added to attention scores
TREE_OUTPUTS = "logit_positions"  # [positions] int64: the new tokens whose logits come back


def tree_attention(model: Any) -> bool:
    """Let one run score a tree of token sequences on one copy of the context's key/values.

    The exported graph builds a causal mask from `attention_mask` and returns the logits of
    the last position only. Here (in place) the mask becomes the input TREE_BIAS (each new
    token may attend to the past and to its own ancestors among the new tokens: a tree) and
    the last-position slice becomes a gather of the positions in TREE_OUTPUTS, so logits come
    back as [batch, positions, vocab]; what only built the mask goes. The search then scores
    all hypotheses of a depth as one sequence over the context's key/values, instead of a
    batch that copies those key/values once per hypothesis. Returns False, changing nothing,
    for a graph of another shape (it is then served as exported).
    """
    from onnx import TensorProto, helper

    graph = model.graph
    if any(a.type in (a.GRAPH, a.GRAPHS) for node in graph.node for a in node.attribute):
        return False  # subgraphs may read any name: not worth following
    made = {out: node for node in graph.node for out in node.output}
    # The additive mask: the one input that every attention's Add before its Softmax shares.
    shared: set[str] | None = None
    for node in graph.node:
        if node.op_type == "Softmax":
            add = made.get(node.input[0])
            if add is None or add.op_type != "Add":
                return False
            shared = set(add.input) if shared is None else shared & set(add.input)
    if not shared or len(shared) != 1:
        return False
    mask = shared.pop()
    # The logits: Gather(last position) of lm_head(Slice(last position) of the hidden states).
    last = made.get("logits")
    if last is None or last.op_type != "Gather":
        return False
    cut, todo, seen = None, [last.input[0]], set()
    while todo and cut is None:
        node = made.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "Slice":
            cut = node
        todo.extend(node.input)
    if cut is None:
        return False
    for node in graph.node:
        node.input[:] = [TREE_BIAS if name == mask else name for name in node.input]
    nodes = list(graph.node)
    at = nodes.index(cut)
    graph.node.remove(cut)
    gather = helper.make_node("Gather", [cut.input[0], TREE_OUTPUTS], [cut.output[0]], axis=1)
    graph.node.insert(at, gather)
    at = list(graph.node).index(last)
    graph.node.remove(last)
    graph.node.insert(at, helper.make_node("Identity", [last.input[0]], ["logits"]))
    graph.input.append(
        helper.make_tensor_value_info(TREE_BIAS, TensorProto.FLOAT, ["batch", 1, "new", "total"])
    )
    graph.input.append(
        helper.make_tensor_value_info(TREE_OUTPUTS, TensorProto.INT64, ["positions"])
    )
    for out in graph.output:
        if out.name == "logits":
            out.CopyFrom(helper.make_tensor_value_info(
                "logits", out.type.tensor_type.elem_type, ["batch", "positions", "vocab"]
            ))  # fmt: skip
    _drop_dead_nodes(graph)
    return True


def _drop_dead_nodes(graph: Any) -> None:
    """Remove the nodes, initializers and inputs no graph output depends on."""
    needed = {out.name for out in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    for items in (graph.input, graph.initializer):
        for item in [i for i in items if i.name not in needed]:
            items.remove(item)


def bake_inference_model(
    artifacts: ArtifactSet, adapter: Adapter, out: str | Path, source: Path | None = None
) -> Path:
    """Write a standalone inference model with `adapter`'s LoRA tensors in place of the initial ones."""
    data = graph_with_adapter(source or artifacts.inference_model, adapter)
    out = Path(out)
    write_atomic(out, lambda f: f.write(data))
    return out
