"""Distillation batches: data windows, cached teacher outputs, or on-policy prompts, chosen per micro-step."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from pipeline.data.shards import TrainWindows
from pipeline.distill.config import OnPolicyConfig
from pipeline.train.losses import IGNORE


class DistillBatches:
    """batch_fn for the loop: (x, y), (x, y, ids, logp, tail) with the cache, or an on-policy (prompt, y).

    An on-policy micro-batch is recognised by its shape alone (prompt shorter than y, no host sync):
    y marks the positions whose continuation the student will generate (the rest are IGNORE), so
    the loop counts the right number of tokens before the generation happens. Which micro-batches
    are on-policy is a pure function of (seed, step, micro-step), the same on every rank.
    """

    def __init__(
        self,
        windows: TrainWindows,
        on_policy: OnPolicyConfig,
        seed: int,
        cache: Any = None,
        layerwise_steps: int = 0,
    ) -> None:
        self.windows, self.on_policy, self.seed, self.cache = windows, on_policy, seed, cache
        self.layerwise_steps = layerwise_steps  # the layer-wise phase reads data windows and the live teacher

    def is_on_policy(self, step: int, micro_step: int) -> bool:
        if self.on_policy.fraction <= 0 or step < self.layerwise_steps:
            return False
        rng = np.random.default_rng([self.seed, step, micro_step, 0x6F6E])
        return bool(rng.random() < self.on_policy.fraction)

    def __call__(self, step: int, micro_step: int) -> tuple[Tensor, ...]:
        x, y = self.windows.batch(step, micro_step)
        if self.is_on_policy(step, micro_step):
            prompt = self.on_policy.prompt_len
            y = y.clone()
            y[:, : prompt - 1] = IGNORE
            return x[:, :prompt].contiguous(), y
        if self.cache is None or step < self.layerwise_steps:
            return x, y
        ids, logp, tail = self.cache.rows(self.windows.starts(step, micro_step) // self.windows.seq_len)
        return x, y, ids, logp, tail
