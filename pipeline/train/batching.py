"""Batch sizes in units: micro-batch, accumulation, processes, sequences and tokens per step, and the step budget.

Every stage and study that needs this arithmetic calls these functions: the training loop, the
learning-rate range test and the batch-size scaling study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import TrainConfig
from pipeline.errors import UsageError


@dataclass(frozen=True)
class BatchPlan:
    """One run's batch layout and step budget: what every process does per optimizer step."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    seq_len: int
    windows_per_epoch: int
    total_steps: int

    @property
    def sequences_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len

    def epoch(self, step: int) -> float:
        return step * self.sequences_per_step / self.windows_per_epoch

    def describe(self) -> str:
        return (
            f"batch: {self.micro_batch_size} sequences x {self.grad_accum_steps} accumulation x {self.world_size} "
            f"processes = {self.sequences_per_step} sequences = {self.tokens_per_step:,} tokens per optimizer step "
            f"(seq_len {self.seq_len}); {self.total_steps:,} steps = {self.epoch(self.total_steps):.2f} epochs "
            f"of {self.windows_per_epoch:,} windows"
        )


def plan_batches(train: TrainConfig, seq_len: int, world_size: int, train_tokens: int) -> BatchPlan:
    """Batch sizes and the step budget, computed and checked in one place."""
    windows = train_tokens // seq_len - 1
    per_step = train.micro_batch_size * train.grad_accum_steps * world_size
    budgets = []
    if train.max_steps:
        budgets.append(train.max_steps)
    if train.max_tokens:
        budgets.append(steps_for_tokens(train.max_tokens, per_step * seq_len))
    if train.max_epochs:
        budgets.append(math.ceil(train.max_epochs * windows / per_step))
    return BatchPlan(
        train.micro_batch_size,
        train.grad_accum_steps,
        world_size,
        seq_len,
        max(windows, 1),
        max(1, min(budgets)),
    )


def steps_for_tokens(tokens: int, tokens_per_step: int) -> int:
    """Optimizer steps that a budget of `tokens` takes: the last step may run past it."""
    return math.ceil(tokens / tokens_per_step)


def split_batch(sequences: int, max_micro_batch: int, world_size: int) -> tuple[int, int]:
    """(micro_batch_size, grad_accum_steps) for `sequences` per optimizer step over `world_size` processes.

    The micro-batch is the largest one up to `max_micro_batch` that divides each process's share,
    so every step sees exactly `sequences` sequences.
    """
    if sequences % world_size:
        raise UsageError(
            f"batch size {sequences} is not a multiple of the {world_size} processes of each run; "
            f"pick batch sizes divisible by {world_size}"
        )
    per_process = sequences // world_size
    micro = max(d for d in range(1, min(max_micro_batch, per_process) + 1) if per_process % d == 0)
    return micro, per_process // micro
