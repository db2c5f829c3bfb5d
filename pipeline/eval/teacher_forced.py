"""Teacher-forced evaluation on a fixed set of validation windows, and attention statistics.

Loss is in nats per token over the full vocabulary (compacted models pay log(V - K) extra for
unseen ids), so it compares across models of one tokenizer; bits per byte also compares across
tokenizers: loss / ln 2 * tokens / bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from pipeline.data.vocab import VocabMap
from pipeline.train.losses import LN2, token_stats


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    accelerator: Accelerator,
    vocab: VocabMap,
    bytes_per_token: float,
    prefix: str = "val",
) -> dict[str, float]:
    """loss, perplexity, bits per byte, top-1/top-5 accuracy and ECE over `batches` (all ranks)."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nll, top1, top5, tokens
    bins = torch.zeros(3, 15, dtype=torch.float64, device=device)  # count, confidence, correct per bin
    for x, y in batches:
        x, y = x.to(device), y.to(device)

        def head(hidden: Tensor, weight: Tensor, y: Tensor = y):
            return token_stats(hidden, weight, y, vocab.other, vocab.log_unseen)

        with accelerator.autocast():
            nll, top1, top5, pmax = model(x, head_fn=head)
        n = torch.tensor(float(nll.numel()), device=device, dtype=torch.float64)
        sums += torch.stack([nll.double().sum(), top1.double().sum(), top5.double().sum(), n])
        which = (pmax.double() * 15).long().clamp(max=14)
        bins[0].index_add_(0, which, torch.ones_like(pmax, dtype=torch.float64))
        bins[1].index_add_(0, which, pmax.double())
        bins[2].index_add_(0, which, top1.double())
    sums = accelerator.reduce(sums, "sum")
    bins = accelerator.reduce(bins, "sum")
    if was_training:
        model.train()
    nll, top1, top5, count = (float(v) for v in sums)
    count = max(count, 1.0)
    loss = nll / count
    ece = float((bins[1] - bins[2]).abs().sum()) / count
    return {
        f"{prefix}_loss": loss,
        f"{prefix}_ppl": math.exp(min(loss, 50.0)),
        f"{prefix}_bpb": loss / LN2 / bytes_per_token,
        f"{prefix}_top1": top1 / count,
        f"{prefix}_top5": top5 / count,
        f"{prefix}_ece": ece,
        f"{prefix}_tokens": count,
    }


@torch.no_grad()
def attention_stats(model: torch.nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Per layer and head: mean entropy (nats) and mean max-probability of the attention rows.

    Rows near the start of a window can only spread over few keys, so entropy is also reported
    normalised by its maximum, log(number of visible keys). Returns tensors of shape (L, H); (0, H)
    for a model without attention.
    """
    was_training = model.training
    model.eval()
    _, probs = model(x, need_weights=True, last_only=True)
    if was_training:
        model.train()
    if not probs:  # an FFN-only model
        n_heads = getattr(getattr(model, "cfg", None), "n_heads", 0)
        empty = torch.zeros(0, n_heads, device=x.device)
        return {"entropy": empty, "entropy_normalised": empty, "max_prob": empty}
    entropy, normalised, max_prob = [], [], []
    for p in probs:  # (B, H, T, S)
        p = p.float()
        ent = -(p * p.clamp_min(1e-12).log()).sum(-1)  # (B, H, T)
        visible = torch.arange(1, p.shape[-2] + 1, device=p.device).float().log().clamp_min(1e-6)
        entropy.append(ent.mean(dim=(0, 2)))
        normalised.append((ent[:, :, 1:] / visible[1:]).mean(dim=(0, 2)))
        max_prob.append(p.max(dim=-1).values.mean(dim=(0, 2)))
    return {
        "entropy": torch.stack(entropy),
        "entropy_normalised": torch.stack(normalised),
        "max_prob": torch.stack(max_prob),
    }


def attention_scalars(stats: dict[str, Tensor]) -> dict[str, float]:
    out = {}
    for name, values in stats.items():
        for layer, row in enumerate(values):
            for head, v in enumerate(row):
                out[f"attention/{name}/layer{layer}_head{head}"] = float(v)
    return out


@torch.no_grad()
def attention_summary(model: torch.nn.Module, x: Tensor, threshold: float, map_tokens: int) -> dict[str, Any]:
    """Entropy and max-probability per layer and head on val windows x (B, T), collapse flags, and the
    batch-averaged attention maps of the first `map_tokens` positions, (L, H, n, n)."""
    stats = attention_stats(model, x)
    _, probs = model(x[:, :map_tokens], need_weights=True, last_only=True)
    n = min(map_tokens, x.shape[1])
    maps = (
        torch.stack([p.float().mean(dim=0) for p in probs]) if probs else torch.zeros(0, 0, n, n)
    )  # (L, H, n, n)
    max_prob = stats["max_prob"]
    return {
        "entropy": stats["entropy"].tolist(),
        "entropy_normalised": stats["entropy_normalised"].tolist(),
        "max_prob": max_prob.tolist(),
        "collapse_threshold": threshold,
        "collapsed": (max_prob > threshold).nonzero().tolist(),  # [[layer, head], ...]
        "maps": maps.cpu().numpy(),
    }
