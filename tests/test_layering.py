"""The package's layering, read from the source's import statements (ast; nothing is imported):

- the math (decompose, structured, allocation, bayes) works on arrays: numpy, scipy and optuna, the
  error types and each other, no torch and no files of ours;
- a family file (families/) says what a family is, in data and small hooks: the standard library,
  families.base and the error types;
- architectures.py, what import-gguf and inspect read configs with, imports no torch or numpy;
- the stages above (pipeline, cli) are imported by nothing below them, and nothing imports benchmarks
  or tests.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "streamrom"
MATH = ("decompose", "structured", "allocation", "bayes")
THIRD_PARTY_MATH = ("numpy", "scipy", "optuna")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute (relative imports resolved), outside `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return  # names for annotations only: no import at run time
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
                found.update([stem] if node.module else [f"{stem}.{alias.name}" for alias in node.names])
            else:
                found.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)
    visit(tree)
    return found


SOURCES = {module_name(path): imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def ours(names: set[str]) -> set[str]:
    return {name for name in names if name == "streamrom" or name.startswith("streamrom.")}


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_walk_finds_the_package():
    assert "streamrom.pipeline" in SOURCES and "streamrom.families.llama" in SOURCES
    assert "streamrom.planning" in SOURCES["streamrom.pipeline"]  # a relative import, resolved
    assert "streamrom.pipeline" not in SOURCES["streamrom.planning"]  # only under TYPE_CHECKING there


@pytest.mark.parametrize("name", MATH)
def test_the_math_imports_arrays_only(name):
    found = SOURCES[f"streamrom.{name}"]
    allowed = {f"streamrom.{other}" for other in MATH} | {"streamrom.errors"}
    assert ours(found) <= allowed, ours(found) - allowed
    third_party = {top(n) for n in found - ours(found)} - set(sys.stdlib_module_names)
    assert third_party <= set(THIRD_PARTY_MATH), third_party


@pytest.mark.parametrize("name", sorted(n for n in SOURCES if n.startswith("streamrom.families.")))
def test_a_family_file_holds_data_and_small_hooks(name):
    found = SOURCES[name]
    allowed = {"streamrom.errors", "streamrom.families.base"}
    assert ours(found) <= allowed, ours(found) - allowed
    assert {top(n) for n in found - ours(found)} <= set(sys.stdlib_module_names)


def test_reading_a_config_needs_no_torch():
    for name in ("streamrom.architectures", "streamrom.errors", "streamrom.families", "streamrom.families.base"):
        assert not {top(n) for n in SOURCES[name]} & {"torch", "numpy"}, name


def test_the_upper_stages_are_imported_from_above_only():
    above = {"streamrom.pipeline": {"streamrom.cli", "streamrom"}, "streamrom.cli": set()}
    for module, found in SOURCES.items():
        for stage, importers in above.items():
            if stage in found:
                assert module in importers, f"{module} imports {stage}"
        assert not {top(n) for n in found} & {"benchmarks", "tests", "conftest"}, module
