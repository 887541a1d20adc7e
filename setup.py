"""Builds put the starter model (models/starter) into the package as wordahead/starter_model,
so an installed `keyboard` (a wheel, `pip install .`, pipx) serves it without a checkout.
Everything else about the package is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

STARTER = Path(__file__).resolve().parent / "models" / "starter"
SHIPPED = Path("wordahead") / "starter_model"  # wordahead.paths.SHIPPED_STARTER
# Made on the machine that uses them (the int8 graphs, wordahead/model/quantize.py), or set
# aside there as damaged: never shipped.
DERIVED = shutil.ignore_patterns("inference.int8*", "*.damaged")


class BuildWithStarterModel(build_py):
    """build_py, plus the starter model copied into the built package. An editable install
    serves models/starter from the checkout instead."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            target = Path(self.build_lib) / SHIPPED
            shutil.copytree(STARTER, target, ignore=DERIVED, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithStarterModel})
