"""Adapter differences between machines: export a version as a diff to a shared base, import one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from wordahead.learn.adapter_store import BASE, AdapterStore, AdapterStoreError, now, version_name
from wordahead.model.artifacts import (
    ArtifactError,
    check_adapter,
    tensors_sha256,
    write_atomic,
    write_npz,
)

DIFF_FORMAT = "keyboard-adapter-diff"
DIFF_HEADER = "__keyboard_diff__"  # npz key of the JSON header (uint8 bytes)


def export_diff(
    store: AdapterStore, version: str, out: str | Path, base_version: str | None = None
) -> dict[str, Any]:
    """Write `store`'s `version` minus `base_version` (default: the model's initial adapter) to `out`
    as an .npz with a JSON header; returns the header. This is what federated learning
    exchanges: small, and meaningful only for the same model (checked on import)."""
    version = version_name(version)
    base = version_name(base_version or BASE)
    if version == BASE:
        raise AdapterStoreError("the base adapter has no difference to export")
    tensors = store.load(version)
    base_tensors = store.load(base)
    diff = {n: tensors[n] - base_tensors[n] for n in tensors}
    meta = store.get(version).metadata
    header = {
        "format": DIFF_FORMAT,
        "format_version": 1,
        "model": store.artifacts.name,
        "model_fingerprint": store.fingerprint,
        "version": version,
        "base": {"version": base, "tensors_sha256": tensors_sha256(base_tensors)},
        "diff_sha256": tensors_sha256(diff),
        "tensors": {n: list(a.shape) for n, a in diff.items()},
        "metrics": meta.get("metrics", {}),
        "exported": now(),
    }
    arrays = dict(diff)
    arrays[DIFF_HEADER] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    write_atomic(Path(out), lambda f: write_npz(f, arrays))
    return header


def import_diff(store: AdapterStore, path: str | Path) -> str:
    """Add the adapter an exported diff describes to `store` as a new (inactive) version.

    Checks the header: same model, tensor names and shapes, the diff's content hash, and a
    base adapter this store has (the initial one, or a version with the same content).
    """
    path = Path(path)
    try:
        with np.load(str(path), allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except Exception as exc:  # noqa: BLE001 - a damaged file raises many types
        raise AdapterStoreError(f"cannot read adapter diff {path}: {exc}") from exc
    if DIFF_HEADER not in arrays:
        raise AdapterStoreError(f"{path} is not a keyboard adapter diff (no header)")
    try:
        header = json.loads(arrays.pop(DIFF_HEADER).astype(np.uint8).tobytes().decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterStoreError(f"{path}: unreadable diff header ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != DIFF_FORMAT:
        raise AdapterStoreError(f"{path} is not a keyboard adapter diff")
    if header.get("format_version") != 1:
        raise AdapterStoreError(
            f"{path}: diff format version {header.get('format_version')} is not supported"
        )
    if header.get("model_fingerprint") != store.fingerprint:
        raise AdapterStoreError(
            f"{path} was exported for model {header.get('model')!r} "
            f"({str(header.get('model_fingerprint'))[:12]}), not this one "
            f"({store.artifacts.name}, {store.fingerprint[:12]})"
        )
    expected = {n: list(s) for n, s in store.artifacts.lora_shapes.items()}
    if header.get("tensors") != expected:
        raise AdapterStoreError(f"{path}: the header's tensors do not match the model")
    try:
        diff = check_adapter(arrays, store.artifacts, f"the diff {path}")
    except ArtifactError as exc:
        raise AdapterStoreError(str(exc)) from exc
    base_sha = (header.get("base") or {}).get("tensors_sha256")
    base = _find_by_content(store, base_sha)
    if base is None:
        raise AdapterStoreError(
            f"{path} is a difference to adapter {header['base'].get('version')} of another "
            "machine, which this store does not have; export it against the base instead"
        )
    if tensors_sha256(diff) != header.get("diff_sha256"):
        raise AdapterStoreError(f"{path}: the diff is damaged (its content hash differs)")
    base_tensors = store.load(base)
    tensors = {n: base_tensors[n] + diff[n] for n in expected}
    meta = {
        "source": "import",
        "imported_from": str(path),
        "origin_version": header.get("version"),
        "parent": base,
        "metrics": header.get("metrics", {}),
    }
    return store.add(tensors, meta)


def _find_by_content(store: AdapterStore, sha: str | None) -> str | None:
    if not sha:
        return None
    if tensors_sha256(store.artifacts.initial_adapter()) == sha:
        return BASE
    for entry in reversed(store.versions()):
        if entry.metadata.get("tensors_sha256") == sha:
            return entry.version
    return None
