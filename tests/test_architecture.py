"""Structure rules of the code base: module size, private names, no utils.py, no import cycles.

The layer rules between subpackages are import-linter contracts (pyproject.toml,
`lint-imports` in scripts/test.sh); these are the rules it does not express.
"""

import ast
import pathlib

import grimp
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: where the rules apply (tests may reach into private names)
CHECKED = ("encdec_adapt", "experiments", "scripts")
MAX_LINES = 600


def python_files(*folders: str) -> list[pathlib.Path]:
    return sorted(f for folder in folders for f in (ROOT / folder).rglob("*.py"))


def test_no_module_over_600_lines():
    long = {}
    for path in python_files("encdec_adapt", "experiments"):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            long[str(path.relative_to(ROOT))] = lines
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(path: pathlib.Path) -> list[str]:
    """'file:line: what' of every private name taken from another module: `from m import _x`,
    `import m._x`, and `m._x` where `m` is a name this file imported."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    where = path.relative_to(ROOT)
    found, imported = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                imported.add(alias.asname or alias.name)
                if _private(alias.name) or any(_private(p) for p in (node.module or "").split(".")):
                    found.append(f"{where}:{node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                imported.add(alias.asname or alias.name.split(".")[0])
                if any(_private(p) for p in alias.name.split(".")):
                    found.append(f"{where}:{node.lineno}: import {alias.name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in imported
        ):
            found.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_private_name_imported_across_modules():
    found = [hit for path in python_files(*CHECKED) for hit in private_imports(path)]
    assert not found, "private names used outside their module:\n" + "\n".join(found)


def test_no_utils_module():
    utils = [str(p.relative_to(ROOT)) for p in ROOT.rglob("utils.py") if ".venv" not in p.parts]
    assert not utils, f"name modules by what they hold, not utils.py: {utils}"


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("encdec_adapt")


def test_no_import_cycles(graph):
    """No cycle between the modules (and subpackages) of any package (lazy imports included)."""
    cycles = {}
    for package in sorted({"encdec_adapt"} | graph.modules):
        if graph.find_children(package) and (breakers := graph.nominate_cycle_breakers(package)):
            cycles[package] = sorted(f"{i.importer} -> {i.imported}" for i in breakers)
    assert not cycles, f"import cycles (an import that would break each): {cycles}"
