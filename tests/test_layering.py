"""The house rules that keep the code simple (STYLE.md): one-way dependencies, one device module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("pipeline", "teachers", "students", "recipes")
# Who may import whom: pipeline <- teachers, students <- recipes; nothing imports recipes or launch.
ALLOWED = {
    "pipeline": {"pipeline"},
    "teachers": {"pipeline", "teachers"},
    "students": {"pipeline", "teachers", "students"},
    "recipes": {"pipeline", "teachers", "students"},
}


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & {*PACKAGES, "launch"}


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package):
    for path in python_files(package):
        bad = imported_packages(path) - ALLOWED[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def pipeline_imports(path: Path) -> set[str]:
    """Every pipeline module `path` imports, anywhere in the file (functions, TYPE_CHECKING blocks too)."""
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pipeline.x import y` may name a module y or a name in x: count the module if it exists
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _is_module(candidate) else base)
    return {name for name in found if name == "pipeline" or name.startswith("pipeline.")}


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer_of(module: str) -> int:
    from pipeline import LAYERS

    parts = module.split(".")
    if len(parts) < 2:
        return -1  # the package itself: its docstring and LAYERS
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module} belongs to no layer of pipeline.LAYERS: add it there")


def test_pipeline_layers_point_one_way():
    """Inside pipeline/, a module imports only from its own layer or the ones before it."""
    bad = []
    for path in python_files("pipeline"):
        own = _module_name(path)
        for imported in pipeline_imports(path):
            if layer_of(imported) > layer_of(own):
                bad.append(f"{own} imports {imported}")
    assert not bad, "imports against pipeline.LAYERS:\n" + "\n".join(sorted(bad))


def test_every_pipeline_module_has_a_layer_and_a_docstring():
    from pipeline import LAYERS

    named = {name for names in LAYERS for name in names}
    top = {p.stem if p.suffix == ".py" else p.name for p in (ROOT / "pipeline").iterdir()}
    top -= {"__init__", "__pycache__"}
    assert top == named, (
        f"pipeline/ holds {sorted(top - named)} outside LAYERS, LAYERS names {sorted(named - top)}"
    )
    for path in python_files("pipeline"):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert doc.strip(), f"{path.relative_to(ROOT)} has no docstring"


def test_no_import_cycles_between_pipeline_modules():
    graph = {_module_name(p): pipeline_imports(p) - {_module_name(p)} for p in python_files("pipeline")}
    # A module's package __init__ runs before it; packages here hold only docstrings, so edges to them are not cycles.
    graph = {
        m: {d for d in deps if d in graph and not (ROOT / d.replace(".", "/") / "__init__.py").is_file()}
        for m, deps in graph.items()
    }
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycle = [*trail[trail.index(dep) :], dep] if dep in trail else [module, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_tests_do_not_import_recipes():
    for path in sorted((ROOT / "tests").glob("*.py")):
        assert "recipes" not in imported_packages(path), path.name


DEVICE_WORDS = re.compile(r"""["'](cuda|xpu|nccl|gloo)(:\d+)?["']|torch\.(cuda|xpu)\b|torch\.distributed""")


def test_only_accel_knows_devices_and_processes():
    for package in ("pipeline", "teachers", "students", "recipes"):
        for path in python_files(package):
            if path.name == "accel.py":
                continue
            hits = [line.strip() for line in path.read_text().splitlines() if DEVICE_WORDS.search(line)]
            assert not hits, f"{path.relative_to(ROOT)} mentions devices or process groups: {hits}"


def test_every_recipe_has_a_docstring_with_commands_and_fixes_its_path():
    for path in python_files("recipes"):
        source = path.read_text()
        doc = ast.get_docstring(ast.parse(source)) or ""
        assert "python recipes/" in doc or "accelerate launch recipes/" in doc, path.name
        assert "sys.path = [p for p in sys.path" in source, f"{path.name} lacks the sys.path prelude"
        assert len(source.splitlines()) < 450, f"{path.name} has grown past a readable recipe"
