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

import contextlib
import dataclasses
import math
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from pipeline import accel, cli
from pipeline.cli import to_dict
from pipeline.data.shards import TrainWindows
from pipeline.model.gpt import GPT
from pipeline.run.folder import RunDir
from pipeline.run.tracking import Reporter
from pipeline.studies import lr_find as sweep
from pipeline.studies.config import LRFindConfig
from pipeline.train import stage
from pipeline.train.batching import BatchPlan, plan_batches
from pipeline.train.losses import IGNORE, CrossEntropyHead
from pipeline.train.optim import set_lr
from teachers import PRESETS as TEACHERS

PRESETS = {name: (lambda fn=fn: LRFindConfig.from_pretrain(fn())) for name, fn in TEACHERS.items()}


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    grad_clip: float,
) -> float:
    """One optimizer step over the step's micro-batches; their mean loss per token, over all processes.

    The loss is normalised as in the training loop (by the step's valid tokens across accumulation
    and processes), so a learning rate found here means the same in pretrain.
    """
    device, world = accelerator.device, accelerator.num_processes
    n_local = torch.tensor(float(sum(int((y != IGNORE).sum()) for _, y in batches)), device=device)
    n_global = float(accelerator.reduce(n_local, "sum") if world > 1 else n_local)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for m, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        sync = contextlib.nullcontext() if m == len(batches) - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                loss_sum = model(x, head_fn=CrossEntropyHead(y))
            accelerator.backward(loss_sum * (world / n_global))
        total += loss_sum.detach().double()
    accelerator.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(accelerator.reduce(total, "sum") if world > 1 else total) / max(n_global, 1.0)


def range_test(
    cfg: LRFindConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    windows: TrainWindows,
    plan: BatchPlan,
    report: Reporter,
) -> tuple[np.ndarray, list[float], str]:
    """Step through the rising learning rates; the rates tried, their losses, and why it stopped."""
    lrs = sweep.exp_lrs(cfg.start_lr, cfg.end_lr, plan.total_steps)
    losses: list[float] = []
    lowest, average = math.inf, 0.0
    for step, lr in enumerate(lrs):
        set_lr(optimizer, float(lr))
        batches = [windows.batch(step, m) for m in range(plan.grad_accum_steps)]
        losses.append(train_step(accelerator, model, optimizer, batches, cfg.optim.grad_clip))
        average = cfg.smoothing * average + (1 - cfg.smoothing) * losses[-1]
        smoothed = average / (1 - cfg.smoothing ** (step + 1))  # as sweep.smooth, one point at a time
        report.scalars(
            step + 1, {"lr": lr, "log10_lr": math.log10(lr), "loss": losses[-1], "smoothed_loss": smoothed}
        )
        report.progress(step + 1, lr=f"{lr:.2e}", loss=f"{smoothed:.4f}")
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
    smoothed = sweep.smooth(losses, cfg.smoothing, centered=True)
    suggestion = sweep.suggest_lr(lrs, smoothed, cfg.rule)
    figure = sweep.plot_lr_find(lrs, losses, smoothed, suggestion)
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
        cfg.train.precision, log_with="tensorboard", threads=cfg.train.threads
    )
    data, vocab, data_cfg, model_cfg = stage.resolve_lm(accelerator, cfg.data, cfg.model, cfg.train.progress)
    cfg = dataclasses.replace(cfg, data=data_cfg, model=model_cfg)
    plan = plan_batches(cfg.train, cfg.data.seq_len, accelerator.num_processes, len(data.train))
    run, _ = stage.open_run(accelerator, "lr_find", cfg.preset, cfg.out, resume="")

    torch.manual_seed(cfg.train.seed)  # the same initial weights as a pretrain run with this seed
    model, optimizer, _ = stage.prepare_model(accelerator, GPT(model_cfg), cfg.train, cfg.optim)
    report = Reporter(accelerator, run, plan.total_steps, 0, cfg.train.progress)
    stage.write_run_files(run, accelerator, to_dict(cfg))
    report.print(f"run folder: {run.path}")
    report.print(plan.describe())
    report.print(
        f"learning rates: {cfg.start_lr:g} to {cfg.end_lr:g} over {plan.total_steps} steps (geometric)"
    )
    windows = stage.train_windows(accelerator, data, plan, cfg.train, vocab, cfg.data.sampling)
    lrs, losses, stopped = range_test(cfg, accelerator, model, optimizer, windows, plan, report)
    result = analyse(cfg, lrs, losses, stopped, run, report)
    result |= {"sequences_per_step": plan.sequences_per_step, "tokens_per_step": plan.tokens_per_step}
    run.write_result(result)
    report.print(f"wrote {run.path / 'result.json'} and {run.path / 'lr_find.png'}")
    report.close()
    return result


if __name__ == "__main__":
    cli.run(main, cli.parse(LRFindConfig, PRESETS))
