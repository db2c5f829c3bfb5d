"""GPTs whose next-token behaviour is known exactly, for generation and metric tests.

Each is a real `GPT` (so generation, the KV cache and scoring run their normal paths) with weights
set by hand: one-hot token embeddings (d_model = V), attention whose output projection is zero (so
the residual stream is just the current token), no LayerNorm or FFN, positions `none`, and an LM
head that maps the current token to the logits we want.
"""

from __future__ import annotations

import torch

from pipeline.config import ModelConfig
from pipeline.model.gpt import GPT

SCALE = 20.0  # logit gap: the chosen token gets probability 1 - (V - 1) e^-20


def _hand_set(vocab: int, head: torch.Tensor, max_seq_len: int) -> GPT:
    cfg = ModelConfig(
        n_layers=1,
        n_heads=1,
        d_model=vocab,
        max_seq_len=max_seq_len,
        vocab_size=vocab,
        positions="none",
        layernorm=False,
        ffn=False,
    )
    model = GPT(cfg)
    with torch.no_grad():
        model.tok_emb.weight.copy_(torch.eye(vocab))
        model.blocks[0].attn.proj.weight.zero_()
        model.blocks[0].attn.proj.bias.zero_()
        model.head.weight.copy_(head)
    return model.eval()


def copy_model(vocab: int, max_seq_len: int = 64) -> GPT:
    """Always predicts the token it has just seen."""
    return _hand_set(vocab, SCALE * torch.eye(vocab), max_seq_len)


def successor_model(vocab: int, max_seq_len: int = 64) -> GPT:
    """Always predicts (current token + 1) mod V: always right on counting sequences."""
    return _hand_set(vocab, SCALE * torch.eye(vocab).roll(1, dims=0), max_seq_len)


def uniform_model(vocab: int, max_seq_len: int = 64) -> GPT:
    """Gives every token the same probability 1/V."""
    return _hand_set(vocab, torch.zeros(vocab, vocab), max_seq_len)


def counting(starts: torch.Tensor, length: int, vocab: int) -> torch.Tensor:
    """(M, length) rows start, start+1, ... mod V."""
    return (starts[:, None] + torch.arange(length)[None, :]) % vocab
