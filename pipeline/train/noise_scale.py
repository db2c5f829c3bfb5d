"""The gradient noise scale B_simple, measured during training (McCandlish et al. 2018, appendix A).

A mean gradient over B examples has E|G_B|^2 = |G|^2 + tr(Sigma) / B, where G is the true gradient
and Sigma the per-example gradient covariance. Two batch sizes B_small < B_big give unbiased
estimates of both terms:

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

and B_simple = tr(Sigma) / |G|^2, which approximates the critical batch size: below it, doubling
the batch halves the steps to a given loss; above it, extra examples mostly average noise away.
Each step's estimates are noisy, so both are averaged (EMA, bias-corrected) before the ratio.

In the training loop the two batches come for free: after the first micro-batch's backward the
gradient holds B_small = micro_batch_size sequences of this process only (gradients synchronise on
the last micro-step), and before clipping the step's gradient holds all B_big = sequences_per_step
sequences of every process. Under data parallelism the per-process |G_small|^2 is averaged over
processes. So it needs grad_accum_steps >= 2; sharded gradients (FSDP, DeepSpeed) are not measured.
Units: sequences (`b_simple`) and tokens (`b_simple_tokens` = b_simple x seq_len).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor

from pipeline.train.losses import IGNORE

if TYPE_CHECKING:  # pipeline.train imports this module
    from pipeline.train.batching import BatchPlan

EMA_DECAY = 0.95
"""Weight of the past in the running averages: about the last 20 steps count."""

_SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
"""Set-ups whose per-process gradients are shards of the model's, not whole gradients."""


class NoiseScaleEstimator:
    """Bias-corrected EMAs of |G_small|^2 and |G_big|^2, and the estimates derived from them.

    `update` takes device tensors and never syncs with the host; `estimate` does. Because the
    unbiased estimates are linear in the two squared norms, averaging the norms is the same as
    averaging the estimates, and averaging per-process EMAs is the same as the EMA of their mean.
    """

    def __init__(self, b_small: float, b_big: float, decay: float = EMA_DECAY) -> None:
        if not 0 < b_small < b_big:
            raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.b_small, self.b_big, self.decay = float(b_small), float(b_big), decay
        self.small: Tensor | float = 0.0  # EMA of |G_small|^2 (not yet bias-corrected)
        self.big: Tensor | float = 0.0
        self.weight: Tensor | float = 0.0  # 1 - decay^(updates counted)
        self.updates: Tensor | float = 0.0

    def update(self, small_sq: Tensor, big_sq: Tensor) -> None:
        """Fold in one step's squared norms; a non-finite pair (an fp16 overflow) is left out."""
        ok = (torch.isfinite(small_sq) & torch.isfinite(big_sq)).double()
        keep = 1.0 - (1.0 - self.decay) * ok  # decay where the step counts, 1 where it is skipped
        self.small = keep * self.small + (1.0 - keep) * torch.nan_to_num(small_sq.double())
        self.big = keep * self.big + (1.0 - keep) * torch.nan_to_num(big_sq.double())
        self.weight = keep * self.weight + (1.0 - keep)
        self.updates = self.updates + ok

    def estimate(self, reduce_small: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """|G|^2, tr(Sigma) and B_simple from the averages; NaN until |G|^2 > 0 is measured."""
        small = torch.as_tensor(self.small, dtype=torch.float64)
        if reduce_small is not None:
            small = reduce_small(small)
        values = torch.stack(
            [small, torch.as_tensor(self.big, dtype=small.dtype, device=small.device)]
        ) / max(float(self.weight), 1e-12)
        g_small, g_big = (float(v) for v in values)
        grad_sq = (self.b_big * g_big - self.b_small * g_small) / (self.b_big - self.b_small)
        trace = (g_small - g_big) / (1.0 / self.b_small - 1.0 / self.b_big)
        b_simple = trace / grad_sq if grad_sq > 0 and float(self.updates) > 0 else math.nan
        return {"b_simple": b_simple, "grad_sq": grad_sq, "trace_sigma": trace, "steps": float(self.updates)}


def grad_sq_norm(model: torch.nn.Module) -> Tensor:
    """Squared L2 norm of all gradients, in fp32 on the device (no host sync)."""
    norms = [p.grad.detach().float().pow(2).sum() for p in model.parameters() if p.grad is not None]
    if not norms:
        raise RuntimeError("no gradients to measure: call it after backward()")
    return torch.stack(norms).sum()


class GradNoiseScale:
    """The training loop's hook (`Loop.grad_noise`): two measurements per optimizer step.

    `first_micro_batch` runs right after the first micro-batch's backward; `full_batch` runs once
    the step's gradient is synchronised, before clipping, and returns the current estimates as
    metrics (`noise/b_simple`, `noise/b_simple_tokens`, `noise/grad_sq`, `noise/trace_sigma`) on
    logging steps. The loop scales the loss by world_size / (valid tokens of the step), so the
    first micro-batch's gradient is rescaled here to that micro-batch's own mean.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        micro_batch_size: int,
        sequences_per_step: int,
        seq_len: int,
        decay: float = EMA_DECAY,
    ) -> None:
        self.accelerator = accelerator
        self.world = accelerator.num_processes
        self.seq_len = seq_len
        self.estimator = NoiseScaleEstimator(micro_batch_size, sequences_per_step, decay)
        self._small_sq: Tensor | None = None
        self.last: dict[str, float] = {}

    def first_micro_batch(self, model: torch.nn.Module, targets: Tensor, n_global: Tensor | float) -> None:
        """|G_small|^2 of this process's first micro-batch (its gradient is still local)."""
        n_first = (targets != IGNORE).sum().clamp_min(1).double()
        scale = n_global / (self.world * n_first)  # undo the loop's normalisation by the step's tokens
        self._small_sq = grad_sq_norm(model).double() * scale**2 / self._loss_scale() ** 2

    def full_batch(self, model: torch.nn.Module, logging: bool) -> dict[str, float]:
        """|G_big|^2 of the synchronised step gradient; the estimates when `logging` (all processes)."""
        if self._small_sq is None:
            raise RuntimeError("GradNoiseScale.full_batch called before first_micro_batch in this step")
        big_sq = grad_sq_norm(model).double() / self._loss_scale() ** 2
        self.estimator.update(self._small_sq, big_sq)
        self._small_sq = None
        if not logging:
            return {}
        reduce = (lambda t: self.accelerator.reduce(t, "mean")) if self.world > 1 else None
        est = self.estimator.estimate(reduce)
        self.last = est | {"b_simple_tokens": est["b_simple"] * self.seq_len}
        return {f"noise/{k}": v for k, v in self.last.items() if k != "steps"}

    def result(self) -> dict[str, float | None]:
        """The latest estimates for result.json (None where undefined)."""
        return {k: (v if math.isfinite(v) else None) for k, v in self.last.items()}

    def _loss_scale(self) -> float:
        # fp16 multiplies gradients by the loss scale until clipping unscales them.
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None else 1.0


def make_grad_noise(
    accelerator: Accelerator, plan: BatchPlan, log: Callable[[str], None] = print
) -> GradNoiseScale | None:
    """The hook for a run, or None (with the reason logged) when this set-up cannot measure it."""
    if plan.grad_accum_steps < 2:
        log(
            "noise scale: not measured: it compares the first micro-batch's gradient with the step's, so it "
            "needs --train.grad-accum-steps >= 2 (e.g. halve --train.micro-batch-size and double the accumulation)"
        )
        return None
    if accelerator.distributed_type in _SHARDED:
        log(f"noise scale: not measured under {accelerator.distributed_type}: gradients are sharded")
        return None
    log(
        f"noise scale: B_small = {plan.micro_batch_size} sequences (first micro-batch of each process), "
        f"B_big = {plan.sequences_per_step} sequences (the step); logged as noise/b_simple"
    )
    return GradNoiseScale(accelerator, plan.micro_batch_size, plan.sequences_per_step, plan.seq_len)
