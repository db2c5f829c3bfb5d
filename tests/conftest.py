"""Shared fixtures: a synthetic corpus, its char tokenization, and a recipe runner.

Three tiers (STYLE.md): unit tests on tiny models in-process; integration tests that run a recipe
end to end in a subprocess for a few steps; distributed tests with 2 CPU ranks over gloo.
Tests that need Tiny Shakespeare or tiktoken's cached files skip, with the reason, when the offline
copies are absent (see README: Offline use).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

torch.set_num_threads(1)


def corpus_file() -> Path | None:
    """Tiny Shakespeare: $TINYSHAKESPEARE_PATH or ../shared/data/tinyshakespeare.txt."""
    env = os.environ.get("TINYSHAKESPEARE_PATH")
    for candidate in (env, SHARED / "data" / "tinyshakespeare.txt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def tiktoken_available(name: str = "o200k_base") -> bool:
    try:
        import tiktoken

        tiktoken.get_encoding(name)
        return True
    except Exception:
        return False


@pytest.fixture(scope="session", autouse=True)
def _offline_env():
    """Point tiktoken and the corpus at ../shared when the environment does not already."""
    if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken").is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken")
    path = corpus_file()
    if path and "TINYSHAKESPEARE_PATH" not in os.environ:
        os.environ["TINYSHAKESPEARE_PATH"] = str(path)
    yield


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    path = corpus_file()
    if path is None:
        pytest.skip(
            "Tiny Shakespeare is not available offline: set TINYSHAKESPEARE_PATH (README: Offline use)"
        )
    return path


def need_tiktoken(name: str = "o200k_base") -> None:
    if not tiktoken_available(name):
        pytest.skip(f"tiktoken encoding {name} is not cached: set TIKTOKEN_CACHE_DIR (README: Offline use)")


SYNTHETIC_LINES = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "All:\nSpeak, speak.\n",
    "MENENIUS:\nWhy, masters, my good friends, mine honest neighbours,\nWill you undo yourselves?\n",
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n",
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n",
]


def synthetic_text(n_chars: int = 60_000, seed: int = 0) -> str:
    """A deterministic Shakespeare-like corpus of about n_chars characters."""
    import random

    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        line = rng.choice(SYNTHETIC_LINES)
        parts.append(line + "\n")
        size += len(line) + 1
    return "".join(parts)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(synthetic_text())
    return path


@pytest.fixture(scope="session")
def char_data(tiny_corpus, tmp_path_factory) -> Path:
    """The synthetic corpus tokenized with the char encoding."""
    from pipeline.config import TokenizeConfig
    from pipeline.data import tokenize

    out = tmp_path_factory.mktemp("data") / "tiny-char"
    tokenize.tokenize(
        TokenizeConfig(input=str(tiny_corpus), encoding="char", out=str(out)),
        log=lambda _: None,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def tiny_teacher(char_data, tmp_path_factory) -> Path:
    """A `tiny` teacher pretrained for 20 fp32 steps on the synthetic corpus: its `best/` export."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    run_recipe(
        "pretrain",
        "--preset",
        "tiny",
        "--data",
        str(char_data),
        "--out",
        str(out),
        "--max-steps",
        "20",
        "--train.precision",
        "no",
        "--train.no-progress",
    )
    return out / "best"


def run_recipe(
    name: str,
    *args: str,
    cwd: Path | None = None,
    timeout: int = 300,
    launcher: list[str] | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run recipes/<name>.py in a subprocess (optionally under a launcher such as accelerate launch)."""
    cmd = [*(launcher or [sys.executable]), str(ROOT / "recipes" / f"{name}.py"), *args]
    full_env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"} | (env or {})
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def accelerate_launch(config: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "launch" / config),
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
