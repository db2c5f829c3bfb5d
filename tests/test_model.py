"""The GPT: parameter counts, initial loss, parity with an independent implementation, positions,
attention paths, KV cache and activation checkpointing."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.model.gpt import GPT, KVCache
from pipeline.train.losses import CrossEntropyHead
from teachers import PRESETS


def tiny(**kw) -> ModelConfig:
    base = dict(n_layers=2, n_heads=2, d_model=16, max_seq_len=12, vocab_size=23)
    return ModelConfig(**(base | kw))


def test_seed_preset_has_the_sheets_102_7m_parameters():
    cfg = dataclasses.replace(PRESETS["seed"]().model, vocab_size=200_019)
    with torch.device("meta"):
        counts = GPT(cfg).param_counts()
    assert counts["tok_emb"] == counts["head"] == 200_019 * 256
    assert counts["pos_emb"] == 256 * 256
    assert counts["attention"] == 4 * 256 * 256 + 4 * 256  # Q, K, V, W_o and their biases
    assert counts["ffn"] == counts["norm"] == 0
    assert round(counts["total"] / 1e6, 1) == 102.7


def test_initial_loss_is_log_vocab():
    """Exercise H5.3: an untrained model is a near-uniform guess, loss ~ ln(V) = 12.2 for o200k_base."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        block="attention_only", n_layers=1, n_heads=4, d_model=64, max_seq_len=32, vocab_size=200_019
    )
    model = GPT(cfg)
    x = torch.randint(0, 200_019, (2, 32))
    y = torch.randint(0, 200_019, (2, 32))
    loss = model(x, head_fn=CrossEntropyHead(y)) / y.numel()
    assert abs(loss.item() - math.log(200_019)) < 0.1


def test_d_model_must_divide_by_heads():
    with pytest.raises(ConfigError, match="not divisible"):
        tiny(d_model=18, n_heads=4)


class Reference(torch.nn.Module):
    """A textbook pre-LN GPT written independently of pipeline/model/gpt.py (manual masked attention)."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt  # only to borrow its weights

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        g, cfg = self.gpt, self.gpt.cfg
        T = idx.shape[1]
        x = g.tok_emb.weight[idx] + g.pos_emb.weight[:T]
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
        for block in g.blocks:
            h = F.layer_norm(x, (cfg.d_model,), block.ln1.weight, block.ln1.bias) if cfg.use_layernorm else x
            qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
            heads = []
            for i in range(cfg.n_heads):
                sl = slice(i * cfg.head_dim, (i + 1) * cfg.head_dim)
                q, k, v = qkv[..., sl], qkv[..., cfg.d_model :][..., sl], qkv[..., 2 * cfg.d_model :][..., sl]
                scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
                scores = scores.masked_fill(~mask, -1e9)
                heads.append(scores.softmax(-1) @ v)
            a = torch.cat(heads, -1) @ block.attn.proj.weight.T + block.attn.proj.bias
            x = x + a if cfg.use_residual else a
            if cfg.use_ffn:
                h = (
                    F.layer_norm(x, (cfg.d_model,), block.ln2.weight, block.ln2.bias)
                    if cfg.use_layernorm
                    else x
                )
                f = (
                    F.gelu(h @ block.ffn.fc.weight.T + block.ffn.fc.bias) @ block.ffn.proj.weight.T
                    + block.ffn.proj.bias
                )
                x = x + f if cfg.use_residual else f
        if cfg.use_layernorm:
            x = F.layer_norm(x, (cfg.d_model,), g.ln_f.weight, g.ln_f.bias)
        return x @ g.head_weight.T


@pytest.mark.parametrize("block", ["transformer", "attention_only"])
def test_matches_an_independent_implementation(block):
    torch.manual_seed(0)
    model = GPT(tiny(block=block)).eval()
    for p in model.parameters():  # non-trivial biases and norms
        p.data.add_(0.05 * torch.randn_like(p))
    idx = torch.randint(0, 23, (3, 12))
    torch.testing.assert_close(model(idx), Reference(model)(idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("switch", "value"), [("residual", True), ("layernorm", True), ("ffn", True)])
def test_switches_override_the_block_style(switch, value):
    cfg = tiny(block="attention_only", **{switch: value})
    model = GPT(cfg)
    assert getattr(cfg, f"use_{switch}") is value
    assert cfg.use_residual == (switch == "residual")
    torch.manual_seed(0)
    idx = torch.randint(0, 23, (2, 12))
    torch.testing.assert_close(model.eval()(idx), Reference(model)(idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rope", "alibi", "none"])
def test_attention_weights_path_equals_sdpa_path(positions):
    torch.manual_seed(0)
    model = GPT(tiny(positions=positions)).eval()
    idx = torch.randint(0, 23, (2, 12))
    logits, probs = model(idx, need_weights=True)
    torch.testing.assert_close(logits, model(idx), atol=1e-5, rtol=1e-5)
    assert len(probs) == 2 and probs[0].shape == (2, 2, 12, 12)
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(2, 2, 12))
    assert torch.all(probs[0].triu(1) == 0)  # causal: nothing attends to the future


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rope", "alibi", "none"])
def test_kv_cache_gives_the_same_logits_as_recomputing(positions):
    torch.manual_seed(0)
    model = GPT(tiny(positions=positions)).eval()
    idx = torch.randint(0, 23, (2, 12))
    full = model(idx)
    cache = KVCache.empty(2)
    parts = [model(idx[:, :5], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_relative_positions_run_past_max_seq_len(positions):
    """Exercise H6.3/H8.4: trained at 12, evaluated at 24."""
    model = GPT(tiny(positions=positions)).eval()
    assert model(torch.randint(0, 23, (1, 24))).shape == (1, 24, 23)


def test_learned_positions_refuse_past_max_seq_len():
    with pytest.raises(ValueError, match="max_seq_len"):
        GPT(tiny()).eval()(torch.randint(0, 23, (1, 13)))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.0))
    idx, y = torch.randint(0, 23, (2, 12)), torch.randint(0, 23, (2, 12))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ckpt
        model(idx, head_fn=CrossEntropyHead(y)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=0)


def test_tied_head_shares_the_embedding():
    model = GPT(tiny(tie_head=True))
    assert model.head is None and model.head_weight is model.tok_emb.weight
    assert model.param_counts()["head"] == 0


def test_param_groups_cover_every_parameter():
    model = GPT(tiny())
    groups = {GPT.param_group(n) for n, _ in model.named_parameters()}
    assert groups == {"tok_emb", "pos_emb", "attention", "ffn", "norm", "head"}
    assert model.param_counts()["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("positions", ["learned", "rope", "alibi"])
def test_matmul_attention_kernel_equals_sdpa(positions):
    torch.manual_seed(0)
    model = GPT(tiny(positions=positions))
    idx, y = torch.randint(0, 23, (2, 12)), torch.randint(0, 23, (2, 12))
    outputs = []
    for kernel in ("sdpa", "matmul"):
        model.zero_grad()
        model.set_attention_kernel(kernel)
        loss = model(idx, head_fn=CrossEntropyHead(y))
        loss.backward()
        outputs.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(outputs[0][1], outputs[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
