"""Shared fixtures: a synthetic corpus, its char tokenization, and a recipe runner.

Three tiers (STYLE.md): unit tests on tiny models in-process; integration tests that run a recipe
end to end in a subprocess for a few steps; distributed tests with 2 CPU ranks over gloo.
Tests that need Tiny Shakespeare or tiktoken's cached files skip, with the reason, when the offline
copies are absent (see README: Offline use).
"""

from __future__ import annotations

import contextlib
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


@pytest.fixture(scope="module")
def recipe():
    """recipes/benchmark.py as a module (recipes/ is not a package; its `__main__` block stays off)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "benchmark_recipe_under_test", ROOT / "recipes" / "benchmark.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is executed
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def run_recipe(
    name: str,
    *args: str,
    cwd: Path | None = None,
    timeout: int = 300,
    launcher: list[str] | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run recipes/<name>.py as its own process (optionally under a launcher such as accelerate launch).

    Without a launcher the process is forked from a server that has imported torch, Accelerate and
    the pipeline once (see `_forked_recipe`): the same program, argv, environment, working folder,
    exit status and output as `python recipes/<name>.py`, without ~4 s of imports per run.
    GPT_DISTILL_TEST_SUBPROCESS=1 runs every recipe with subprocess instead.
    """
    cmd = [*(launcher or [sys.executable]), str(ROOT / "recipes" / f"{name}.py"), *args]
    full_env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"} | (env or {})
    if launcher or os.environ.get("GPT_DISTILL_TEST_SUBPROCESS") == "1":
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    else:
        proc = _forked_recipe(cmd, cwd, timeout, full_env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


# What a recipe's start-up spends its seconds importing: loaded once by the fork server.
_PRELOAD = ["torch", "torch._dynamo", "accelerate", "tyro", "torch.utils.tensorboard", "teachers", "students"]
_PRELOAD += ["pipeline.train.stage", "pipeline.eval.probes", "pipeline.distill.objective", "conftest"]


def _recipe_child(cmd: list[str], cwd: str | None, env: dict[str, str], out: str, err: str) -> None:
    """In the forked child: become `python recipes/<name>.py ARGS` in `cwd` with `env`, output to files."""
    import runpy

    os.setsid()  # its own process group, like a fresh process (and killable as one)
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    sys.argv = cmd[1:]
    runpy.run_path(cmd[1], run_name="__main__")


def _forked_recipe(cmd: list[str], cwd: Path | None, timeout: int, env: dict[str, str]):
    import multiprocessing
    import signal
    import tempfile

    ctx = multiprocessing.get_context("forkserver")
    if not getattr(_forked_recipe, "preloaded", False):
        ctx.set_forkserver_preload(_PRELOAD)
        _forked_recipe.preloaded = True
    with tempfile.TemporaryDirectory() as tmp:
        out, err = f"{tmp}/stdout", f"{tmp}/stderr"
        child = ctx.Process(
            target=_recipe_child, args=(cmd, None if cwd is None else str(cwd), env, out, err)
        )
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.join()
            raise subprocess.TimeoutExpired(cmd, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # anything the recipe left running in its group
        stdout, stderr = Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace")
    return subprocess.CompletedProcess(cmd, child.exitcode, stdout, stderr)


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


def trained_looking(cfg, seed: int = 0):
    """A frozen GPT whose every weight, biases and norms included, is far from its initialisation."""
    from pipeline.distill.teacher import freeze
    from pipeline.model.gpt import GPT

    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return freeze(model)
