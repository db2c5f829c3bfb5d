"""Self-describing run folders: config.json, env.json, metrics.jsonl, result.json.

Only the main process writes. Sweeps skip runs whose result.json exists and aggregate these files;
nothing ever greps a log. Nothing is written through a symbolic link: a linked folder, file or
subfolder is refused when the folder is opened, appends open with O_NOFOLLOW, and the atomic
writes (pipeline/files.py) never follow one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError
from pipeline.files import NOFOLLOW, write_json, write_text, writing

METRICS = "metrics.jsonl"
RUN_FILES = ("config.json", "env.json", METRICS, "result.json", "student_init.json", "metrics.json")
"""Files a stage writes at the top of its run folder."""
SUBFOLDERS = ("best", "last", "states", "tb")
"""Subfolders a stage writes into: the exports, the resumable states, TensorBoard events."""

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


LATEST = "latest"
"""<runs root>/latest/<stage>: a symbolic link to the newest finished run of each stage."""


def point_latest(stage: str, run_path: Path) -> Path | None:
    """Point <runs root>/latest/<stage> at `run_path` (a relative link, swapped atomically); the link, or None.

    Only for a run folder inside the runs root (runs/ or $GPT_DISTILL_RUNS): a run written elsewhere
    (a test's temporary folder, --out /tmp/x) leaves the links alone. A real file or folder where the
    link goes is never replaced. Best effort: a link that cannot be made costs the run nothing.
    """
    root = runs_root().resolve()
    target = Path(run_path).resolve()
    if root not in target.parents:
        return None
    link = root / LATEST / stage
    if link.exists() and not link.is_symlink():
        return None
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{stage}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(target, link.parent))
        os.replace(tmp, link)
    except OSError:
        return None
    return link


class RunDir:
    """A run folder; writes happen on the main process only (`main=False` makes every write a no-op).

    Opening it refuses (UsageError, on every rank alike) a folder that is a symbolic link, and
    links among the files and subfolders a run writes, so no write lands outside the folder.
    """

    def __init__(self, path: Path, main: bool = True) -> None:
        self.path = Path(path)
        self.main = main
        refuse_links(self.path)
        if main:
            with writing(self.path, "the run folder"):
                self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict[str, Any]) -> None:
        if self.main:
            write_json(self.path / "config.json", config, "the run config")

    def write_env(self, env: dict[str, Any]) -> None:
        if self.main:
            write_json(self.path / "env.json", env, "the run environment")

    def log_metrics(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        file = self.path / METRICS
        if not NOFOLLOW and file.is_symlink():  # no O_NOFOLLOW here: check first
            raise UsageError(_link_message(file))
        with writing(file, "a metrics record"):
            try:
                fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o666)
            except OSError as err:
                if file.is_symlink():  # ELOOP: a link was planted after the folder was opened
                    raise UsageError(_link_message(file)) from err
                raise
            size = os.fstat(fd).st_size
            try:
                with os.fdopen(fd, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record, default=float) + "\n")
            except OSError:
                # A half-written line would make the whole file unreadable: cut it off again.
                with contextlib.suppress(OSError):
                    os.truncate(file, size)
                raise

    def truncate_metrics(self, step: int) -> None:
        """Keep only the metrics.jsonl records with step <= `step`, rewriting the file atomically.

        Called when resuming from the state saved at `step`: the records an interrupted session
        logged after that state are dropped, since the resumed run logs those steps again, so
        the file holds each step once after any number of resumes.
        """
        file = self.path / METRICS
        if not self.main or not file.is_file() or file.is_symlink():
            return
        lines = [line for line in file.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(kept) < len(lines):
            write_text(file, "".join(line + "\n" for line in kept), "the metrics records")

    def write_result(self, result: dict[str, Any]) -> None:
        if self.main:
            write_json(self.path / "result.json", result, "the run result")

    def write(self, name: str, data: Any) -> None:
        if self.main:
            write_json(self.path / name, data, name)

    @staticmethod
    def holds_run(path: Path) -> bool:
        """Whether `path` holds a real run: a resumable state, an export or a metrics record.

        A folder with only config.json/env.json (a run that failed before its first step) does
        not: the same command may run in it again.
        """
        return holds_run(path)


def holds_run(path: Path) -> bool:
    """See RunDir.holds_run."""
    path = Path(path)
    states = path / "states"
    if states.is_dir() and any((p / "trainer_state.json").is_file() for p in states.glob("step_*")):
        return True
    if any((path / name / "model.safetensors").is_file() for name in ("best", "last")):
        return True
    metrics = path / METRICS  # a planted link is no run of ours (opening the folder refuses it)
    if metrics.is_symlink() or not metrics.is_file():
        return False
    return any(line.strip() for line in metrics.read_text().splitlines())


def refuse_links(path: Path) -> None:
    """UsageError when `path`, a file a run writes in it, or anything under its subfolders is a symbolic link."""
    path = Path(path)
    if path.is_symlink():
        raise UsageError(
            f"run folder {path} is a symbolic link (to {os.readlink(path)}); a run is never written "
            f"through a link: pass the folder itself (--out {path.resolve()}) or another --out"
        )
    if not path.is_dir():
        return
    for name in RUN_FILES:
        if (path / name).is_symlink():
            raise UsageError(_link_message(path / name))
    for name in SUBFOLDERS:
        sub = path / name
        if sub.is_symlink():
            raise UsageError(_link_message(sub))
        for root, dirs, files in os.walk(sub):  # does not descend into linked folders
            for entry in (*dirs, *files):
                if (Path(root) / entry).is_symlink():
                    raise UsageError(_link_message(Path(root) / entry))


def _link_message(file: Path) -> str:
    return (
        f"{file} is a symbolic link (to {os.readlink(file)}); a run never writes through a link: "
        f"remove the link (rm {file}) or choose another --out"
    )


def read_metrics(path: Path) -> list[dict[str, Any]]:
    file = path / METRICS if path.is_dir() else path
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
