"""What every stage writes the same way: atomic JSON files, and env.json's provenance (git SHA, versions, host)."""

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

PACKAGES = ("torch", "accelerate", "tiktoken", "datasets", "safetensors", "tensorboard", "numpy", "tyro")


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
