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


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
"""os.O_NOFOLLOW where the platform has it: opening a symbolic link then fails instead of following it."""


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write `text` atomically: a temporary file beside `path`, then a rename over it.

    Neither step follows a symbolic link: the temporary file is created exclusively (a planted
    `.name.tmp-PID` link, or a stale file, is removed and the create retried once), and the rename
    replaces a link at `path` itself, never the file it points to.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = _create_exclusive(tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_exclusive(path: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW
    try:
        return os.open(path, flags, 0o666)
    except FileExistsError:
        # A leftover of a crashed writer with this pid, or a planted link: unlink removes the
        # entry itself (never a link's target). A second collision means someone is racing us.
        path.unlink()
        return os.open(path, flags, 0o666)


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
