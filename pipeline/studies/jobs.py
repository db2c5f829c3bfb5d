"""Running a study's jobs: each a real recipe run in its own process and run folder, one progress bar over all.

`run_jobs` skips nothing itself (the caller drops jobs whose `result.json` exists), runs the rest
one after another or several at once, and shows one progress bar over all their steps by reading
each run's metrics.jsonl. Stopping the study stops its runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

POLL_S = 0.5


LOG_TAIL_CHARS = 3000


class RunFailed(RuntimeError):
    """A run of the study exited with an error; the message holds the tail of its log."""


@dataclass
class Job:
    """One run: its name, run folder, recipe flags and step budget (for the progress bar)."""

    name: str
    out: Path
    args: list[str]
    total_steps: int

    @property
    def done(self) -> bool:
        return (self.out / "result.json").is_file()


@dataclass
class _Running:
    job: Job
    slot: int
    proc: subprocess.Popen
    log: Any
    log_path: Path


def last_step(run_dir: Path) -> int:
    """The last step metrics.jsonl records (reads only the file's tail), 0 when none."""
    path = run_dir / "metrics.jsonl"
    try:
        with path.open("rb") as fh:
            fh.seek(max(fh.seek(0, os.SEEK_END) - 4096, 0))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        head = line.partition(",")[0]  # '{"step": 40'
        if head.startswith('{"step":'):
            try:
                return int(head.split(":")[1])
            except ValueError:
                continue
    return 0


def run_jobs(
    jobs: Sequence[Job],
    command: Callable[[Job, int], list[str]],
    parallel: int,
    log_dir: Path,
    progress: bool = True,
) -> None:
    """Run `jobs`, at most `parallel` at once; `command(job, slot)` gives the argv of a job in a slot.

    Each run's output goes to log_dir/<name>.log. A failed run stops the study (the others are
    terminated; their resumable states let the next attempt continue) and raises RunFailed.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    queue, running, free = list(jobs), [], list(range(parallel))
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so `finally` stops the runs too
    bar = tqdm(total=sum(j.total_steps for j in jobs), unit="step", desc="study", disable=not progress)
    try:
        while queue or running:
            while queue and free:
                running.append(_start(queue.pop(0), free.pop(0), command, log_dir))
            time.sleep(POLL_S)
            for r in list(running):
                code = r.proc.poll()
                if code is None:
                    continue
                running.remove(r)
                free.append(r.slot)
                r.log.close()
                if code != 0 or not r.job.done:
                    raise RunFailed(_failure(r, code))
                bar.write(f"{r.job.name}: finished ({r.job.out})")
            bar.update(sum(_progress(j) for j in jobs) - bar.n)
    finally:
        for r in running:
            r.proc.terminate()
            r.proc.wait()
            r.log.close()
        bar.close()
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _start(job: Job, slot: int, command: Callable, log_dir: Path) -> _Running:
    argv = command(job, slot)
    log_path = log_dir / f"{job.name}.log"
    log = log_path.open("a")
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"}
    )
    return _Running(job, slot, proc, log, log_path)


def _progress(job: Job) -> int:
    return job.total_steps if job.done else min(last_step(job.out), job.total_steps)


def _failure(r: _Running, code: int) -> str:
    tail = r.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    why = f"exit status {code}" if code else "no result.json"
    return f"run {r.job.name} failed ({why}); full log: {r.log_path}\n...\n{tail}"
