"""Gradient and update statistics read at log intervals: per-group gradient RMS, weight norms, update/weight ratios, per-layer norms, clipping.

Exercises H5.5, H7.1, H7.2, H7.4 and H7.5. Nothing here syncs the host between log points: the
clipping count is a device tensor added to every step, and the per-group statistics are computed
only on a log step, stacked and read with one transfer.

The update/weight ratio ||w_new - w_old|| / ||w_old|| is reconstructed from AdamW's state after the
step instead of copying the weights before it (the seed model's weights are 410 MB): torch's AdamW
computes w_new = w_old * (1 - lr * wd) + a with a = -lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps),
so the step's update is w_new - w_old = (a - lr * wd * w_new) / (1 - lr * wd), from m, v, the step
count and w_new alone. It is computed in chunks of at most CHUNK elements, so the temporaries stay
small whatever the parameter's size. A skipped step (non-finite gradient, or fp16's scaler) moved
nothing: its ratios are 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from torch import Tensor, nn

CHUNK = 1 << 22  # elements per slice of the update reconstruction
_LAYER = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


class GradDiagnostics:
    """The loop's gradient/update bookkeeping: a device-side clip counter, and the statistics of a log step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.clipped = torch.zeros((), dtype=torch.float64, device=self.device)
        self.steps = 0

    def count_clip(self, total_norm: Tensor, max_norm: float) -> None:
        """Add this step's (pre-clip norm > max_norm) on the device: no host sync."""
        self.steps += 1
        if max_norm and math.isfinite(max_norm):
            self.clipped += (torch.isfinite(total_norm) & (total_norm > max_norm)).double()

    def collect(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        group_sq: dict[str, Tensor],
        coef: float,
        stepped: bool,
        full: bool,
    ) -> dict[str, float]:
        """clipped_share since the last log and (with `full`) the per-group and per-layer statistics.

        `group_sq` is optim.group_grad_norms(optimizer), which the loop already computed for grad_norm/G.
        `coef` is the clipping factor of this step: gradient statistics are divided by it (pre-clip).
        Call after optimizer.step() and before zero_grad().
        """
        names: list[str] = ["clipped_share"]
        values: list[Tensor] = [self.clipped / max(self.steps, 1)]
        if full:
            for key, value in grad_stats(optimizer, model, group_sq).items():
                names.append(key)
                values.append(value / coef)
            for key, value in weight_stats(optimizer, stepped).items():
                names.append(key)
                values.append(value)
        read = torch.stack([v.detach().double().to(self.device) for v in values]).tolist()  # one transfer
        self.reset()
        return dict(zip(names, read))


def grad_stats(
    optimizer: torch.optim.Optimizer, model: nn.Module, group_sq: dict[str, Tensor]
) -> dict[str, Tensor]:
    """grad_rms/G per group (from the squared norms `group_sq`), grad_rms_touched/tok_emb (rows that
    received gradient), grad_norm_layer/layerL."""
    numel: dict[str, int] = {}
    out: dict[str, Tensor] = {}
    for group in optimizer.param_groups:
        part = group["part"]
        for p in group["params"]:
            if p.grad is None:
                continue
            numel[part] = numel.get(part, 0) + p.grad.numel()
            if part == "tok_emb" and p.grad.dim() == 2:
                g = p.grad.detach().float()
                rows = g.ne(0).any(dim=1).sum().clamp(min=1)
                out["grad_rms_touched/tok_emb"] = (g.pow(2).sum() / (rows * g.shape[1])).sqrt()
    for part, sq in group_sq.items():
        out[f"grad_rms/{part}"] = (sq / max(numel.get(part, 0), 1)).sqrt()
    return out | layer_grad_norms(model)


def layer_grad_norms(model: nn.Module) -> dict[str, Tensor]:
    """grad_norm_layer/layerL: the gradient norm of each transformer block's parameters."""
    sq: dict[int, Tensor] = {}
    for name, p in model.named_parameters():
        match = _LAYER.search(name)
        if match and p.grad is not None:
            layer = int(match.group(1))
            sq[layer] = sq.get(layer, 0) + p.grad.detach().float().pow(2).sum()
    return {f"grad_norm_layer/layer{layer}": sq[layer].sqrt() for layer in sorted(sq)}


def weight_stats(optimizer: torch.optim.Optimizer, stepped: bool) -> dict[str, Tensor]:
    """weight_norm/G (after the step) and update_ratio/G = ||w_new - w_old|| / ||w_old|| per group."""
    w_sq: dict[str, Tensor] = {}
    old_sq: dict[str, Tensor] = {}
    delta_sq: dict[str, Tensor] = {}
    for group in optimizer.param_groups:
        part = group["part"]
        for p in group["params"]:
            w = p.detach()
            w_sq[part] = w_sq.get(part, 0) + w.float().pow(2).sum()
            state = optimizer.state.get(p, {})
            if not stepped or p.grad is None or "exp_avg" not in state:
                old_sq[part] = old_sq.get(part, 0) + w.float().pow(2).sum()
                delta_sq[part] = delta_sq.get(part, 0) + torch.zeros((), device=w.device)
                continue
            d_sq, o_sq = adamw_update_squares(w, state, group)
            delta_sq[part] = delta_sq.get(part, 0) + d_sq
            old_sq[part] = old_sq.get(part, 0) + o_sq
    out = {f"weight_norm/{part}": v.sqrt() for part, v in w_sq.items()}
    for part, d in delta_sq.items():
        out[f"update_ratio/{part}"] = d.sqrt() / old_sq[part].sqrt().clamp(min=1e-30)
    return out


def adamw_update_squares(w: Tensor, state: dict, group: dict) -> tuple[Tensor, Tensor]:
    """(||w_new - w_old||^2, ||w_old||^2) of the AdamW step just taken, from its state (module docstring)."""
    lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
    beta1, beta2 = group["betas"]
    # The step count as a device tensor: a float() of each fused state's count would sync the host per parameter.
    step = torch.as_tensor(state["step"], dtype=torch.float64).to(w.device)
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    step_size, root_bc2 = (-lr / bc1).float(), bc2.sqrt().float()
    shrink = 1.0 - lr * wd
    delta_sq = torch.zeros((), device=w.device, dtype=torch.float32)
    old_sq = torch.zeros((), device=w.device, dtype=torch.float32)
    flat = (t.detach().reshape(-1) for t in (w, state["exp_avg"], state["exp_avg_sq"]))
    for w_c, m_c, v_c in zip(*(t.split(CHUNK) for t in flat)):
        w_c = w_c.float()
        a = m_c.float() / (v_c.float().sqrt() / root_bc2 + eps) * step_size
        delta = (a - (lr * wd) * w_c) / shrink
        delta_sq += delta.pow(2).sum()
        old_sq += (w_c - delta).pow(2).sum()
    return delta_sq, old_sq


def chain(*probes: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """One probe_fn calling each given probe in turn (None entries dropped; None when none is left)."""
    live = [p for p in probes if p is not None]
    if not live:
        return None

    def probe(step: int) -> None:
        for p in live:
            p(step)

    return probe
