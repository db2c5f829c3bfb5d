"""Evaluation-time probes of a training run: attention entropy per head and a text sample, logged to TensorBoard."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.config import TrainConfig
from pipeline.data.tokenizer import Tokenizer
from pipeline.eval.teacher_forced import attention_scalars, attention_stats
from pipeline.model.generation import SamplingConfig, generate
from pipeline.train.stage import RunContext


def make_probe(
    ctx: RunContext, model: torch.nn.Module, probe_batch: torch.Tensor, train: TrainConfig
) -> Callable[[int], None]:
    """probe_fn: attention entropy per head and a text sample at every evaluation (rank 0).

    The sample draws from its own seeded generator, so probing never moves the training RNG.
    """
    accelerator, report, vocab, tokenizer = ctx.accelerator, ctx.report, ctx.vocab, ctx.data.tokenizer

    def probe(step: int) -> None:
        stats = attention_stats(model, probe_batch.to(accelerator.device))
        report.scalars(step, attention_scalars(stats), record=False)
        if train.sample_tokens and accelerator.is_main_process:
            raw = accelerator.unwrap_model(model)
            ids = torch.as_tensor(vocab.to_compact(_encode(tokenizer, train.sample_prompt)))[None].to(
                accelerator.device
            )
            generator = torch.Generator(device=accelerator.device).manual_seed(train.seed)
            sampling = SamplingConfig(max_new_tokens=train.sample_tokens, temperature=0.8, top_k=200)
            with accelerator.autocast():
                out = generate(raw, ids, sampling, generator, vocab=vocab)
            text = tokenizer.decode(
                vocab.to_full(out[0][out[0] >= 0], generator=torch.Generator().manual_seed(train.seed))
            )
            report.text("samples", text, step)

    return probe


def _encode(tokenizer: Tokenizer, prompt: str):
    import numpy as np

    ids = tokenizer.encode(prompt) if prompt else []
    return np.asarray(ids or [0], dtype=np.int64)
