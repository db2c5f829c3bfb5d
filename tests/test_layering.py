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
