"""AdapterStore: versions, atomic promotion, rollback, pruning, damage fallback, diff exchange."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wordahead.learn.adapter_diff import export_diff, import_diff
from wordahead.learn.adapter_store import BASE, AdapterStore, AdapterStoreError, tensors_sha256
from wordahead.model.artifacts import ArtifactSet
from wordahead.paths import Home


def _shifted(store: AdapterStore, delta: float) -> dict[str, np.ndarray]:
    return {n: v + delta for n, v in store.artifacts.initial_adapter().items()}


@pytest.fixture
def store(home: Home, tiny_llama: Path) -> AdapterStore:
    return AdapterStore.in_home(home, ArtifactSet.open(tiny_llama))


def test_empty_store_serves_base(store: AdapterStore) -> None:
    assert store.active() is None
    assert store.active_version == BASE
    assert store.versions() == []


def test_default_root_is_per_model_under_the_home(store: AdapterStore, tmp_path: Path) -> None:
    assert store.root.parent == tmp_path / "kbhome" / "adapters"
    assert store.root.name.startswith(store.artifacts.name)
    assert (store.root.stat().st_mode & 0o777) == 0o700


def test_promote_use_rollback(store: AdapterStore) -> None:
    v1 = store.promote(_shifted(store, 0.01), {"metrics": {"after": {"loss": 1.0}}})
    v2 = store.promote(_shifted(store, 0.02), {"steps": 7})
    assert (v1, v2) == ("v0001", "v0002")
    version, path, meta = store.active()
    assert version == v2 and path.name == "adapter.npz"
    assert meta["steps"] == 7 and meta["parent"] == v1
    assert meta["tensors_sha256"] == tensors_sha256(_shifted(store, 0.02))
    assert [e.version for e in store.versions()] == [v1, v2]
    loaded, expected = store.load(v1), _shifted(store, 0.01)
    assert all(np.array_equal(loaded[n], expected[n]) for n in expected)
    assert store.rollback() == v1
    assert store.active()[0] == v1
    assert store.rollback() == BASE
    assert store.active() is None
    assert store.use("2") == v2
    assert store.active()[0] == v2
    assert store.use("base") == BASE and store.active() is None
    # Rollback means back: from the base model there is nothing older (it went forward to v2).
    with pytest.raises(AdapterStoreError, match="nothing older to roll back to"):
        store.rollback()
    assert store.active() is None
    # From v1, with v2 active before it, back is the base model, not v2.
    assert store.use(v2) == v2 and store.use(v1) == v1
    assert store.rollback() == BASE
    with pytest.raises(AdapterStoreError, match="no adapter version v0009"):
        store.use("v0009")
    with pytest.raises(AdapterStoreError, match="not an adapter version"):
        store.use("latest!")


def test_promote_refuses_bad_tensors(store: AdapterStore) -> None:
    bad = _shifted(store, 0.0)
    name = next(iter(bad))
    bad[name] = bad[name] * np.nan
    with pytest.raises(AdapterStoreError, match="NaN"):
        store.promote(bad)
    wrong = _shifted(store, 0.0)
    wrong.pop(name)
    with pytest.raises(AdapterStoreError, match="tensor names differ"):
        store.promote(wrong)
    assert store.versions() == [] and store.active() is None


def test_damaged_active_falls_back_to_previous_good(store: AdapterStore) -> None:
    v1 = store.promote(_shifted(store, 0.01))
    v2 = store.promote(_shifted(store, 0.02))
    (store.root / v2 / "adapter.npz").write_bytes(b"not a zip")
    version, _, meta = store.active()
    assert version == v1
    assert "v0002 is damaged" in meta["fallback"]
    # A flipped value that still parses is caught by the content hash.
    tensors = _shifted(store, 0.03)
    v3 = store.promote(tensors)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    np.savez(store.root / v3 / "adapter.npz", **tensors)
    assert store.active()[0] == v1
    with pytest.raises(AdapterStoreError, match="damaged"):
        store.use(v3)
    # Everything damaged: the base model.
    (store.root / v1 / "meta.json").unlink()
    assert store.active() is None


def test_unreadable_pointer_uses_newest_version(store: AdapterStore) -> None:
    store.promote(_shifted(store, 0.01))
    v2 = store.promote(_shifted(store, 0.02))
    store.use("v0001")
    (store.root / "ACTIVE").write_text("{half")
    assert store.active()[0] == v2


def test_interrupted_write_is_invisible_and_cleaned(store: AdapterStore) -> None:
    v1 = store.promote(_shifted(store, 0.01))
    partial = store.root / ".tmp-v0002-abc"
    partial.mkdir()
    (partial / "adapter.npz").write_bytes(b"half")
    assert [e.version for e in store.versions()] == [v1]
    assert store.active()[0] == v1
    assert store.promote(_shifted(store, 0.02)) == "v0002"
    assert not partial.exists()


def test_prune_keeps_newest_and_active(store: AdapterStore) -> None:
    for i in range(6):
        store.promote(_shifted(store, 0.01 * (i + 1)))
    store.use("v0001")
    removed = store.prune(keep=3)
    assert removed == ["v0002", "v0003"]
    assert [e.version for e in store.versions()] == ["v0001", "v0004", "v0005", "v0006"]
    assert store.promote(_shifted(store, 0.5)) == "v0007"  # numbers are never reused


def test_export_import_roundtrip(store: AdapterStore, tiny_llama: Path, tmp_path: Path) -> None:
    v1 = store.promote(_shifted(store, 0.01), {"metrics": {"after": {"top3": 0.5}}})
    v2 = store.promote(_shifted(store, 0.03))
    full = tmp_path / "v2.npz"
    delta = tmp_path / "v2-v1.npz"
    header = export_diff(store, v2, full)
    assert header["base"]["version"] == BASE and header["model_fingerprint"] == store.fingerprint
    export_diff(store, v2, delta, base_version=v1)
    with np.load(full) as data:
        diff = {k: data[k] for k in data.files if not k.startswith("__")}
    assert all(np.allclose(v, 0.03) for v in diff.values())
    # A fresh store of the same model (another machine) imports the diff against the base.
    other = AdapterStore(tmp_path / "other", ArtifactSet.open(tiny_llama))
    imported = import_diff(other, full)
    assert imported == "v0001" and other.active() is None  # imported, not activated
    assert tensors_sha256(other.load(imported)) == tensors_sha256(store.load(v2))
    assert other.get(imported).metadata["origin_version"] == v2
    # The v1-relative diff needs v1's content, which `other` lacks.
    with pytest.raises(AdapterStoreError, match="does not have"):
        import_diff(other, delta)
    assert import_diff(store, delta) == "v0003"  # the exporting store has v1
    # A damaged or foreign file is refused with a clear message and nothing is added.
    with np.load(full) as data:
        arrays = {k: data[k] for k in data.files}
    name = next(k for k in arrays if not k.startswith("__"))
    arrays[name] = arrays[name] + 1
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(AdapterStoreError, match="damaged"):
        import_diff(other, tmp_path / "bad.npz")
    header = json.loads(arrays["__keyboard_diff__"].tobytes())
    header["model_fingerprint"] = "0" * 64
    arrays["__keyboard_diff__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(tmp_path / "foreign.npz", **arrays)
    with pytest.raises(AdapterStoreError, match="exported for model"):
        import_diff(other, tmp_path / "foreign.npz")
    np.savez(tmp_path / "plain.npz", **_shifted(store, 0.0))
    with pytest.raises(AdapterStoreError, match="not a keyboard adapter diff"):
        import_diff(other, tmp_path / "plain.npz")
    assert [e.version for e in other.versions()] == ["v0001"]


_PROMOTE_FOREVER = """
import sys
import numpy as np
from wordahead.learn.adapter_store import AdapterStore
from wordahead.model.artifacts import ArtifactSet
store = AdapterStore(sys.argv[1], ArtifactSet.open(sys.argv[2]))
initial = store.artifacts.initial_adapter()
print("ready", flush=True)
i = 0
while True:
    i += 1
    store.promote({n: v + 0.001 * i for n, v in initial.items()}, {"i": i})
    store.prune(keep=3)
"""


def test_kill_9_during_promotions_never_breaks_the_active_adapter(
    tiny_llama: Path, tmp_path: Path
) -> None:
    import random
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "store"
    rng = random.Random(0)
    for _ in range(5):
        child = subprocess.Popen(
            [sys.executable, "-c", _PROMOTE_FOREVER, str(root), str(tiny_llama)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait()
        store = AdapterStore(root, ArtifactSet.open(tiny_llama))
        active = store.active()
        assert active is not None and "fallback" not in active[2]
        assert store.load(active[0])  # complete and loadable
        assert all("error" not in e.metadata for e in store.versions())
