"""The batch-size scaling study's summary: curves read from run folders, steps to a target, critical batch, tables, plots.

The summary is built only from run folders (config.json, result.json, metrics.jsonl), never from
logs. The runs themselves are `pipeline.studies.jobs.Job`s.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pipeline.run.folder import read_metrics


def scaled_lr(base_lr: float, batch_size: int, reference: int, rule: str) -> float:
    """base_lr at `reference` sequences, scaled to `batch_size`: none, linear or sqrt (Adam's usual rule)."""
    ratio = batch_size / reference
    if rule == "none":
        return base_lr
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    raise ValueError(f"unknown learning-rate rule {rule!r}; use none, linear or sqrt")


@dataclass
class Curve:
    """A run's evaluations, in step order: step, tokens, elapsed seconds, val loss; and its noise scale."""

    steps: np.ndarray
    tokens: np.ndarray
    elapsed: np.ndarray
    val_loss: np.ndarray
    noise_steps: np.ndarray
    b_simple: np.ndarray


def read_curve(run_dir: Path) -> Curve:
    """The val curve from metrics.jsonl; a step logged twice (a resumed run) keeps its last record."""
    by_step: dict[int, dict[str, Any]] = {}
    for rec in read_metrics(run_dir):
        by_step.setdefault(int(rec["step"]), {}).update(rec)
    recs = [by_step[s] for s in sorted(by_step)]
    val = [r for r in recs if r.get("val_loss") is not None]
    noise = [r for r in recs if r.get("noise/b_simple") is not None]
    return Curve(
        steps=np.array([r["step"] for r in val], dtype=float),
        tokens=np.array([r.get("tokens", math.nan) for r in val], dtype=float),
        elapsed=np.array([r.get("elapsed_s", math.nan) for r in val], dtype=float),
        val_loss=np.array([r["val_loss"] for r in val], dtype=float),
        noise_steps=np.array([r["step"] for r in noise], dtype=float),
        b_simple=np.array([r["noise/b_simple"] for r in noise], dtype=float),
    )


def reach_target(curve: Curve, target: float) -> dict[str, float] | None:
    """Steps, tokens and seconds until val loss first reaches `target` (linear between evaluations)."""
    hits = np.flatnonzero(curve.val_loss <= target)
    if len(hits) == 0:
        return None
    i = int(hits[0])
    frac = 1.0
    if i > 0:
        before, after = curve.val_loss[i - 1], curve.val_loss[i]
        frac = (before - target) / max(before - after, 1e-12)
    j = max(i - 1, 0)

    def at(values: np.ndarray) -> float:
        return float(values[j] + frac * (values[i] - values[j]))

    return {"steps": at(curve.steps), "tokens": at(curve.tokens), "seconds": at(curve.elapsed)}


def noise_at(curve: Curve, step: float) -> float:
    """The B_simple estimate logged nearest to `step` (NaN when the run did not measure it)."""
    finite = np.isfinite(curve.b_simple)
    if not finite.any():
        return math.nan
    steps, values = curve.noise_steps[finite], curve.b_simple[finite]
    return float(values[int(np.argmin(np.abs(steps - step)))])


def run_row(run_dir: Path, batch_size: int, curve: Curve) -> dict[str, Any]:
    """One table row from a finished run folder (config.json, env.json, result.json, its curve).

    B_simple is result.json's final estimate, else (a stage whose result.json leaves it out) the
    last one metrics.jsonl logged.
    """
    cfg = _read_json(run_dir / "config.json")
    result = _read_json(run_dir / "result.json")
    env = _read_json(run_dir / "env.json")
    logged = curve.b_simple[np.isfinite(curve.b_simple)]
    noise = result.get("noise_scale") or {"b_simple": float(logged[-1]) if len(logged) else None}
    return {
        "batch_size": batch_size,
        "micro_batch_size": cfg["train"]["micro_batch_size"],
        "grad_accum_steps": cfg["train"]["grad_accum_steps"],
        "world_size": env.get("world_size", 1),
        "lr": cfg["optim"]["lr"],
        "seq_len": cfg["data"]["seq_len"],
        "steps": result.get("step"),
        "tokens": result.get("tokens"),
        "final_val_loss": result.get("final_val_loss"),
        "best_val_loss": result.get("best_val_loss"),
        "wall_time_s": result.get("wall_time_s"),
        "tokens_per_s": result.get("tokens_per_s"),
        "peak_mem_gib": result.get("peak_mem_gib"),
        "b_simple": noise.get("b_simple"),
    }


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def add_targets(rows: list[dict[str, Any]], curves: list[Curve], target: float) -> None:
    """Fill steps/tokens/time to `target` and B_simple at that point into each row."""
    for row, curve in zip(rows, curves):
        hit = reach_target(curve, target)
        row["target_loss"] = target
        row["steps_to_target"] = hit["steps"] if hit else None
        row["tokens_to_target"] = hit["tokens"] if hit else None
        row["time_to_target_s"] = hit["seconds"] if hit else None
        at = noise_at(curve, hit["steps"] if hit else math.inf)
        row["b_simple_at_target"] = at if math.isfinite(at) else None


def default_target(curves: Sequence[Curve]) -> float:
    """The lowest val loss every run reached: the worst of the runs' best losses."""
    return float(max(c.val_loss.min() for c in curves if len(c.val_loss)))


def fit_critical_batch(batch_sizes: Sequence[float], steps: Sequence[float]) -> dict[str, float] | None:
    """Fit steps-to-target S(B) = S_min (1 + B_crit / B) (McCandlish et al. 2018, eq. 2.11).

    Least squares in relative error (each row divided by S_i), linear in (S_min, S_min B_crit).
    None with fewer than two batch sizes or when the fit has no positive S_min and B_crit (all
    sizes far below B_crit look like perfect scaling, S_min -> 0).
    """
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    if len(np.unique(b)) < 2:
        return None
    design = np.stack([1.0 / s, 1.0 / (b * s)], axis=1)
    (s_min, s_min_b_crit), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
    if s_min <= 1e-6 * s.max() or s_min_b_crit <= 0:  # S_min numerically zero: no finite B_crit
        return None
    return {"s_min": float(s_min), "b_crit": float(s_min_b_crit / s_min)}


def critical_batch(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """B_crit from the steps-to-target fit, and the measured B_simple (median over runs, at target)."""
    reached = [r for r in rows if r.get("steps_to_target")]
    fit = fit_critical_batch([r["batch_size"] for r in reached], [r["steps_to_target"] for r in reached])
    noise = [r["b_simple_at_target"] or r["b_simple"] for r in rows]
    noise = [v for v in noise if v is not None and math.isfinite(v) and v > 0]
    return {
        "b_crit_fit": fit["b_crit"] if fit else None,
        "s_min_fit": fit["s_min"] if fit else None,
        "b_simple": float(np.median(noise)) if noise else None,
    }


TABLE_COLUMNS = {  # column -> Markdown header
    "batch_size": "batch",
    "lr": "lr",
    "grad_accum_steps": "accum",
    "steps": "steps",
    "final_val_loss": "final val loss",
    "steps_to_target": "steps to target",
    "tokens_to_target": "tokens to target",
    "time_to_target_s": "s to target",
    "wall_time_s": "wall s",
    "tokens_per_s": "tokens/s",
    "peak_mem_gib": "peak GiB",
    "b_simple_at_target": "B_simple",
}


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS.values()) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k)) for k in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 100):
        return f"{int(value):,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.4g}"
    return str(value)


def plot_loss_curves(rows: Sequence[dict[str, Any]], curves: Sequence[Curve], target: float) -> Figure:
    """Val loss against training tokens, one line per batch size, the target dashed."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    colors = _colors(len(rows))
    for row, curve, color in zip(rows, curves, colors):
        ax.plot(curve.tokens, curve.val_loss, marker=".", color=color, label=f"B = {row['batch_size']}")
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    ax.set(xlabel="training tokens", ylabel="val loss (nats/token)", title="Val loss per batch size")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def plot_steps_to_target(rows: Sequence[dict[str, Any]], crit: dict[str, float | None]) -> Figure:
    """Steps (left) and tokens (right) to the target against batch size, critical batch marked.

    Dotted: perfect scaling from the smallest batch (steps halve as the batch doubles; tokens stay).
    Dashed: the fit S = S_min (1 + B_crit / B), i.e. tokens = S_min (B + B_crit) x seq_len.
    """
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    reached = [r for r in rows if r.get("steps_to_target")]
    b = np.array([r["batch_size"] for r in reached], dtype=float)
    grid = np.geomspace(min(r["batch_size"] for r in rows), max(r["batch_size"] for r in rows), 100)
    steps_ax, tokens_ax = fig.subplots(1, 2)
    for ax, key, per_batch in ((steps_ax, "steps_to_target", 1), (tokens_ax, "tokens_to_target", 0)):
        y = np.array([r[key] for r in reached], dtype=float)
        ax.plot(b, y, "o-", label="measured")
        if len(b):
            ax.plot(grid, y[0] * (b[0] / grid) ** per_batch, ":", color="grey", label="perfect scaling")
        ax.set(yscale="log", xlabel="batch size (sequences)")
    steps_ax.set_ylabel("optimizer steps to target")
    tokens_ax.set_ylabel("tokens to target")
    if crit["b_crit_fit"]:
        s_min, b_crit = crit["s_min_fit"], crit["b_crit_fit"]
        seq_len = reached[0]["seq_len"]
        steps_ax.plot(grid, s_min * (1 + b_crit / grid), "--", color="C2", label="fit S_min (1 + B_crit/B)")
        tokens_ax.plot(grid, s_min * (grid + b_crit) * seq_len, "--", color="C2", label="fit")
    for ax in (steps_ax, tokens_ax):
        if crit["b_crit_fit"]:
            ax.axvline(
                crit["b_crit_fit"], color="C2", linewidth=1, label=f"B_crit (fit) {crit['b_crit_fit']:,.0f}"
            )
        if crit["b_simple"]:
            ax.axvline(crit["b_simple"], color="C3", linewidth=1, label=f"B_simple {crit['b_simple']:,.0f}")
        _batch_axis(ax, [r["batch_size"] for r in rows])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    fig.suptitle(f"Steps and tokens to val loss {rows[0].get('target_loss', math.nan):.3f}")
    return fig


def plot_wall_time(rows: Sequence[dict[str, Any]]) -> Figure:
    """Wall time to the target and throughput against batch size."""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    b = [r["batch_size"] for r in rows]
    reached = [r for r in rows if r.get("time_to_target_s")]
    left.plot([r["batch_size"] for r in reached], [r["time_to_target_s"] for r in reached], "o-")
    left.set(xlabel="batch size (sequences)", ylabel="seconds to target", title="Wall time to target")
    right.plot(b, [r["tokens_per_s"] or math.nan for r in rows], "o-", color="C1")
    right.set(xlabel="batch size (sequences)", ylabel="tokens/s", title="Throughput")
    for ax in (left, right):
        _batch_axis(ax, b)
        ax.grid(alpha=0.3, which="both")
    return fig


def _batch_axis(ax: Any, batch_sizes: Sequence[int]) -> None:
    """Log-2 batch axis labelled with the study's batch sizes; plain numbers on a log y axis."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xticks(list(batch_sizes), labels=[str(b) for b in batch_sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    if ax.get_yscale() == "log":
        plain = FuncFormatter(lambda v, _: f"{v:,.4g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def write_tensorboard(
    log_dir: Path, rows: Sequence[dict[str, Any]], curves: Sequence[Curve], figures: dict[str, Figure]
) -> None:
    """One TensorBoard run per batch size (hparams + val loss against tokens) and the figures.

    `tensorboard --logdir <study>/tb` then compares the runs in one HParams view.
    """
    from torch.utils.tensorboard import SummaryWriter

    for row, curve in zip(rows, curves):
        with SummaryWriter(str(log_dir / f"bs{row['batch_size']}")) as writer:
            for tokens, loss in zip(curve.tokens, curve.val_loss):
                writer.add_scalar("study/val_loss_vs_tokens", loss, int(tokens))
            hparams = {k: row[k] for k in ("batch_size", "lr", "micro_batch_size", "grad_accum_steps")}
            metrics = {
                f"study/{k}": float(v)
                for k, v in row.items()
                if k not in hparams and isinstance(v, int | float) and math.isfinite(v)
            }
            writer.add_hparams(hparams, metrics, run_name=".")
    with SummaryWriter(str(log_dir / "summary")) as writer:
        for name, fig in figures.items():
            writer.add_figure(f"study/{name}", fig, 0)
