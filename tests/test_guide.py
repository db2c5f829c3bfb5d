"""docs/exercises.md, the exercise guide: every question has a section, and its commands run as written.

Default tier: the guide covers the sheet's 52 questions in order; each section is either marked as an
opinion or gives a command, a place to look and a measured figure with its machine; every recipe
command's flags parse with that recipe's own command line. Slow tier: the commands of the blocks
marked `<!-- cheap -->` run, in order, in a scratch folder.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from pipeline import cli

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "exercises.md"
SHEET = ROOT.parent / "shared" / "seed" / "exercises.md"
QUESTIONS = [f"H{part}.{q}" for part in range(1, 11) for q in range(1, (8 if part == 10 else 6))]
RECIPE = re.compile(r"(?:^|\s)(?:python|accelerate launch(?: --config_file \S+)?) (recipes/\w+\.py)(.*)$")


def sections() -> dict[str, str]:
    """Question id -> its section's text, in the guide's order."""
    parts = re.split(r"^## (H\d+\.\d+)\b.*$", GUIDE.read_text(), flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def blocks(text: str) -> list[tuple[bool, list[str]]]:
    """(marked cheap, commands) of every ```bash block; backslash continuations joined, comments dropped."""
    out = []
    for match in re.finditer(r"(<!-- cheap -->\s*)?```bash\n(.*?)```", text, flags=re.S):
        joined = match.group(2).replace("\\\n", " ")
        commands = [
            line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")
        ]
        out.append((bool(match.group(1)), commands))
    return out


def recipe_commands() -> list[tuple[str, list[str]]]:
    """(recipe path, argv) of every recipe command in the guide."""
    found = []
    for _, commands in blocks(GUIDE.read_text()):
        for command in commands:
            match = RECIPE.search(command)
            if match:
                found.append((match.group(1), shlex.split(match.group(2), comments=True)))
    return found


def load_recipe(path: str):
    """The recipe module (not run: its `if __name__ == "__main__"` stays off), and the config class and
    presets its own `cli.parse(...)` call in that block passes, evaluated in the module."""
    spec = importlib.util.spec_from_file_location(f"guide_recipe_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the recipe is executed
    spec.loader.exec_module(module)
    tree = ast.parse((ROOT / path).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
    call = next(
        n for n in ast.walk(block)
        if isinstance(n, ast.Call) and ast.unparse(n.func) == "cli.parse"
    )  # fmt: skip
    cls, presets = (eval(ast.unparse(arg), vars(module)) for arg in call.args[:2])
    assert cls is typing.get_type_hints(module.main)["cfg"]
    return cls, presets


def test_the_guide_covers_every_question_of_the_sheet_in_order():
    assert "⟨" not in GUIDE.read_text(), "the guide has an unfilled ⟨placeholder⟩"
    found = list(sections())
    assert found == QUESTIONS, (
        f"missing {sorted(set(QUESTIONS) - set(found))}, extra {sorted(set(found) - set(QUESTIONS))}"
    )
    if SHEET.is_file():  # the sheet itself has exactly these questions
        assert re.findall(r"^\*\*(H\d+\.\d+)", SHEET.read_text(), flags=re.M) == QUESTIONS


@pytest.mark.parametrize("question", QUESTIONS)
def test_each_section_is_an_opinion_or_a_command_a_place_to_look_and_a_figure(question):
    text = sections()[question]
    if "**Opinion.**" in text:
        assert len(text.split()) > 40, f"{question}: an opinion section gives its reasoning"
        return
    commands = [c for _, cs in blocks(text) for c in cs]
    assert commands, f"{question}: no command"
    assert "**Look at:**" in text, f"{question}: no TensorBoard tag or file to look at"
    assert "**Measured" in text, f"{question}: no measured figure"
    assert re.search(r"AVX|AMX|EPYC|Xeon|GPU|H200", text), f"{question}: the figure's machine is not named"


def test_every_recipe_command_in_the_guide_parses_with_its_recipe():
    commands = recipe_commands()
    assert len(commands) > 20
    cached = {}
    for path, argv in commands:
        if path not in cached:
            cached[path] = load_recipe(path)
        cls, presets = cached[path]
        try:
            cli.parse(cls, presets, argv, prog=path)
        except SystemExit as err:  # tyro and cli.fail exit 2 on a bad flag, naming it on stderr
            pytest.fail(f"{path} {shlex.join(argv)}: exits {err.code} while parsing its flags")


@pytest.mark.slow
def test_the_cheap_commands_of_the_guide_run_as_written(tmp_path):
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    (tmp_path / "launch").symlink_to(ROOT / "launch")
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for cheap, commands in blocks(GUIDE.read_text()):
        for command in commands if cheap else ():
            done = subprocess.run(
                command,
                shell=True,
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
                executable="/bin/bash",
            )
            assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
