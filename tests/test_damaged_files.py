"""Every file keyboard reads can be damaged without stopping it: each loader raises its own
error (never another exception type) and the caller falls back."""

from __future__ import annotations

import json
import os
import random
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.damage import mutate
from wordahead.learn.adapter_store import ACTIVE_FILE, META_FILE, PHRASES_FILE, AdapterStore
from wordahead.model.artifacts import ArtifactError, ArtifactSet, load_adapter
from wordahead.paths import Home
from wordahead.predict.sources.phrase_file import PhraseError
from wordahead.predict.sources.phrases import PhraseModel

MUTATIONS = 600


@pytest.fixture
def home() -> Home:
    return Home.from_env()


@pytest.fixture
def store(tiny_llama: Path, home: Home) -> AdapterStore:
    return AdapterStore.in_home(home, ArtifactSet.open(tiny_llama))


def _shifted(store: AdapterStore, delta: float) -> dict[str, np.ndarray]:
    return {n: v + delta for n, v in store.artifacts.initial_adapter().items()}


def test_corrupt_adapter_fuzz_falls_back_to_the_previous_good_version(
    store: AdapterStore,
) -> None:
    """Failure 1: 43 of 3,000 corruptions raised NotImplementedError, TokenError or
    RuntimeError out of load_adapter, and the daemon could not start."""
    good = store.promote(_shifted(store, 0.01))
    damaged = store.promote(_shifted(store, 0.02))
    path = store.root / damaged / "adapter.npz"
    original, expected = path.read_bytes(), _shifted(store, 0.02)
    rng = random.Random(16)
    served = {good: 0, damaged: 0}
    for _ in range(MUTATIONS):
        path.write_bytes(mutate(original, rng))
        try:
            load_adapter(path, store.artifacts)
        except ArtifactError:
            pass  # the one error type for a damaged adapter
        version, _, meta = store.active()  # never raises; never the base while v0001 is good
        served[version] += 1
        if version == damaged:  # only when the damage left the tensors intact
            tensors = store.load(damaged)
            assert all(np.array_equal(tensors[n], expected[n]) for n in expected)
        else:
            assert "fallback" in meta
    assert served[good] > MUTATIONS * 0.9, served


def test_adapter_header_claiming_huge_arrays_is_refused_before_reading(tmp_path: Path) -> None:
    import io
    import zipfile

    from numpy.lib import format as npy

    header = io.BytesIO()
    npy.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**13,)})
    path = tmp_path / "a.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + b"\0" * 64)
    with pytest.raises(ArtifactError, match="truncated"):
        load_adapter(path)  # without the check: a 40 TB allocation
    np.savez(path, x=np.array(["a", "b"]))
    with pytest.raises(ArtifactError, match="not floats"):
        load_adapter(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"[]",
        b'{"version": 7}',
        b'{"version": "v0002", "previous": "v0001"}',
        b'{"version": "not a version"}',
        b'{"version": "v0002", "previous": [{"x": 1}]}',
        b"[" * 100_000,
        b"\xff\xfe",
    ],
)
def test_damaged_active_pointer_serves_the_newest_good_version(
    store: AdapterStore, content: bytes
) -> None:
    store.promote(_shifted(store, 0.01))
    newest = store.promote(_shifted(store, 0.02))
    (store.root / ACTIVE_FILE).write_bytes(content)
    version, _, _ = store.active()
    assert version == newest


@pytest.mark.parametrize("content", [b"", b"{", b"[1, 2]", b"[" * 100_000, b"\xff"])
def test_damaged_metadata_falls_back_to_the_previous_version(
    store: AdapterStore, content: bytes
) -> None:
    good = store.promote(_shifted(store, 0.01))
    damaged = store.promote(_shifted(store, 0.02))
    (store.root / damaged / META_FILE).write_bytes(content)
    version, _, meta = store.active()
    assert version == good and damaged in meta["fallback"]
    assert any(e.version == damaged and "error" in e.metadata for e in store.versions())


def test_phrase_file_fuzz_raises_only_phrase_errors(tmp_path: Path) -> None:
    model = PhraseModel.from_texts(["see you at dayrit tomorrow", "thank you for your help"] * 5)
    raw = model.to_bytes()
    rng = random.Random(7)
    path = tmp_path / PHRASES_FILE
    for _ in range(MUTATIONS):
        path.write_bytes(mutate(raw, rng))
        try:
            PhraseModel.load(path)
        except PhraseError:
            pass
    bomb = zlib.compress(b"[" * (300 * 2**20), 9)  # deep nesting, and more than the bound
    path.write_bytes(bomb)
    with pytest.raises(PhraseError, match="inflates past"):
        PhraseModel.load(path)
    path.write_bytes(zlib.compress(b"[" * 100_000))
    with pytest.raises(PhraseError):
        PhraseModel.load(path)
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(PhraseError, match="truncated"):
        PhraseModel.load(path)


@pytest.mark.parametrize(
    "content",
    [b"{", b"[]", b'{"at": "25:99"}', b'{"lr": 1e999}', b'{"nope": 1}', b"[" * 100_000],
)
def test_damaged_settings_leave_the_schedule_on_defaults(
    content: bytes, home: Home, caplog: pytest.LogCaptureFixture
) -> None:
    from datetime import datetime, timezone

    from wordahead.learn import schedule
    from wordahead.learn.policy import JobConfig
    from wordahead.types import KeyboardError

    home.job_config.write_bytes(content)
    with pytest.raises(KeyboardError):  # `keyboard train` names the problem
        schedule.parse_at(JobConfig.load(home.job_config).at)
    at = schedule.configured_at(home)  # the daemon's schedule goes on
    assert at == JobConfig.at
    assert schedule.next_run(datetime.now(timezone.utc), at) is not None
    assert "personalize.json" in caplog.text


def test_files_under_the_home_are_private_whatever_the_umask(
    store: AdapterStore, home: Home
) -> None:
    """Failure 5: adapter.npz, meta.json and phrases.zlib were 0644 (0666 under umask 000)."""
    old = os.umask(0)
    try:
        model = PhraseModel.from_texts(["see you at dayrit tomorrow"])
        version = store.promote(_shifted(store, 0.01), {"source": "test"}, model.to_bytes())
        store.use(version)
        store.rollback()
        from wordahead.store.typing_log import TypingLog

        with TypingLog(home.typing_log) as log:
            log.record("hello there", source="test")
    finally:
        os.umask(old)
    found = 0
    for root, dirs, files in os.walk(home.root):
        for d in dirs:
            assert os.stat(Path(root) / d).st_mode & 0o777 == 0o700, Path(root) / d
        for f in files:
            mode = os.stat(Path(root) / f).st_mode & 0o777
            assert mode == 0o600, f"{Path(root) / f} is {mode:o}"
            found += 1
    assert found >= 6  # adapter, meta, phrases, ACTIVE, .lock, database (and its WAL)
    assert json.loads((store.root / version / META_FILE).read_text())["version"] == version
