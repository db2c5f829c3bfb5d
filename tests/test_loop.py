"""The accumulation step and optimizer step shared by the training loop and the LR range test."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from pipeline.config import ModelConfig, OptimConfig
from pipeline.model.gpt import GPT
from pipeline.train.loop import accumulate, defers_check, optimizer_step
from pipeline.train.losses import IGNORE, CrossEntropyHead
from pipeline.train.optim import build_optimizer


def lm_loss(model, batch):
    x, y = batch
    return model(x, head_fn=CrossEntropyHead(y)), {"tokens": (y != IGNORE).sum().double()}


@pytest.fixture(params=[False, True], ids=["host-check", "fused-deferred"])
def setup(request):
    """A tiny model and AdamW: for-loop (the step skipped in Python) or fused (skipped by the kernel)."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=1, n_heads=2, d_model=16, max_seq_len=8, vocab_size=11)
    model = GPT(cfg)
    acc = Accelerator(cpu=True)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0), fused=request.param)
    model, optimizer = acc.prepare(model, optimizer)
    assert defers_check(acc, optimizer) == request.param
    x = torch.randint(0, 11, (4, 8))
    y = torch.randint(0, 11, (4, 8))
    y[0, :3] = IGNORE
    return acc, model, optimizer, x, y


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch(setup):
    acc, model, _, x, y = setup
    step = accumulate(acc, model, [(x[:2], y[:2]), (x[2:], y[2:])], lm_loss)
    accumulated = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    whole = model(x, head_fn=CrossEntropyHead(y))
    (whole / (y != IGNORE).sum()).backward()
    assert step.n_local == step.n_global == int((y != IGNORE).sum())
    assert float(step.loss) == pytest.approx(float(whole.detach()), rel=1e-6)
    assert float(step.extra["tokens"]) == step.n_local
    for a, b in zip(accumulated, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_non_finite_gradient_leaves_the_weights_untouched(setup):
    acc, model, optimizer, x, y = setup
    accumulate(acc, model, [(x, y)], lm_loss)
    before = [p.detach().clone() for p in model.parameters()]
    next(iter(model.parameters())).grad[0, 0] = math.inf
    norm, stepped = optimizer_step(acc, model, optimizer, max_norm=1.0, lr=1e-2)
    assert not stepped and not math.isfinite(float(norm))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    optimizer.zero_grad(set_to_none=True)
    accumulate(acc, model, [(x, y)], lm_loss)
    norm, stepped = optimizer_step(acc, model, optimizer, max_norm=1.0, lr=1e-2)
    assert stepped and math.isfinite(float(norm))
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(group["lr"] == pytest.approx(1e-2 * group["lr_mult"]) for group in optimizer.param_groups)
