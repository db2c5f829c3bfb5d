"""The loop's optimizer step waits for the host only at log steps: with fused AdamW a non-finite step is
skipped on the device (found_inf) and judged at the next log step, named by its own number."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from test_reliability_train import _Report as _QuietReport

from pipeline.config import ModelConfig, OptimConfig, TrainConfig
from pipeline.model.gpt import GPT
from pipeline.train.batching import plan_batches
from pipeline.train.loop import Loop, TrainState, accumulate, defers_check, fit, optimizer_step
from pipeline.train.losses import IGNORE, CrossEntropyHead
from pipeline.train.optim import build_optimizer

# What turns a device tensor into a host value (each waits for the device queue). int() is left out:
# the loop counts a batch's valid tokens with it on the host copy, before the batch goes to the device.
HOST_READS = ("__bool__", "__float__", "item", "tolist")


class _Report(_QuietReport):
    """test_reliability_train's report, each message kept with the iteration that printed it."""

    def __init__(self, path: Path, iteration: list[int]) -> None:
        super().__init__(path)
        self.iteration = iteration
        self.messages: list[tuple[int, str]] = []

    def print(self, message: str) -> None:
        self.messages.append((self.iteration[0], message))


def _count_host_reads(monkeypatch, iteration: list[int]) -> Counter:
    """Count, per loop iteration (the step batch_fn last fetched), every read of a tensor into Python."""
    reads: Counter = Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads[iteration[0]] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.mark.parametrize("fused", [True, False], ids=["fused-deferred", "host-check"])
def test_steps_between_log_steps_read_nothing_on_the_host(tmp_path, monkeypatch, fused):
    """8 steps, logged every 4th (iterations 3 and 7), a bad step at 2: fused, only iterations 3 and 7
    read tensors, and step 2 is named at iteration 3; the host check reads at every iteration instead."""
    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=8, micro_batch_size=2, log_interval=4, eval_interval=100, eval_at_start=False)
    optim = OptimConfig(lr=1e-2, warmup_steps=0)
    acc = Accelerator(cpu=True)
    model = GPT(ModelConfig(n_layers=1, n_heads=2, d_model=16, max_seq_len=8, vocab_size=11))
    model, optimizer = acc.prepare(model, build_optimizer(model, optim, fused=fused))
    assert defers_check(acc, optimizer) == fused
    iteration = [-1]
    plan = plan_batches(cfg, 8, 1, 10_000)

    def batch_fn(step, micro_step):
        iteration[0] = step
        g = torch.Generator().manual_seed(step)
        return torch.randint(0, 11, (2, 8), generator=g), torch.randint(0, 11, (2, 8), generator=g)

    def loss_fn(model, batch):
        x, y = batch
        loss = model(x, head_fn=CrossEntropyHead(y))
        if iteration[0] == 2:  # an infinite gradient in the FFN group only
            ffn = next(p for n, p in model.named_parameters() if GPT.param_group(n) == "ffn")
            loss = loss + ffn.square().sum() * math.inf
        return loss, {}

    report = _Report(tmp_path, iteration)
    loop = Loop(
        acc,
        model,
        optimizer,
        cfg,
        optim,
        plan,
        batch_fn,
        loss_fn,
        eval_fn=lambda: {"val_loss": 1.0},
        checkpoint_fn=lambda state, improved, final: None,
        report=report,
    )
    reads = _count_host_reads(monkeypatch, iteration)
    state = fit(loop, TrainState())
    monkeypatch.undo()

    assert state.step == 8 and state.skipped_steps == 1 and state.skip_streak == 0
    [(printed_at, message)] = [(it, m) for it, m in report.messages if "non-finite" in m]
    assert message.startswith("step 2: non-finite gradient norm (inf) in ffn; step skipped")
    log_iterations = {3, 7}
    if fused:
        assert printed_at == 3  # judged at the next log step, named by its own number
        assert {it for it, n in reads.items() if n} == log_iterations
    else:
        assert printed_at == 2
        assert all(reads[it] > 0 for it in range(8))  # the per-step check this test would catch


def _lm_loss(model, batch):
    x, y = batch
    return model(x, head_fn=CrossEntropyHead(y)), {"tokens": (y != IGNORE).sum().double()}


def test_a_skipped_fused_step_leaves_no_trace(monkeypatch):
    """Weights, moments and step counts after (good, bad, good) equal those after (good, good): the kernel
    skipped the bad step and rolled its count back, and the next step's found_inf let the update through."""

    def run(bad_in_between: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
        torch.manual_seed(0)
        model = GPT(ModelConfig(n_layers=1, n_heads=2, d_model=16, max_seq_len=8, vocab_size=11))
        acc = Accelerator(cpu=True)
        opt = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0), fused=True)
        model, opt = acc.prepare(model, opt)
        g = torch.Generator().manual_seed(1)
        batches = [
            (torch.randint(0, 11, (2, 8), generator=g), torch.randint(0, 11, (2, 8), generator=g))
            for _ in "ab"
        ]
        for batch in [batches[0], None, batches[1]]:
            if batch is None and not bad_in_between:
                continue
            accumulate(acc, model, [batch or batches[0]], _lm_loss)
            if batch is None:
                next(iter(model.parameters())).grad[0, 0] = math.nan
            _, stepped = optimizer_step(acc, model, opt, max_norm=1.0, lr=1e-2)
            assert bool(stepped) == (batch is not None)
            opt.zero_grad(set_to_none=True)
        state = [opt.state[p] for p in model.parameters()]
        return (
            [p.detach().clone() for p in model.parameters()],
            [torch.cat([s["exp_avg"].flatten(), s["exp_avg_sq"].flatten()]) for s in state],
            [float(s["step"]) for s in state],
        )

    weights, moments, steps = run(bad_in_between=True)
    ref_weights, ref_moments, ref_steps = run(bad_in_between=False)
    assert steps == ref_steps == [2.0] * len(steps)
    assert all(torch.equal(a, b) for a, b in zip(weights, ref_weights))
    assert all(torch.equal(a, b) for a, b in zip(moments, ref_moments))
