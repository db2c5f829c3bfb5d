"""What a run reports: TensorBoard (through Accelerate's tracker), metrics.jsonl, and a progress bar.

All of it happens on the main process only. TensorBoard events go to <run>/tb/, so
`tensorboard --logdir runs` shows every run of every stage side by side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.tensorboard.summary import hparams as hparams_summary
from tqdm.auto import tqdm

from pipeline.run.folder import RunDir

TB_NAME = "tb"


def _flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        elif value is None:
            out[name] = "none"
        else:
            out[name] = str(value)
    return out


class Reporter:
    """Scalars, text, histograms and embeddings to TensorBoard; records to metrics.jsonl; a tqdm bar."""

    def __init__(
        self, accelerator: Accelerator, run: RunDir, total_steps: int, initial_step: int, progress: bool
    ) -> None:
        self.accelerator, self.run = accelerator, run
        self.main = accelerator.is_main_process
        accelerator.project_configuration.project_dir = str(run.path)
        accelerator.project_configuration.logging_dir = str(run.path)
        accelerator.init_trackers(TB_NAME)
        self.writer = accelerator.get_tracker("tensorboard", unwrap=True) if self.main else None
        self._bar_args = {
            "total": total_steps,
            "initial": initial_step,
            "disable": not (self.main and progress),
        }
        self._bar: tqdm | None = None
        self.renames: dict[str, str] = {}  # metrics.jsonl key -> TensorBoard tag, where a stage's differ
        self._embedded: set[tuple[str, int]] = set()  # projector snapshots written: one per (tag, step)

    @property
    def bar(self) -> tqdm:
        # Created at the first step, so that start-up messages print above it.
        if self._bar is None:
            self._bar = tqdm(unit="step", dynamic_ncols=True, **self._bar_args)
        return self._bar

    def scalars(self, step: int, values: dict[str, float], record: bool = True) -> None:
        """One metrics.jsonl line (with `record`) and TensorBoard scalars under tag(name)."""
        values = {k: float(v) for k, v in values.items() if v is not None}
        self.accelerator.log(
            {tag(k, self.renames): v for k, v in values.items() if math.isfinite(v)}, step=step
        )
        if record:
            self.run.log_metrics({"step": step, **{k: _clean(v) for k, v in values.items()}})

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            # TensorBoard renders markdown; a code block keeps the model's line breaks.
            self.writer.add_text(tag, "```\n" + text + "\n```", step)

    def markdown(self, tag: str, text: str, step: int = 0) -> None:
        """Markdown (tables, lists) to TensorBoard's Text dashboard: where single numbers of a run go."""
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def layout(self, charts: dict[str, dict[str, list[str]]]) -> None:
        """The Custom Scalars dashboard: {category: {chart title: [tag regexes]}}, tags overlaid on one chart."""
        if self.writer is not None:
            self.writer.add_custom_scalars(
                {
                    cat: {title: ["Multiline", tags] for title, tags in group.items()}
                    for cat, group in charts.items()
                }
            )

    def histograms(self, model: torch.nn.Module, step: int) -> None:
        if self.writer is None:
            return
        for name, p in model.named_parameters():
            self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)
            if p.grad is not None:
                self.writer.add_histogram(f"grads/{name}", p.grad.detach().float().cpu(), step)

    def embedding(self, matrix: torch.Tensor, labels: list[str], step: int, tag: str) -> None:
        """A projector snapshot under <tb>/<step>/<tag>; a second one of the same tag and step is not written."""
        if self.writer is not None and (tag, step) not in self._embedded:
            self._embedded.add((tag, step))
            self.writer.add_embedding(
                matrix.detach().float().cpu(), metadata=labels, global_step=step, tag=tag
            )

    def image(self, tag: str, figure: Any, step: int) -> None:
        if self.writer is not None:
            self.writer.add_figure(tag, figure, step)

    def heatmap(
        self, tag: str, values: torch.Tensor, step: int, low: float = -1.0, high: float = 1.0
    ) -> None:
        """A (H, W) matrix as a grey image (low black, high white); no plotting library needed."""
        if self.writer is not None:
            scaled = ((values.detach().float().cpu() - low) / (high - low)).clamp(0.0, 1.0)
            self.writer.add_image(tag, scaled[None], step, dataformats="CHW")

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """The HParams dashboard's row of this run: its settings (flattened when nested) and final metrics.

        TensorBoard lists the columns alphabetically and ticks only the first five: callers pass the
        few settings that tell runs apart (stage.run_hparams), not the whole config.
        """
        if self.writer is not None:
            clean = {f"hparam/{k}": v for k, v in metrics.items() if v is not None and math.isfinite(v)}
            # Into the run's own events, not add_hparams' sub-run: no extra `<run>/tb/hparams` run.
            for summary in hparams_summary(_flat_hparams(hparams), clean):
                self.writer.file_writer.add_summary(summary)
            for k, v in clean.items():
                self.writer.add_scalar(k, v)

    def progress(self, step: int, **postfix: Any) -> None:
        self.bar.update(step - self.bar.n)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def print(self, message: str) -> None:
        if not self.main:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def end_progress(self) -> None:
        """Close the progress bar, so that closing lines print below it once (not redrawn after them)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._bar_args["disable"] = True

    def close(self) -> None:
        self.end_progress()
        if self.writer is not None:
            self.writer.flush()
        self.accelerator.end_training()


LOSS_TAGS = {"loss": "Loss/train", "val_loss": "Loss/val", "train_clean_loss": "Loss/train_clean"}
"""The losses' tags. TensorBoard sorts tag groups case-sensitively and opens the first two, so the
capitalised groups Loss/ and Val/ come first and open, above the lowercase diagnostic groups."""


def tag(name: str, renames: Mapping[str, str] | None = None) -> str:
    """TensorBoard tag of a metrics.jsonl key: `renames` first, then loss -> Loss/train, val_loss -> Loss/val,
    train_clean_loss -> Loss/train_clean, val_X -> Val/X, train_X -> train/X, X -> train/X; a/b stays a/b."""
    if renames and name in renames:
        return renames[name]
    if "/" in name:
        return name
    if name in LOSS_TAGS:
        return LOSS_TAGS[name]
    if name.startswith("val_"):
        return f"Val/{name[4:]}"
    if name.startswith("train_"):
        return f"train/{name[6:]}"
    return f"train/{name}"


def _clean(value: float) -> float | None:
    return value if math.isfinite(value) else None
