"""Shared fixtures: tiny models exported once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wordahead.paths import Home

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


MODEL_FIXTURES = frozenset({"tiny_llama", "tiny_gpt2"})  # built with torch, exported with ORT


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `notorch` every test that needs no exported model and is not marked `torch`, so
    `pytest -m notorch` runs the fast, torch-free part of the suite alone."""
    for item in items:
        if MODEL_FIXTURES.isdisjoint(getattr(item, "fixturenames", ())) and (
            item.get_closest_marker("torch") is None
        ):
            item.add_marker(pytest.mark.notorch)


@pytest.fixture(autouse=True)
def _keyboard_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own keyboard home and socket path; nothing touches the real one."""
    home = tmp_path / "kbhome"
    monkeypatch.setenv("KEYBOARD_HOME", str(home))
    monkeypatch.delenv("KEYBOARD_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return home


@pytest.fixture
def home(_keyboard_home: Path) -> Home:
    """This test's keyboard home, as the code takes it."""
    return Home.at(_keyboard_home)


def _export(tmp_path_factory: pytest.TempPathFactory, family: str, layers: str = "all") -> Path:
    from tests.tiny_models import build_model
    from wordahead.model.export import ExportConfig, export_model

    root = tmp_path_factory.mktemp(f"{family}-{layers.replace(':', '')}")
    hf = build_model(family, root / "hf")
    out = root / "artifacts"
    export_model(hf, out, ExportConfig(rank=4, alpha=8, layers=layers, seq_len=16))
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported artifact set of a tiny Llama model (LoRA on all layers)."""
    return _export(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported artifact set of a tiny GPT-2 model (LoRA on all layers)."""
    return _export(tmp_path_factory, "gpt2")
