"""`python -m wordahead`: the same as the `keyboard` command, from any working directory."""

import os
import sys

if getattr(sys.modules.get("wordahead"), "__file__", None) is None:
    # `-m` puts the working directory first on sys.path, so a folder named wordahead there (the
    # checkout, seen from its parent) was imported as a namespace package in place of the
    # installed one: import the installed package instead.
    cwd = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", ".", cwd)]
    for name in [m for m in sys.modules if m == "wordahead" or m.startswith("wordahead.")]:
        if name != "wordahead.__main__":
            del sys.modules[name]

from wordahead.cli import main  # noqa: E402 - after the path is set right

sys.exit(main())
