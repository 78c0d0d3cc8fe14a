"""The package's layering, read from the source's import statements (ast; nothing is imported).

The subpackages stand in layers, data flowing up: errors and the test faults' seam; linalg (the math on arrays); model (what a
model is); storage (files); report (what a run measured); stream (blocks in turn, tokens, the loss);
compression (the pipeline); gguf (llama.cpp's format, and the correction built on the pipeline); and on
top the command line and the loader. A module imports its own layer and those below, never above.
Besides:

- the math (linalg) works on arrays: numpy, scipy and optuna, the error types and each other, no torch;
- a family file (model/families/) says what a family is, in data and small hooks: the standard
  library, families.base and the error types;
- architectures.py, what import-gguf and inspect read configs with, imports no torch or numpy;
- nothing imports the command line, benchmarks or tests.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "streamrom"
LAYERS = (("errors", "faults"), ("linalg",), ("model",), ("storage",), ("report",), ("stream",), ("compression",),
          ("gguf",))  # low to high
TOP = ("cli", "console", "loading", "")  # "": the package's __init__
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
    assert "streamrom.compression.pipeline" in SOURCES and "streamrom.model.families.llama" in SOURCES
    assert "streamrom.compression.planning" in SOURCES["streamrom.compression.pipeline"]  # a relative import, resolved
    assert "streamrom.compression.pipeline" not in SOURCES["streamrom.compression.planning"]  # only under TYPE_CHECKING there


def layer(name: str) -> int:
    """The layer of module `name` (streamrom.<package>...)."""
    part = name.split(".")[1] if name.count(".") else ""
    found = [index for index, names in enumerate(LAYERS) if part in names]
    return found[0] if found else len(LAYERS) + (part not in TOP)


def test_every_module_has_a_layer():
    assert all(layer(name) <= len(LAYERS) for name in SOURCES), [n for n in SOURCES if layer(n) > len(LAYERS)]


@pytest.mark.parametrize("name", sorted(n for n in SOURCES if layer(n) < len(LAYERS)))
def test_a_module_imports_its_layer_and_those_below(name):
    above = {other for other in ours(SOURCES[name]) if layer(other) > layer(name)}
    assert not above, f"{name} imports {sorted(above)}"


@pytest.mark.parametrize("name", sorted(n for n in SOURCES if n.startswith("streamrom.linalg.")))
def test_the_math_imports_arrays_only(name):
    found = SOURCES[name]
    assert {top(n) for n in ours(found)} <= {"streamrom"}
    assert all(n == "streamrom.errors" or n.startswith("streamrom.linalg") for n in ours(found)), ours(found)
    third_party = {top(n) for n in found - ours(found)} - set(sys.stdlib_module_names)
    assert third_party <= set(THIRD_PARTY_MATH), third_party


@pytest.mark.parametrize("name", sorted(n for n in SOURCES if n.startswith("streamrom.model.families.")))
def test_a_family_file_holds_data_and_small_hooks(name):
    found = SOURCES[name]
    allowed = {"streamrom.errors", "streamrom.model.families.base"}
    assert ours(found) <= allowed, ours(found) - allowed
    assert {top(n) for n in found - ours(found)} <= set(sys.stdlib_module_names)


def test_reading_a_config_needs_no_torch():
    for name in ("streamrom.model.architectures", "streamrom.errors", "streamrom.model.families", "streamrom.model.families.base"):
        assert not {top(n) for n in SOURCES[name]} & {"torch", "numpy"}, name


def test_nothing_imports_the_command_line():
    for module, found in SOURCES.items():
        assert "streamrom.cli" not in found, module
        assert not {top(n) for n in found} & {"benchmarks", "tests", "conftest"}, module


def test_every_folder_of_modules_is_installed():
    """setup.cfg installs the packages find: sees (folders with an __init__.py) and, as data, the listed
    files: a folder of modules that is neither would be missing from a non-editable install."""
    import configparser

    setup = configparser.ConfigParser()
    setup.read(PACKAGE.parent / "setup.cfg")
    assert setup["options"]["packages"].strip() == "find:"
    data = [entry.strip() for entry in setup["options.package_data"]["streamrom"].split(",")]
    for folder in {path.parent for path in PACKAGE.rglob("*.py")}:
        inside = str(folder.relative_to(PACKAGE))
        assert (folder / "__init__.py").is_file() or f"{inside}/*.py" in data, f"{folder} would not be installed"


def test_no_test_file_imports_another():
    """Shared test code lives in helpers.py and conftest.py, not in a test file another one imports."""
    tests = PACKAGE.parent / "tests"
    for path in sorted(tests.glob("*.py")):
        found = {name.split(".")[0] for name in imports(path)}
        assert not {name for name in found if name.startswith("test_")}, f"{path.name} imports {sorted(found)}"
