"""Evaluation-time probes of a training run: attention entropy and per-head diagnostics, and a text sample, logged to TensorBoard.

At every evaluation (and the step-0 one), on the probe batch, rank 0 only (--train.probe.* switch
each part; pipeline/eval/heads.py computes them):

    attention/score_std_raw|score_std|score_range_raw|score_range/layerL_headH   QK^T before/after 1/sqrt(d_head)
    attention/entropy_by_context/layerL_ctxN   mean entropy of rows seeing N..2N-1 keys (mean over heads)
    attention_images/entropy_vs_context        entropy against log2 visible keys per layer and head, ln(n) dashed
    attention/prev_token/layerL_headH          mean probability on the previous token
    heads/importance/layerL_headH              val-loss increase when the head alone is ablated
    heads/similarity/layerL (image), heads/max_similarity/layerL   cosine similarity of heads' maps
    attention_maps/layerL                      the heads' maps over the first map_tokens positions
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.config import ProbeConfig, TrainConfig
from pipeline.data.shards import eval_batches
from pipeline.data.tokenizer import Tokenizer
from pipeline.eval import heads
from pipeline.eval.teacher_forced import attention_scalars, attention_stats
from pipeline.model.generation import SamplingConfig, generate
from pipeline.run.tracking import Reporter
from pipeline.train.stage import RunContext


def make_probe(
    ctx: RunContext, model: torch.nn.Module, probe_batch: torch.Tensor, train: TrainConfig
) -> Callable[[int], None]:
    """probe_fn: attention entropy per head, the per-head diagnostics and a text sample at every evaluation.

    The sample draws from its own seeded generator, so probing never moves the training RNG; the
    diagnostics run on rank 0 without collectives, in eval mode, and leave the weights as they were.
    """
    accelerator, report, vocab, tokenizer = ctx.accelerator, ctx.report, ctx.vocab, ctx.data.tokenizer
    diagnose = _head_probe(ctx, model, probe_batch, train.probe) if accelerator.is_main_process else None

    def probe(step: int) -> None:
        stats = attention_stats(model, probe_batch.to(accelerator.device))
        report.scalars(step, attention_scalars(stats), record=False)
        if diagnose is not None:
            diagnose(step)
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


def _head_probe(
    ctx: RunContext, model: torch.nn.Module, probe_batch: torch.Tensor, cfg: ProbeConfig
) -> Callable[[int], None]:
    """Rank 0's per-head diagnostics of the plain model (no DDP wrapper, so no collective)."""
    accelerator, report = ctx.accelerator, ctx.report
    importance: list = []  # the ablation's fixed val windows, cut at the first call

    def diagnose(step: int) -> None:
        raw = accelerator.unwrap_model(model)
        raw = getattr(raw, "_orig_mod", raw)  # hooks go on the eager module under --train.compile
        layers = heads.attention_layers(raw)
        if not layers:
            return  # an FFN-only model has no heads
        log_attention_diagnostics(report, raw, probe_batch.to(accelerator.device), cfg, step)
        if cfg.importance and len(layers) * raw.cfg.n_heads > 1:
            if not importance:
                plan = ctx.plan
                budget, batch = cfg.importance_tokens, plan.micro_batch_size
                importance.extend(eval_batches(ctx.data.val, plan.seq_len, budget, batch, vocab=ctx.vocab))
            with accelerator.autocast():
                _, scores = heads.ablation_scores(
                    raw, lambda m: heads.local_val_loss(m, importance, ctx.vocab)
                )
            report.scalars(step, heads.per_head_scalars("heads/importance", scores), record=False)

    return diagnose


def log_attention_diagnostics(
    report: Reporter, model: torch.nn.Module, x: torch.Tensor, cfg: ProbeConfig, step: int
) -> None:
    """Score statistics, entropy by context, previous-token share, head similarity and maps of `model` on x (B, T)."""
    if not (cfg.scores or cfg.entropy_by_context or cfg.prev_token or cfg.similarity or cfg.maps):
        return
    raw, probs = heads.capture_attention(model, x)
    causal = heads.is_causal(model)
    scalars: dict[str, float] = {}
    if cfg.scores:
        for name, values in heads.score_stats(raw, model.cfg.head_dim, causal).items():
            scalars |= heads.per_head_scalars(f"attention/{name}", values)
    if cfg.entropy_by_context:
        rows = heads.entropy_by_row(probs)
        visible = heads.visible_keys(x.shape[1], x.shape[1], causal)
        for n, per_layer in heads.entropy_by_context(rows, visible).items():
            scalars |= {
                f"attention/entropy_by_context/layer{i}_ctx{n}": float(v) for i, v in enumerate(per_layer)
            }
        report.image(
            "attention_images/entropy_vs_context", heads.plot_entropy_vs_context(rows, visible), step
        )
    if cfg.prev_token:
        scalars |= heads.per_head_scalars("attention/prev_token", heads.prev_token_share(probs))
    for layer, p in enumerate(probs):
        if cfg.similarity:
            similarity = heads.head_similarity(p)
            if similarity.shape[0] > 1:
                scalars[f"heads/max_similarity/layer{layer}"] = heads.max_similarity(similarity)
            report.image(f"heads/similarity/layer{layer}", heads.plot_similarity(similarity, layer), step)
        if cfg.maps:
            n = min(cfg.map_tokens, p.shape[-1])
            maps = p[:, :, :n, :n].mean(dim=0)  # (H, n, n); causal rows of a prefix see only the prefix
            report.image(f"attention_maps/layer{layer}", heads.plot_head_maps(maps, layer), step)
    report.scalars(step, scalars, record=False)


def _encode(tokenizer: Tokenizer, prompt: str):
    import numpy as np

    ids = tokenizer.encode(prompt) if prompt else []
    return np.asarray(ids or [0], dtype=np.int64)
