"""Learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks").

    python recipes/lr_find.py                                           # the `shakespeare` teacher
    python recipes/lr_find.py --preset tiny --data DIR --out DIR        # CPU, seconds
    python recipes/lr_find.py --preset char --max-steps 200 --start-lr 1e-5 --rule valley
    python recipes/lr_find.py --preset NAME --train.micro-batch-size 8 --train.grad-accum-steps 4
    accelerate launch --config_file launch/gpu.yaml recipes/lr_find.py --preset seed

The preset's model starts from its initial weights (--train.seed) and takes --max-steps optimizer
steps on the training windows while the learning rate rises geometrically from --start-lr to
--end-lr: AdamW with the preset's betas, weight decay, per-group multipliers and clipping, no
warmup or decay. Each step's training loss is smoothed (a bias-corrected moving average), and the
test stops once the smoothed loss exceeds --diverge times its lowest value. The suggestion is
read off the finished curve, smoothed forwards and backwards (no lag), by --rule: `steepest`,
where the loss falls fastest per log-LR (searched before the minimum), or `valley`, the
minimum's learning rate / 10. Use it as --optim.lr of a pretrain run at the same batch size
(with the usual warmup).

Writes to the run folder (default runs/lr_find/<preset>-<time>): config.json, env.json,
metrics.jsonl (per step: lr, loss, smoothed loss), result.json (the suggestion, what each rule
gives, the minimum, where the test stopped), lr_find.png and tb/ (the curve and the figure).
"""

from __future__ import annotations

import os
import sys

# recipes/tokenize.py shares its name with the standard library's `tokenize`, which torch imports:
# keep this folder off the import path (no recipe imports another).
sys.path = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from pipeline import accel, cli
from pipeline.cli import to_dict
from pipeline.model.gpt import GPT
from pipeline.run.folder import RunDir
from pipeline.run.tracking import Reporter
from pipeline.studies import lr_find
from pipeline.studies.config import LRFindConfig
from pipeline.train import stage
from pipeline.train.batching import plan_batches
from pipeline.train.loop import accumulate, optimizer_step
from pipeline.train.losses import CrossEntropyHead
from teachers import PRESETS as TEACHERS

PRESETS = {name: (lambda fn=fn: LRFindConfig.from_pretrain(fn())) for name, fn in TEACHERS.items()}


def lm_loss(model, batch):
    """Summed next-token cross-entropy of a (x, y) batch, as in recipes/pretrain.py."""
    x, y = batch
    return model(x, head_fn=CrossEntropyHead(y)), {}


def train_step(
    ctx: stage.RunContext,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list,
    cfg: LRFindConfig,
    lr: float,
) -> float:
    """One optimizer step at `lr` with the training loop's own accumulation and optimizer step.

    Returns the step's mean loss per token over all processes, normalised as in the training loop
    (by the step's valid tokens across accumulation and processes), so a learning rate found here
    means the same in pretrain; NaN when the gradient was not finite (the step is then skipped).
    """
    acc = ctx.accelerator
    step = accumulate(acc, model, batches, lm_loss)
    _, stepped = optimizer_step(acc, model, optimizer, cfg.optim.grad_clip, lr)
    optimizer.zero_grad(set_to_none=True)
    total = acc.reduce(step.loss, "sum") if acc.num_processes > 1 else step.loss
    return float(total) / max(float(step.n_global), 1.0) if stepped else math.nan


def range_test(
    cfg: LRFindConfig,
    ctx: stage.RunContext,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    windows,
) -> tuple[np.ndarray, list[float], str]:
    """Step through the rising learning rates; the rates tried, their losses, and why it stopped."""
    lrs = lr_find.exp_lrs(cfg.start_lr, cfg.end_lr, ctx.plan.total_steps)
    losses: list[float] = []
    lowest, average = math.inf, 0.0
    for step, lr in enumerate(lrs):
        batches = [windows.batch(step, m) for m in range(ctx.plan.grad_accum_steps)]
        losses.append(train_step(ctx, model, optimizer, batches, cfg, float(lr)))
        average = cfg.smoothing * average + (1 - cfg.smoothing) * losses[-1]
        smoothed = average / (1 - cfg.smoothing ** (step + 1))  # as lr_find.smooth, one point at a time
        ctx.report.scalars(
            step + 1, {"lr": lr, "log10_lr": math.log10(lr), "loss": losses[-1], "smoothed_loss": smoothed}
        )
        ctx.report.progress(step + 1, lr=f"{lr:.2e}", loss=f"{smoothed:.4f}")
        if not math.isfinite(losses[-1]):
            return lrs[: step + 1], losses, f"non-finite loss at lr {lr:.3g}"
        if smoothed > cfg.diverge * lowest:
            return (
                lrs[: step + 1],
                losses,
                f"diverged at lr {lr:.3g} (smoothed loss > {cfg.diverge} x its minimum)",
            )
        lowest = min(lowest, smoothed)
    return lrs, losses, f"reached --end-lr {cfg.end_lr:g}"


def analyse(
    cfg: LRFindConfig, lrs: np.ndarray, losses: list[float], stopped: str, run: RunDir, report: Reporter
) -> dict[str, Any]:
    """The suggestion from the finished curve, as a figure (PNG, TensorBoard) and a message."""
    smoothed = lr_find.smooth(losses, cfg.smoothing, centered=True)
    suggestion = lr_find.suggest_lr(lrs, smoothed, cfg.rule)
    figure = lr_find.plot_lr_find(lrs, losses, smoothed, suggestion)
    if run.main:
        figure.savefig(run.path / "lr_find.png", dpi=120)
    report.image("lr_find", figure, len(losses))
    message = (
        f"suggested learning rate {suggestion['suggested_lr']:.3g} ({cfg.rule}; steepest "
        f"{suggestion['steepest_lr']:.3g}, valley {suggestion['valley_lr']:.3g}, minimum at "
        f"{suggestion['min_loss_lr']:.3g}); stopped: {stopped}"
    )
    report.text("lr_find/suggestion", message, len(losses))
    report.print(message)
    if not suggestion["falling"]:
        report.print("warning: the loss never fell below its start: lower --start-lr or raise --max-steps")
    return suggestion | {
        "stopped": stopped,
        "steps": len(losses),
        "start_lr": cfg.start_lr,
        "end_lr": float(lrs[-1]),
        "initial_loss": float(smoothed[0]),
    }


def main(cfg: LRFindConfig) -> dict[str, Any]:
    accelerator = accel.build_accelerator(
        cfg.train.precision,
        log_with="tensorboard",
        threads=cfg.train.threads,
        dist_timeout=cfg.train.dist_timeout,
    )
    data, vocab, data_cfg, model_cfg = stage.resolve_lm(accelerator, cfg.data, cfg.model, cfg.train.progress)
    cfg = dataclasses.replace(cfg, data=data_cfg, model=model_cfg)
    plan = plan_batches(cfg.train, cfg.data.seq_len, accelerator.num_processes, len(data.train))
    run, _ = stage.open_run(accelerator, "lr_find", cfg.preset, cfg.out, resume="")

    torch.manual_seed(cfg.train.seed)  # the same initial weights as a pretrain run with this seed
    model, optimizer, _ = stage.prepare_model(accelerator, GPT(model_cfg), cfg.train, cfg.optim)
    model = torch.compile(model) if cfg.train.compile else model  # only training steps run here
    report = Reporter(accelerator, run, plan.total_steps, 0, cfg.train.progress)
    stage.write_run_files(run, accelerator, to_dict(cfg))
    report.print(f"run folder: {run.path}")
    report.print(plan.describe())
    report.print(
        f"learning rates: {cfg.start_lr:g} to {cfg.end_lr:g} over {plan.total_steps} steps (geometric)"
    )
    ctx = stage.RunContext(accelerator, run, report, data, vocab, plan)
    windows = stage.train_windows(ctx, cfg.train, cfg.data.sampling)
    lrs, losses, stopped = range_test(cfg, ctx, model, optimizer, windows)
    result = analyse(cfg, lrs, losses, stopped, run, report)
    result |= {"sequences_per_step": plan.sequences_per_step, "tokens_per_step": plan.tokens_per_step}
    run.write_result(result)
    report.print(f"wrote {run.path / 'result.json'} and {run.path / 'lr_find.png'}")
    report.close()
    return result


if __name__ == "__main__":
    cli.run(main, cli.parse(LRFindConfig, PRESETS))
