"""Reliability of training: the non-finite policy (--train.nonfinite), refused non-finite settings, and a
stalled rank that fails the job with a message naming the rank instead of hanging it (2 CPU ranks)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, accelerate_launch

from pipeline import accel, cli
from pipeline.config import ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from pipeline.errors import ConfigError
from pipeline.model.gpt import GPT
from pipeline.run.folder import RunDir
from pipeline.train.batching import plan_batches
from pipeline.train.loop import Loop, TrainState, _advice, defers_check, fit
from pipeline.train.losses import CrossEntropyHead
from pipeline.train.optim import build_optimizer, lr_at
from teachers import PRESETS

# --------------------------------------------------------------------------------------------------
# Settings that can only end in non-finite values are refused up front
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lr", "min_lr", "eps", "grad_clip"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_a_non_finite_optimizer_setting_is_refused_naming_the_flag(name, value):
    with pytest.raises(ConfigError, match=f"--optim.{name.replace('_', '-')}"):
        OptimConfig(**{name: value})


def test_lr_inf_on_the_command_line_is_an_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse(PretrainConfig, PRESETS, ["--preset", "tiny", "--optim.lr", "inf"])
    assert exit_.value.code == 2
    assert "--optim.lr" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field", [{"dist_timeout": 0.0}, {"dist_timeout": math.inf}, {"max_skipped_steps": 0}]
)
def test_train_reliability_settings_are_checked(field):
    with pytest.raises(ConfigError, match=next(iter(field))):
        TrainConfig(max_steps=1, **field)


def test_a_failed_run_prints_error_and_exits_1(capsys):
    def main(_cfg):
        raise FloatingPointError("step 3: non-finite gradient norm")

    with pytest.raises(SystemExit) as exit_:
        cli.run(main, None)
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip() == "error: step 3: non-finite gradient norm"


# --------------------------------------------------------------------------------------------------
# The non-finite policy, on a tiny model through the real loop
# --------------------------------------------------------------------------------------------------


class _Report:
    """The Reporter's interface without TensorBoard: messages kept, records dropped."""

    def __init__(self, path: Path) -> None:
        self.run = RunDir(path)
        self.messages: list[str] = []

    def print(self, message: str) -> None:
        self.messages.append(message)

    def progress(self, step: int, **postfix) -> None:
        pass

    def scalars(self, step: int, values: dict, record: bool = True) -> None:
        pass

    def histograms(self, model, step: int) -> None:
        pass

    def markdown(self, tag: str, text: str, step: int = 0) -> None:
        pass


@pytest.fixture(params=[False, True], ids=["host-check", "fused-deferred"])
def fused(request) -> bool:
    """Both non-finite paths: the host check per step (for-loop AdamW) and the fused one judged at log steps."""
    return request.param


def _train(
    tmp_path: Path,
    bad_steps: set[int],
    *,
    fused: bool = False,
    break_weights_at: int = -1,
    steps: int = 8,
    eval_fn=None,
    saved: list | None = None,
    **train,
):
    """Train a tiny GPT for `steps`; at each of `bad_steps` the FFN's gradient is made infinite.

    `fused`: torch's fused AdamW, whose non-finite steps are skipped on the device and judged at the
    next log step (log_interval 2 here), so every step number below is reported late but by number.
    """
    torch.manual_seed(0)
    cfg = TrainConfig(
        **{"max_steps": steps, "micro_batch_size": 2, "log_interval": 2, "eval_interval": 100} | train
    )
    optim = OptimConfig(lr=1e-2, warmup_steps=0)
    acc = Accelerator(cpu=True)
    model = GPT(ModelConfig(n_layers=1, n_heads=2, d_model=16, max_seq_len=8, vocab_size=11))
    model, optimizer = acc.prepare(model, build_optimizer(model, optim, fused=fused))
    assert defers_check(acc, optimizer) == fused  # the path under test is the one taken
    state = TrainState()

    def batch_fn(step, micro_step):
        g = torch.Generator().manual_seed(step)
        return torch.randint(0, 11, (2, 8), generator=g), torch.randint(0, 11, (2, 8), generator=g)

    def loss_fn(model, batch):
        x, y = batch
        ffn = next(p for n, p in model.named_parameters() if GPT.param_group(n) == "ffn")
        if state.step == break_weights_at:
            with torch.no_grad():
                ffn.view(-1)[0] = math.nan  # as if the previous update had overflowed
        loss = model(x, head_fn=CrossEntropyHead(y))
        if state.step in bad_steps:
            loss = loss + ffn.square().sum() * math.inf  # an infinite gradient in the FFN group only
        return loss, {}

    report = _Report(tmp_path)
    loop = Loop(
        acc,
        model,
        optimizer,
        cfg,
        optim,
        plan_batches(cfg, 8, 1, 10_000),
        batch_fn,
        loss_fn,
        eval_fn=(lambda: eval_fn(model)) if eval_fn else (lambda: {"val_loss": 1.0}),
        checkpoint_fn=lambda state, improved, final: (saved if saved is not None else []).append(state.step),
        report=report,
    )
    return fit(loop, state), report


def test_skip_rides_out_isolated_bad_steps_and_names_the_group(tmp_path, fused):
    state, report = _train(tmp_path, {2, 3, 5, 6}, fused=fused, max_skipped_steps=3)
    assert state.step == 8 and state.skipped_steps == 4 and state.skip_streak == 0
    skipped = [m for m in report.messages if "step skipped" in m]
    assert len(skipped) == 4
    assert skipped[0].startswith("step 2: non-finite gradient norm") and "in ffn" in skipped[0]
    assert "tok_emb" not in skipped[0]
    assert not (tmp_path / "nonfinite.json").exists()


def test_skip_stops_after_max_skipped_steps_in_a_row(tmp_path, fused):
    with pytest.raises(FloatingPointError) as err:
        _train(tmp_path, set(range(2, 8)), fused=fused, max_skipped_steps=3)
    message = str(err.value)
    assert message.startswith("step 4: non-finite gradient norm (inf) in ffn")
    assert "3 steps in a row were skipped (--train.max-skipped-steps 3)" in message
    assert "--train.precision no" not in message  # the run is fp32 already
    info = json.loads((tmp_path / "nonfinite.json").read_text())
    assert info["step"] == 4 and info["skip_streak"] == 3 and info["non_finite_grad_groups"] == ["ffn"]


def test_stop_saves_diagnostics_at_the_first_bad_step(tmp_path, fused):
    with pytest.raises(FloatingPointError, match=r"^step 3: .* in ffn; stopping \(--train.nonfinite stop\)"):
        _train(tmp_path, {3}, fused=fused, nonfinite="stop")
    info = json.loads((tmp_path / "nonfinite.json").read_text())
    assert info["step"] == 3 and info["lr"] == lr_at(3, OptimConfig(lr=1e-2, warmup_steps=0), 8)
    assert info["non_finite_grad_groups"] == ["ffn"] and info["non_finite_weight_groups"] == []
    assert info["loss"] == "inf" and info["policy"] == "stop"


def test_non_finite_weights_stop_the_run_at_once_even_when_skipping(tmp_path, fused):
    with pytest.raises(FloatingPointError, match=r"^step 3: .*the weights of ffn are non-finite already"):
        _train(tmp_path, set(), fused=fused, break_weights_at=3, max_skipped_steps=5)
    assert json.loads((tmp_path / "nonfinite.json").read_text())["non_finite_weight_groups"] == ["ffn"]


def test_weights_made_non_finite_are_never_saved(tmp_path, fused):
    """An update that overflowed the weights without a non-finite gradient is stopped before any save."""

    def poisoning_eval(model):
        if (
            len(saved) == 1
        ):  # the second evaluation finds the weights broken (as if step 4's update overflowed)
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if GPT.param_group(n) == "head").view(-1)[0] = (
                    math.inf
                )
        return {"val_loss": math.nan if len(saved) == 1 else 1.0}

    saved: list[int] = []
    with pytest.raises(
        FloatingPointError, match=r"^step 4: the weights of head are non-finite .*nothing was saved"
    ):
        _train(tmp_path, set(), fused=fused, eval_fn=poisoning_eval, saved=saved, eval_interval=2)
    assert saved == [2]  # the state of step 2 was saved; none after the weights broke


def test_the_advice_suggests_fp32_only_to_a_mixed_precision_run():
    def advice(precision: str, grad_clip: float = 1.0) -> str:
        optim = OptimConfig(grad_clip=grad_clip)
        return _advice(SimpleNamespace(optim=optim, accelerator=SimpleNamespace(mixed_precision=precision)))

    assert "--train.precision no (now bf16)" in advice("bf16")
    assert "--train.precision no" not in advice("no")
    assert "--optim.grad-clip" in advice("no", grad_clip=0.0)


# --------------------------------------------------------------------------------------------------
# A stalled rank: the other rank's collective times out, names the rank and the operation, exits non-zero
# --------------------------------------------------------------------------------------------------


def test_a_collective_that_times_out_names_the_rank_and_the_operation(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(accel, "_dist_timeout_s", 7.0)
    gloo = "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 7000ms for recv operation to complete"
    expected = r"^rank 1: the all-reduce of x timed out after 7 s waiting for the other processes \(a stalled"
    with pytest.raises(accel.CollectiveFailure, match=expected), accel.collective("the all-reduce of x"):
        raise RuntimeError(gloo)
    closed = r"^rank 1: backward failed: another process closed"
    with pytest.raises(accel.CollectiveFailure, match=closed), accel.collective("backward"):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:5016")
    with pytest.raises(RuntimeError, match=r"^shape mismatch$"), accel.collective("x"):
        raise RuntimeError("shape mismatch")  # any other error passes through unchanged
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert accel.collective_failure(RuntimeError(gloo), "x") is None


def test_the_process_group_timeout_reaches_accelerate_even_at_its_default():
    for seconds in (5.0, 600.0, 1800.0):
        timeout = accel._process_group_kwargs(seconds).to_kwargs()["timeout"]
        assert abs(timeout.total_seconds() - seconds) < 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(launcher_pid: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes `accelerate launch` (torchrun) started."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        env = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
        rank = next((item.split("=", 1)[1] for item in env if item.startswith("RANK=")), None)
        if rank is not None:
            ranks[int(rank)] = pid
    return ranks


def _wait(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks through /proc (Linux)")
def test_a_stalled_rank_fails_the_job_naming_the_rank_and_the_collective(char_data, tmp_path):
    out = tmp_path / "run"
    cmd = [
        *accelerate_launch("cpu_ddp.yaml"),
        "--main_process_port",
        str(_free_port()),
        str(ROOT / "recipes" / "pretrain.py"),
        *("--preset", "tiny", "--data", str(char_data), "--out", str(out), "--max-steps", "100000"),
        *("--train.log-interval", "1", "--train.eval-interval", "100000", "--train.sample-tokens", "0"),
        *("--train.precision", "no", "--train.no-progress", "--train.dist-timeout", "5"),
    ]
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with stdout.open("w") as o, stderr.open("w") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, env=env, start_new_session=True)
    stopped: int | None = None
    try:
        metrics = out / "metrics.jsonl"
        started = _wait(
            lambda: proc.poll() is not None or (metrics.exists() and metrics.read_text().strip()), 150
        )
        assert started and proc.poll() is None, f"training did not start:\n{stderr.read_text()[-3000:]}"
        stopped = _ranks(proc.pid)[1]
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        assert _wait(lambda: "timed out after" in stderr.read_text() or proc.poll() is not None, 30)
        # Let the stopped rank receive the launcher's SIGTERM (a stopped process only acts on SIGKILL).
        os.kill(stopped, signal.SIGCONT)
        assert _wait(lambda: proc.poll() is not None, 30), "the launch did not exit after the timeout"
        took = time.monotonic() - t0
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = stderr.read_text()
    assert proc.returncode != 0
    assert took < 30
    assert re.search(
        r"^error: rank 0: .+ timed out after 5 s waiting for the other processes \(a stalled or crashed rank\)",
        err,
        re.MULTILINE,
    ), err[-3000:]
    assert "[rank0]: Traceback" not in err
