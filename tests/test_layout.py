"""The package's layout holds what the README promises: small modules and classes, a short top
level, one folder per part with its job in one line, and imports that go one way only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "wordahead"
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300
MAX_TOP_LEVEL_MODULES = 6  # besides the subpackages; __init__ and __main__ count

# The top level (types, paths, memory, the package's own __init__) is shared by every part and
# imports no part. Each part may import only the parts named here (the README's tree, in order).
LOWER = ("model", "predict", "store", "learn", "evaluate", "daemon", "editors", "install")
MAY_IMPORT: dict[str, set[str]] = {
    "model": set(),
    "predict": {"model"},
    "store": {"model", "predict"},
    "learn": {"model", "predict", "store"},
    "evaluate": {"model", "predict", "store", "learn"},
    "daemon": {"model", "predict", "store", "learn"},
    "editors": {"model", "predict", "store", "daemon"},
    "install": {"model", "predict", "store", "learn", "daemon"},
    "federated": {"model", "predict", "store", "learn", "install"},
    "cli": {*LOWER, "federated"},
}
# Single modules a lower part may import from a higher one, and what they may import in turn:
# the nightly job's gate scores with the simulated typist, which needs only predict/.
EXCEPTIONS: dict[str, tuple[set[str], set[str]]] = {
    "wordahead.evaluate.simulate": ({"learn"}, {"predict"}),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(module: str, path: Path) -> set[str]:
    """The package's modules `module` imports anywhere in it: at the top, inside functions,
    under TYPE_CHECKING. `from a import b` counts as importing a.b when that is a module."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


IMPORTS = {module: _imports(module, path) for module, path in MODULES.items()}


def _part(module: str) -> str | None:
    """The subpackage a module belongs to (None: the top level)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else None


def test_no_module_or_class_is_too_long() -> None:
    long_modules, long_classes = [], []
    for module, path in MODULES.items():
        text = path.read_text()
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            long_modules.append(f"{module}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    long_classes.append(f"{module}.{node.name}: {size} lines")
    assert not long_modules, f"over {MAX_MODULE_LINES} lines: {long_modules}"
    assert not long_classes, f"classes over {MAX_CLASS_LINES} lines: {long_classes}"


def test_the_top_level_is_short_and_each_folder_says_its_job() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    folders = [p for p in PACKAGE.rglob("*") if p.is_dir() and (p / "__init__.py").is_file()]
    assert folders
    for folder in folders:
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc and "\n" not in doc.strip(), f"{folder}/__init__.py: one line saying its job"
    for folder in PACKAGE.rglob("*"):  # a folder of modules without __init__ is no part
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py")):
            assert (folder / "__init__.py").is_file(), folder


def test_every_part_is_in_the_layering() -> None:
    parts = {_part(m) for m in MODULES} - {None}
    assert parts == set(MAY_IMPORT), "name each subpackage's place in MAY_IMPORT"


def test_imports_go_one_way() -> None:
    wrong = []
    for module, imported in IMPORTS.items():
        part = _part(module)
        for target in imported:
            to = _part(target)
            if to is None or to == part:
                if part is None and to is not None:
                    wrong.append(f"{module} -> {target} (the top level imports no part)")
                continue
            if part is None:
                if module != "wordahead.__main__":  # `python -m wordahead` runs the cli
                    wrong.append(f"{module} -> {target} (the top level imports no part)")
                continue
            if to in MAY_IMPORT[part]:
                continue
            if target in EXCEPTIONS and part in EXCEPTIONS[target][0]:
                continue
            wrong.append(f"{module} -> {target}")
    for module, (_, allowed) in EXCEPTIONS.items():
        for target in IMPORTS[module]:
            if _part(target) not in {None, _part(module), *allowed}:
                wrong.append(f"{module} -> {target} (imported from below: {sorted(allowed)} only)")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    """Between modules, counting imports inside functions: a cycle means the two modules are
    one part that should be one module, or one of them belongs elsewhere."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in IMPORTS[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in IMPORTS:
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_see_what_they_check() -> None:
    """The parser finds imports at the top, inside functions and under TYPE_CHECKING."""
    assert "wordahead.learn.personalize" in IMPORTS["wordahead.evaluate.harness"]  # in a function
    assert "wordahead.evaluate.simulate" in IMPORTS["wordahead.learn.gate"]
    assert "wordahead.daemon.methods" in IMPORTS["wordahead.daemon.server"]  # TYPE_CHECKING
    assert _part("wordahead.types") is None and _part("wordahead.daemon.server") == "daemon"
