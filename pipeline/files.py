"""What every stage writes the same way: atomic JSON files, and env.json's provenance (git SHA, versions, host)."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import WriteError, write_failure

PACKAGES = ("torch", "accelerate", "tiktoken", "datasets", "safetensors", "tensorboard", "numpy", "tyro")


ENV_CACHE = "GPT_DISTILL_CACHE"
"""Environment variable naming the project's cache folder (default ~/.cache/gpt-distill): downloads, notes."""


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE, Path.home() / ".cache" / "gpt-distill"))


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
"""os.O_NOFOLLOW where the platform has it: opening a symbolic link then fails instead of following it."""


# How libraries that write without Python's file objects report a failed write: safetensors
# ("... (os error 28)") and torch.save's C++ writer (no errno at all).
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_TORCH_WRITE_FAILED = ("PytorchStreamWriter", "inline_container", "file write failed")


def as_os_error(err: BaseException, path: Path) -> OSError | None:
    """The OSError behind a failed write to `path`, also when a library reported it otherwise.

    torch.save's writer reports a full disk without an errno; it is taken for ENOSPC when the
    disk holding `path` has no free block left (checked before the partial file is removed).
    """
    if isinstance(err, WriteError):
        return err.os_error
    if isinstance(err, OSError):
        return err
    text = str(err)
    found = _RUST_OS_ERROR.search(text)
    if found:
        code = int(found[1])
        return OSError(code, os.strerror(code), str(path))
    if isinstance(err, RuntimeError) and any(mark in text for mark in _TORCH_WRITE_FAILED):
        folder = next((p for p in (path, *path.parents) if p.exists()), None)
        if folder is not None and os.statvfs(folder).f_bavail == 0:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


@contextlib.contextmanager
def writing(path: Path, what: str, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn a failed write in the block into a WriteError naming `what`, `path` and the fix.

    On any failure `cleanup` runs first (it removes the temporary file or folder of the write;
    its own errors are ignored). Failures that are not a full disk, a quota or a permission
    (see errors.WRITE_ERRNOS) propagate unchanged.
    """
    try:
        yield
    except BaseException as err:
        os_error = as_os_error(err, Path(path)) if isinstance(err, Exception) else None
        if cleanup is not None:
            with contextlib.suppress(OSError):
                cleanup()
        failure = None if os_error is None else write_failure(os_error, path, what)
        if failure is None:
            raise
        raise failure from err


def remove_tree(path: Path) -> Callable[[], None]:
    """A `writing` cleanup removing the folder `path` (a write's temporary folder)."""
    return lambda: shutil.rmtree(path, ignore_errors=True)


def write_json(path: Path, data: Any, what: str = "JSON") -> None:
    """Write JSON atomically (temporary file, then rename); a failed write raises a WriteError."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n", what)


def write_text(path: Path, text: str, what: str = "text") -> None:
    """Write `text` atomically: a temporary file beside `path`, then a rename over it.

    Neither step follows a symbolic link: the temporary file is created exclusively (a planted
    `.name.tmp-PID` link, or a stale file, is removed and the create retried once), and the rename
    replaces a link at `path` itself, never the file it points to. A failed write (disk full,
    read-only folder, ...) removes the temporary file, leaves `path` as it was and raises a
    WriteError naming `what`, `path` and the fix.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path, what):
        fd = _create_exclusive(tmp)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
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
