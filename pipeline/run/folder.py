"""Self-describing run folders: config.json, env.json, metrics.jsonl, result.json.

Only the main process writes. Sweeps skip runs whose result.json exists and aggregate these files;
nothing ever greps a log.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from pipeline.files import write_json

RUNS_ROOT_ENV = "GPT_DISTILL_RUNS"
"""Environment variable naming the folder default run folders go in (default ./runs)."""


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
