"""Autoregressive generation with a KV cache.

Context longer than the model's max_seq_len (exercise H9.5): with learned or sinusoidal (absolute)
positions the context slides, keeping the last max_seq_len tokens and recomputing their cache; with
RoPE or ALiBi (relative) the oldest cached keys are dropped and generation continues at growing
absolute positions, which these encodings only see as distances.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.model import GPT, KVCache


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    use_cache: bool = True


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of (B, V) logits."""
    logits = logits.float() / max(temperature, 1e-8)
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def next_token(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    if cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT, prompt: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
) -> Tensor:
    """prompt (B, P) class ids -> (B, P + max_new_tokens)."""
    was_training = model.training
    model.eval()
    window = model.cfg.max_seq_len
    relative = model.cfg.positions in ("rope", "alibi", "none")
    tokens = prompt
    cache: KVCache | None = None
    for _ in range(cfg.max_new_tokens):
        if not cfg.use_cache:
            logits = model(tokens[:, -window:], last_only=True)[:, -1]
        elif cache is None or (not relative and cache.next_pos >= window):
            cache = KVCache.empty(len(model.blocks))  # (re)start: the whole visible context
            logits = model(tokens[:, -window:], cache=cache, last_only=True)[:, -1]
        else:
            if cache.length >= window:
                cache.drop_oldest(cache.length - window + 1)
            logits = model(tokens[:, -1:], cache=cache)[:, -1]
        tokens = torch.cat((tokens, next_token(logits, cfg, generator)[:, None]), dim=1)
    if was_training:
        model.train()
    return tokens
