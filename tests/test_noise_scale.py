"""The gradient noise scale: the estimator, and the loop hook's bookkeeping of micro-batch gradients.

Synthetic problems with controlled gradient noise: per-example gradients g_i = G + e_i with
e_i ~ N(0, diag(sigma^2)), so the true B_simple = tr(Sigma) / |G|^2 = sum(sigma^2) / |G|^2.
"""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from pipeline.train.batching import BatchPlan
from pipeline.train.losses import IGNORE
from pipeline.train.noise_scale import GradNoiseScale, NoiseScaleEstimator, make_grad_noise


def synthetic(dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(dim, generator=gen) * 0.2
    sigma = torch.rand(dim, generator=gen) + 0.5
    return grad, sigma, float((sigma**2).sum() / (grad**2).sum())


def test_estimator_recovers_known_noise_scale():
    grad, sigma, true = synthetic()
    assert 10 < true < 100  # between the two batch sizes' scales: a meaningful test
    gen = torch.Generator().manual_seed(1)
    est = NoiseScaleEstimator(b_small=4, b_big=64, decay=0.995)
    for _ in range(1500):
        per_example = grad + torch.randn(64, grad.numel(), generator=gen) * sigma  # (B_big, D)
        est.update(per_example[:4].mean(0).pow(2).sum(), per_example.mean(0).pow(2).sum())
    got = est.estimate()
    assert got["b_simple"] == pytest.approx(true, rel=0.15)
    assert got["grad_sq"] == pytest.approx(float(grad.pow(2).sum()), rel=0.15)
    assert got["trace_sigma"] == pytest.approx(float(sigma.pow(2).sum()), rel=0.05)
    assert got["steps"] == 1500


def test_estimator_skips_non_finite_steps_and_is_undefined_before_data():
    est = NoiseScaleEstimator(b_small=2, b_big=8)
    assert math.isnan(est.estimate()["b_simple"])
    est.update(torch.tensor(3.0), torch.tensor(1.5))
    before = est.estimate()
    est.update(torch.tensor(float("inf")), torch.tensor(1.0))  # an fp16 overflow step
    assert est.estimate() == before
    # One step: |G|^2 = (8*1.5 - 2*3) / 6 = 1, tr(Sigma) = (3 - 1.5) / (1/2 - 1/8) = 4.
    assert before["grad_sq"] == pytest.approx(1.0)
    assert before["trace_sigma"] == pytest.approx(4.0)
    assert before["b_simple"] == pytest.approx(4.0)


def test_hook_undoes_the_loops_loss_normalisation():
    """Drive the hook exactly as pipeline.train.fit does: summed token losses scaled by 1 / step tokens."""
    grad, sigma, true = synthetic(seed=2)
    accelerator = Accelerator(cpu=True)
    micro, accum, seq_len = 4, 8, 16
    hook = GradNoiseScale(accelerator, micro, micro * accum, seq_len, decay=0.995)
    w = torch.nn.Parameter(torch.zeros(grad.numel()))
    model = torch.nn.Module()
    model.w = w
    targets = torch.zeros(micro, seq_len, dtype=torch.long)
    targets[:, -3:] = IGNORE  # padding: only 13 valid tokens per sequence
    valid = int((targets != IGNORE).sum())
    gen = torch.Generator().manual_seed(3)
    for step in range(1500):
        n_global = valid * accum
        for m in range(accum):
            per_seq = grad + torch.randn(micro, grad.numel(), generator=gen) * sigma  # (micro, D)
            per_token = (per_seq @ w) * (valid / micro)  # each sequence's tokens share its gradient
            (per_token.sum() * (1 / n_global)).backward()
            if m == 0:
                hook.first_micro_batch(model, targets, n_global)
        metrics = hook.full_batch(model, logging=step == 1499)
        w.grad = None
    assert metrics["noise/b_simple"] == pytest.approx(true, rel=0.15)
    assert metrics["noise/b_simple_tokens"] == pytest.approx(metrics["noise/b_simple"] * seq_len)
    assert hook.result()["b_simple"] == metrics["noise/b_simple"]


def test_make_grad_noise_needs_accumulation():
    accelerator = Accelerator(cpu=True)
    said: list[str] = []
    plan = BatchPlan(8, 1, 1, 32, 1000, 10)
    assert make_grad_noise(accelerator, plan, said.append) is None
    assert "grad-accum-steps >= 2" in said[-1]
    hook = make_grad_noise(accelerator, BatchPlan(4, 2, 1, 32, 1000, 10), said.append)
    assert isinstance(hook, GradNoiseScale)
    assert (hook.estimator.b_small, hook.estimator.b_big) == (4, 8)
