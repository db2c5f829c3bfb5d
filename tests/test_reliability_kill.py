"""Fault injection: a tiny pretrain killed with SIGKILL at seeded random moments, mid-checkpoint too, and
resumed with `--train.resume auto` until it finishes, ends bit-identical to an uninterrupted run.

Each session is a real process killed with kill -9 (its whole process group). To fit the default
suite's budget the sessions are forked from a multiprocessing forkserver that has already imported
torch, Accelerate and the pipeline (5 s of each start-up here, 0.3 s left); each then runs
recipes/pretrain.py as `__main__` with its own argv, as `python recipes/pretrain.py` would. `pytest -s`
prints where each kill landed. The resource tracker's "leaked semaphore" warning at exit is the
killed sessions' (tqdm's lock): kill -9 runs no clean-up.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import runpy
import signal
import sys
import time
from pathlib import Path

import torch
from conftest import ROOT, read_jsonl
from safetensors.torch import load_file

from pipeline.run.checkpoint import STATES, latest_state

RECIPE = str(ROOT / "recipes" / "pretrain.py")
STEPS = 12
TRAIN = (
    "--preset", "tiny", "--max-steps", str(STEPS), "--train.eval-interval", "2", "--train.log-interval", "1",
    "--train.precision", "no", "--train.no-progress",
)  # fmt: skip
TIMING = {"elapsed_s", "tokens_per_s", "peak_mem_gib"}  # wall-clock measurements, not results
# Kinds of kill, in order: after a seeded delay; the moment a temporary folder appears: a state's
# (states/.step_N.tmp), the best export's or a state's (.best.tmp-PID), the final export's (.last.tmp-PID);
# or "saved": the moment a new state is renamed into place (before that step's metrics record, once).
PLAN = ("delay", "state", "delay", "saved", "export", "last")
SEED = 1234
# What start-up spends its seconds importing (torch._dynamo: on building the optimizer), and this module.
PRELOAD = [
    "torch._dynamo",
    "accelerate",
    "tyro",
    "torch.utils.tensorboard",
    "teachers",
    "pipeline.eval.probes",
]
PRELOAD += ["pipeline.eval.teacher_forced", "pipeline.train.stage", "pytest", "conftest", __name__]


def _session(args: list[str], log: str, slow_exports: bool = False) -> None:
    """The child: its own process group (killed as a whole), output to `log`, then the recipe.

    slow_exports: an export's weights file is written 0.1 s late (a slow disk), so the kill that
    waits for its temporary folder finds it even on a CPU fast enough to write it between two polls.
    """
    os.setsid()
    if slow_exports:
        from pipeline.run import checkpoint

        write = checkpoint.save_file

        def slow_write(tensors, filename, *args, **kwargs):
            if ".tmp-" in str(filename):
                time.sleep(0.1)
            return write(tensors, filename, *args, **kwargs)

        checkpoint.save_file = slow_write
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    sys.argv = [RECIPE, *args]
    runpy.run_path(RECIPE, run_name="__main__")


def _start(ctx, data: Path, out: Path, log: Path, *extra: str, slow_exports: bool = False):
    proc = ctx.Process(
        target=_session,
        args=([*TRAIN, "--data", str(data), "--out", str(out), *extra], str(log), slow_exports),
    )
    proc.start()
    return proc


def _wait(proc, done, timeout: float = 60.0) -> bool:
    """Poll `done()` every 2 ms while `proc` lives; whether it came true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        if not proc.is_alive():
            return done()
        time.sleep(0.002)
    raise AssertionError(f"timed out after {timeout} s waiting on pid {proc.pid}")


def _logged_steps(run: Path) -> list[int]:
    """Steps in metrics.jsonl, complete lines only (the file may be mid-write)."""
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in text.split("\n")[:-1] if line.strip()]


def _litter(run: Path) -> list[str]:
    """Temporary folders of an interrupted write: .best.tmp-PID, states/.step_N.tmp, .NAME.old-PID."""
    found = [p for root in (run, run / STATES) if root.is_dir() for p in root.iterdir()]
    return sorted(str(p.relative_to(run)) for p in found if p.name.startswith(".") and p.is_dir())


def _saving(run: Path, kind: str, pid: int, after: int) -> bool:
    """Whether the folder that kind `kind` of kill waits for exists (see PLAN); `after`: the resumed step."""
    if kind == "saved":
        return any(int(p.name.removeprefix("step_")) > after for p in (run / STATES).glob("step_*"))
    if kind == "last":
        return (run / f".last.tmp-{pid}").exists()
    return any((run / STATES).glob(".step_*.tmp")) or (
        kind == "export" and (run / f".best.tmp-{pid}").exists()
    )


def _kill(proc) -> None:
    with contextlib.suppress(ProcessLookupError):  # it finished first
        os.killpg(proc.pid, signal.SIGKILL)
    proc.join(30)


def test_kill_9_at_random_moments_resumes_bit_exactly(char_data, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # read when the forkserver imports torch
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    rng = random.Random(SEED)
    ref_dir, run = tmp_path / "straight", tmp_path / "killed"
    reference = _start(ctx, char_data, ref_dir, tmp_path / "straight.log")  # on the other core meanwhile

    landed, resumed_step, expect_resume = [], 0, None
    for n, kind in enumerate([*PLAN, "finish"]):
        log = tmp_path / f"session{n}.log"
        resume = ("--train.resume", "auto") if n else ()
        proc = _start(ctx, char_data, run, log, *resume, slow_exports=kind in ("export", "last"))
        t0 = time.monotonic()
        assert _wait(proc, lambda log=log: log.is_file() and "run folder:" in log.read_text()), (
            log.read_text()
        )
        t1 = time.monotonic()
        text = log.read_text()
        if n:  # the newest intact state at the kill (or none), its litter gone
            assert (f"resumed from {expect_resume}" if expect_resume else "starting fresh") in text, text
            left = [name for name in landed[-1]["litter"] if (run / name).exists()]
            assert not left, f"litter of the killed session not cleaned at restart: {left}"
        if kind == "finish":
            proc.join(120)
            assert proc.exitcode == 0, log.read_text()
            break
        _wait(
            proc, lambda after=resumed_step: any(s > after for s in _logged_steps(run))
        )  # its first own record
        delay = 0.0
        if kind == "delay":
            delay = rng.uniform(0.0, 0.3)  # 0-2 steps on: the kills after it still find evaluations ahead
            time.sleep(delay)
        else:  # the moment a new temporary folder appears (states are saved after step resumed_step + 2)
            _wait(proc, lambda kind=kind, pid=proc.pid, after=resumed_step: _saving(run, kind, pid, after))
        _kill(proc)
        if kind == "delay" and proc.exitcode == 0:  # it finished before its kill
            landed.append({"kind": kind, "delay_s": round(delay, 3), "finished_first": True})
            break
        assert proc.exitcode == -signal.SIGKILL, f"session {n} exited {proc.exitcode} before its kill"
        state = latest_state(run, warn=lambda _: None)
        landed.append(
            {
                "kind": kind,
                "startup_s": round(t1 - t0, 2),
                "killed_after_s": round(time.monotonic() - t1, 2),
                "delay_s": round(delay, 3),
                "last_logged_step": max(_logged_steps(run), default=0),
                "litter": _litter(run),
                "newest_intact_state": state.name if state else None,
            }
        )
        expect_resume = state
        resumed_step = int(state.name.removeprefix("step_")) if state else 0

    reference.join(120)
    assert reference.exitcode == 0, (tmp_path / "straight.log").read_text()
    print("\nkill -9 landed at:")
    for n, where in enumerate(landed):
        print(f"  kill {n + 1}: {where}")
    assert any(where.get("litter") for where in landed), "no kill landed mid-save"
    assert not _litter(run), _litter(run)
    a, b = read_jsonl(ref_dir / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b]
    for export in ("last", "best"):
        wa = load_file(str(ref_dir / export / "model.safetensors"))
        wb = load_file(str(run / export / "model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), export
