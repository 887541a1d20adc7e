"""The server's side of the community adapter: each round's adapter kept as an artifact, and
what an update from a machine may look like before it is summed."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wordahead import paths
from wordahead.learn.adapter_diff import export_diff
from wordahead.learn.adapter_store import AdapterStore
from wordahead.model.artifacts import Adapter, ArtifactSet, write_atomic

LATEST_FILE = "community.npz"  # the newest round's adapter, as `keyboard adapters import` reads it
ROUNDS_FILE = "rounds.jsonl"  # one line per round: clients, bytes, seconds, epsilon (no text)


def resolve_model(value: str = "") -> Path:
    """The model directory a federation runs on: `value`, else KEYBOARD_MODEL or the starter.

    Flower runs the apps from a copy of their Python files (the FAB), which has no models/,
    so the starter model is also looked for in the installed keyboard's source tree."""
    if value:
        return Path(value).expanduser()
    candidate = paths.default_model_dir()
    if (candidate / "manifest.json").is_file() or "KEYBOARD_MODEL" in os.environ:
        return candidate
    from importlib import metadata

    try:
        direct = json.loads(metadata.distribution("wordahead").read_text("direct_url.json") or "{}")
    except (metadata.PackageNotFoundError, ValueError):
        direct = {}
    url = str(direct.get("url", ""))
    if url.startswith("file://"):
        installed = Path(url[len("file://") :]) / "models" / "starter"
        if (installed / "manifest.json").is_file():
            return installed
    return candidate


@dataclass(frozen=True)
class UpdateRules:
    """What a machine's update must be: the adapter's shapes in manifest order, finite, and no
    bigger than the adapter itself (plus framing)."""

    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def for_model(cls, artifacts: ArtifactSet) -> UpdateRules:
        return cls(tuple(artifacts.lora_shapes.values()))

    @property
    def max_bytes(self) -> int:
        # float64 at most, per value, plus one factor array and generous framing per array
        return 8 * (sum(int(np.prod(s)) for s in self.shapes) + 1) + 1024 * (len(self.shapes) + 1)

    def problem(self, arrays: Sequence[np.ndarray], *, leading: int = 0) -> str | None:
        """Why `arrays` is not a valid update (None when it is). `leading` arrays before the
        adapter's (SecAgg+'s weight factor) are checked for shape (1,) only."""
        expected = [(1,)] * leading + list(self.shapes)
        if len(arrays) != len(expected):
            return f"{len(arrays)} arrays, expected {len(expected)}"
        size = sum(int(a.nbytes) for a in arrays)
        if size > self.max_bytes:
            return f"oversized: {size} bytes, at most {self.max_bytes}"
        for i, (array, shape) in enumerate(zip(arrays, expected)):
            if tuple(array.shape) != shape:
                return f"array {i} has shape {tuple(array.shape)}, expected {shape}"
            if array.dtype.kind not in "fiu":
                return f"array {i} has dtype {array.dtype}"
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                return f"array {i} holds NaN or infinite values"
        return None

    def masked_problem(self, arrays: Sequence[np.ndarray], modulus: int) -> str | None:
        """Why a SecAgg+ masked vector is not valid: the factor plus the adapter's shapes, all
        integers in [0, modulus). Its values reveal nothing, but its form must be right."""
        problem = self.problem(arrays, leading=1)
        if problem is not None:
            return problem
        for i, array in enumerate(arrays):
            if array.dtype.kind not in "iu":
                return f"masked array {i} is not integer ({array.dtype})"
            if array.size and (array.min() < 0 or array.max() >= modulus):
                return f"masked array {i} is outside [0, {modulus})"
        return None


class CommunityStore:
    """`<out>/adapters/` (an AdapterStore: one version per round, ACTIVE = the newest),
    `<out>/community-rNNNN.npz` per round and `<out>/community.npz` (adapter diffs against the
    model's initial adapter, which `keyboard adapters import` takes), `<out>/rounds.jsonl`."""

    def __init__(self, out: Path, artifacts: ArtifactSet) -> None:
        self.out = paths.private_dir(Path(out))
        self.artifacts = artifacts
        self.store = AdapterStore(root=self.out / "adapters", artifacts=artifacts)

    def current(self) -> Adapter:
        """The newest community adapter (the model's initial one before the first round)."""
        active = self.store.active()
        return self.store.load("base" if active is None else active[0])

    def rounds(self) -> list[dict[str, Any]]:
        """The records of the rounds kept so far, oldest first (a torn last line is skipped:
        the round it describes did not finish)."""
        try:
            lines = (self.out / ROUNDS_FILE).read_text().splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def publish(self, server_round: int) -> Path:
        """Make round `server_round`'s adapter the one `community.npz` holds (the best round on
        the dev text, when later rounds were worse)."""
        data = (self.out / f"community-r{server_round:04d}.npz").read_bytes()
        write_atomic(self.out / LATEST_FILE, lambda f: f.write(data))
        return self.out / LATEST_FILE

    def save_round(self, server_round: int, tensors: Adapter, record: dict[str, Any]) -> Path:
        """Keep round `server_round`'s adapter; returns the importable file."""
        version = self.store.promote(tensors, {"source": "federation", **record})
        path = self.out / f"community-r{server_round:04d}.npz"
        export_diff(self.store, version, path)
        data = path.read_bytes()
        write_atomic(self.out / LATEST_FILE, lambda f: f.write(data))
        line = json.dumps({"round": server_round, "version": version, **record}) + "\n"
        with open(self.out / ROUNDS_FILE, "a") as f:
            f.write(line)
        return path
