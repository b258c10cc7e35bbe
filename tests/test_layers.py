"""Imports point one way (docs/architecture.md#layers): commands -> sweep/engine/analysis -> parts -> nothing.

Every ``import`` statement of the package, at module level or inside a function, is parsed with ``ast``.
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
