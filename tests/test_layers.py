"""Imports point one way (docs/architecture.md#layers): commands -> sweep/engine/analysis -> parts -> nothing.

Every ``import`` statement of the package, at module level or inside a function, is parsed with ``ast``; no two
modules, and no two packages of ``istr/``, import each other, directly or round a longer loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import REPO

COMMANDS = ("istr.cli", "istr.ablate", "istr.reports", "istr.bench")
EDGES = ("wandb", "optuna")  # only the logging sinks, the sweep harness and analysis talk to them
# (files, as paths relative to the repo root; the module prefixes they must not import)
RULES = [
    (("istr/model", "istr/matcher.py", "istr/losses.py", "istr/codecs", "istr/targets.py", "istr/registry.py"),
     ("istr.engine", "istr.sweep", "istr.config", "analysis", *COMMANDS, *EDGES)),
    (("istr/data",), ("istr.engine", "istr.sweep", "analysis", *COMMANDS, *EDGES)),
    (("istr/config.py",), ("istr.codecs", "istr.losses", "istr.matcher", "istr.model", "istr.engine", "istr.sweep",
                           *EDGES)),
    (("istr/engine",), ("istr.sweep", "analysis", *COMMANDS)),
    (("istr/sweep",), ("analysis", *COMMANDS)),
    (("analysis",), ("istr.sweep", "istr.engine", "istr.model", "istr.data", *COMMANDS)),
    (("istr/results.py", "istr/io.py", "istr/mask_size.py"), ("istr.", "analysis")),
    # leaves that read other leaves only: the axes list and the spec reader, imported by the analysis without torch
    (("istr/axes.py", "istr/spec_file.py"),
     ("istr.config", "istr.model", "istr.matcher", "istr.losses", "istr.codecs", "istr.targets", "istr.data",
      "istr.engine", "istr.sweep", "analysis", "torch", *COMMANDS, *EDGES)),
]


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import``/``from ... import`` in ``path`` names (``from a import b`` gives a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import of {node.module}"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def files(part: str) -> list[Path]:
    path = REPO / part
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def violates(module: str, forbidden: tuple[str, ...]) -> bool:
    return any(module == f or module.startswith(f if f.endswith(".") else f + ".") for f in forbidden)


@pytest.mark.parametrize(("parts", "forbidden"), RULES, ids=[parts[0] for parts, _ in RULES])
def test_imports_point_one_way(parts, forbidden):
    bad = [
        f"{path.relative_to(REPO)} imports {module}"
        for part in parts
        for path in files(part)
        for module in sorted(imported_modules(path))
        if violates(module, forbidden)
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from istr.sweep.spec import load_spec\n    import analysis.tables as t\n")
    modules = imported_modules(source)
    assert violates("istr.sweep.spec.load_spec", ("istr.sweep",)) and {"istr.sweep.spec", "analysis.tables"} <= modules
    assert not violates("istr.sweeper", ("istr.sweep",))


def test_every_rule_names_existing_files():
    assert all((REPO / part).exists() for parts, _ in RULES for part in parts)


def runtime_imports(path: Path) -> set[str]:
    """:func:`imported_modules` less those under ``if TYPE_CHECKING:``, which never run (annotations only)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path) -> str:
    """``istr/codecs/fit.py`` -> ``istr.codecs.fit``; a package's ``__init__.py`` -> the package."""
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def package_of(module: str) -> str:
    """The unit of the package-level graph: ``istr.codecs.fit`` -> ``istr.codecs``; ``istr.targets`` stays."""
    return ".".join(module.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of nodes that reach each other (Tarjan's strongly connected components of two or more)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def import_graph(root: str = "istr") -> dict[str, set[str]]:
    """{module: the modules of ``root`` it imports at run time}, for every module under ``root``."""
    paths = files(root)
    known = {module_name(path) for path in paths}
    return {module_name(path): (runtime_imports(path) & known) - {module_name(path)} for path in paths}


def test_no_import_cycles_between_modules_or_packages():
    graph = import_graph()
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(package_of(module), set()).update(package_of(t) for t in targets)
    packages = {unit: targets - {unit} for unit, targets in packages.items()}
    found = [f"modules {' <-> '.join(c)}" for c in cycles(graph)]
    found += [f"packages {' <-> '.join(c)}" for c in cycles(packages)]
    assert not found, "import cycles (move what one side needs into a leaf module):\n" + "\n".join(found)


def test_the_cycle_checker_finds_loops_and_skips_type_checking_imports(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from istr.bench.compare import Bench\n"
                      "def f():\n    import istr.targets\n")
    assert "istr.bench.compare" not in runtime_imports(source) and "istr.targets" in runtime_imports(source)
    assert package_of("istr.codecs.fit") == "istr.codecs" and package_of("istr.targets") == "istr.targets"
