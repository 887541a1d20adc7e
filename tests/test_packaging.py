"""The package installs under a name of its own: `import keyboard` is never this project, the
`keyboard` command is wordahead's, and an installed copy finds the starter model it ships."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import pytest

from wordahead import paths

REPO = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")


def test_import_keyboard_is_not_this_project() -> None:
    spec = importlib.util.find_spec("keyboard")  # None, or the keyboard-hooks project
    if spec is not None:
        origin = Path(spec.origin or next(iter(spec.submodule_search_locations or []), ""))
        assert REPO not in origin.resolve().parents, origin


def test_the_keyboard_command_is_wordaheads() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == "wordahead"
    assert project["scripts"] == {"keyboard": "wordahead.cli:main"}
    installed = importlib.metadata.entry_points(group="console_scripts", name="keyboard")
    assert [(e.value, e.dist.name if e.dist else None) for e in installed] == [
        ("wordahead.cli:main", "wordahead")
    ]


def test_an_installed_package_serves_the_starter_model_it_ships(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkout (or an editable install): models/starter.
    assert paths.starter_model_dir() == REPO / "models" / "starter"
    assert (paths.starter_model_dir() / "manifest.json").is_file()
    # An installed package: the copy setup.py puts inside it, whatever lies beside it.
    package = tmp_path / "site-packages" / "wordahead"
    (package / paths.SHIPPED_STARTER).mkdir(parents=True)
    monkeypatch.setattr(paths, "PACKAGE_DIR", package)
    monkeypatch.delenv("KEYBOARD_MODEL", raising=False)
    assert paths.default_model_dir() == package / paths.SHIPPED_STARTER
    assert f'"{paths.SHIPPED_STARTER}"' in (REPO / "setup.py").read_text()  # where it is put
