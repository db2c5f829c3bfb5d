"""The learning-rate range test's analysis: the exponential schedule, smoothing and the suggestion (pure functions).

The test itself (recipes/lr_find.py) trains with the shared accumulation step of
`pipeline.train.loop`; everything here is a function of the recorded curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from matplotlib.figure import Figure


def exp_lrs(start: float, end: float, n: int) -> np.ndarray:
    """n learning rates rising geometrically from start to end."""
    return np.geomspace(start, end, n)


def smooth(losses: Sequence[float], beta: float, centered: bool = False) -> np.ndarray:
    """Bias-corrected exponential moving average (beta: weight of the past).

    The causal average lags the curve by about 1 / (1 - beta) points, which moves its minimum and
    steepest descent to higher learning rates; `centered` averages forwards and then backwards,
    which cancels the lag (for reading the finished curve; the live stopping rule stays causal).
    """
    out, avg = np.empty(len(losses)), 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out[i] = avg / (1 - beta ** (i + 1))
    return smooth(out[::-1], beta)[::-1] if centered else out


def suggest_lr(
    lrs: Sequence[float], smoothed: Sequence[float], rule: Literal["steepest", "valley"]
) -> dict[str, Any]:
    """The suggested learning rate from a smoothed range-test curve, with what both rules give.

    steepest: where the smoothed loss falls fastest per unit of log-LR, searched before the
    minimum (past it, the loss is already turning up); valley: the minimum's LR / 10, one decade
    below where training stops improving. `falling` is False when the loss never fell, which
    means the range started too high or was too short.
    """
    lrs = np.asarray(lrs, dtype=float)
    smoothed = np.asarray(smoothed, dtype=float)
    if len(lrs) < 3:
        raise ValueError("need at least 3 points of the curve")
    i_min = int(np.nanargmin(smoothed))
    slope = np.gradient(smoothed, np.log(lrs))
    i_steep = int(np.argmin(slope[: max(i_min, 1)]))
    out = {
        "steepest_lr": float(lrs[i_steep]),
        "valley_lr": float(lrs[i_min] / 10),
        "min_loss_lr": float(lrs[i_min]),
        "min_loss": float(smoothed[i_min]),
        "falling": bool(smoothed[i_min] < smoothed[0]),
    }
    out["rule"] = rule
    out["suggested_lr"] = out["steepest_lr"] if rule == "steepest" else out["valley_lr"]
    return out


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], s: dict) -> Figure:
    """Loss against learning rate (log axis): raw, smoothed, the minimum and the suggestion."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(lrs, losses, color="C0", alpha=0.3, label="loss")
    ax.plot(lrs, smoothed, color="C0", label="smoothed")
    ax.axvline(s["suggested_lr"], color="C3", label=f"suggested {s['suggested_lr']:.2e} ({s['rule']})")
    ax.plot([s["min_loss_lr"]], [s["min_loss"]], "kv", label=f"minimum at {s['min_loss_lr']:.2e}")
    top = min(max(smoothed[0], s["min_loss"]) * 1.5, np.nanmax(losses))
    ax.set(xscale="log", xlabel="learning rate", ylabel="train loss", title="Learning-rate range test")
    ax.set_ylim(top=top)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return fig
