"""Self-describing run folders: config.json, env.json, metrics.jsonl, result.json.

Only the main process writes. Sweeps skip runs whose result.json exists and aggregate these files;
nothing ever greps a log.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

RUNS_ROOT_ENV = "GPT_DISTILL_RUNS"
"""Environment variable naming the folder default run folders go in (default ./runs)."""

PACKAGES = ("torch", "accelerate", "tiktoken", "datasets", "safetensors", "tensorboard", "numpy", "tyro")


def runs_root() -> Path:
    return Path(os.environ.get(RUNS_ROOT_ENV, "runs"))


def default_run_dir(stage: str, preset: str, stamp: str | None = None) -> Path:
    stamp = stamp or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return runs_root() / stage / f"{preset}-{stamp}"


def latest_run_dir(stage: str, preset: str, having: str) -> Path | None:
    """The newest runs/<stage>/<preset>-* folder holding `having` (a relative path), or None."""
    root = runs_root() / stage
    if not root.is_dir():
        return None
    found = sorted((p for p in root.glob(f"{preset}-*") if (p / having).exists()), key=lambda p: p.name)
    return found[-1] if found else None


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def git_sha() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str, world_size: int, precision: str) -> dict[str, Any]:
    """env.json: where and with what a run ran. `device` is a description (accel.device_description)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "git_sha": git_sha(),
        "versions": versions,
        "device": device,
        "world_size": world_size,
        "mixed_precision": precision,
        "command": [sys.executable, *sys.argv],
        "host": platform.node(),
        "platform": platform.platform(),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


class RunDir:
    """A run folder; writes happen on the main process only (`main=False` makes every write a no-op)."""

    def __init__(self, path: Path, main: bool = True) -> None:
        self.path = Path(path)
        self.main = main
        if main:
            self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict[str, Any]) -> None:
        if self.main:
            write_json(self.path / "config.json", config)

    def write_env(self, env: dict[str, Any]) -> None:
        if self.main:
            write_json(self.path / "env.json", env)

    def log_metrics(self, record: dict[str, Any]) -> None:
        if self.main:
            with (self.path / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(record, default=float) + "\n")

    def write_result(self, result: dict[str, Any]) -> None:
        if self.main:
            write_json(self.path / "result.json", result)

    def write(self, name: str, data: Any) -> None:
        if self.main:
            write_json(self.path / name, data)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    file = path / "metrics.jsonl" if path.is_dir() else path
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
