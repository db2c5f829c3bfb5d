"""Teacher presets that promise a known model's shape keep it (the rest: test_config's every-preset parse)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.model.gpt import GPT
from pipeline.run import huggingface
from teachers import PRESETS

GPT2_VOCAB = 50_257


def test_gpt2_small_is_gpt2_smalls_shape_and_size():
    cfg = PRESETS["gpt2_small"]()
    assert (cfg.data.encoding, cfg.data.seq_len, cfg.data.compact_vocab) == ("gpt2", 1024, "off")
    model = dataclasses.replace(cfg.model, vocab_size=GPT2_VOCAB)
    assert (model.n_layers, model.n_heads, model.d_model, model.max_seq_len) == (12, 12, 768, 1024)
    assert model.positions == "learned" and model.tie_head and model.bias and model.dropout == 0.0
    assert model.use_residual and model.use_layernorm and model.use_ffn and model.activation == "gelu"
    assert huggingface.gpt2_refusals(model) == []  # exportable as a GPT-2 folder as it is
    with torch.device("meta"):
        counts = GPT(model).param_counts()
    assert counts["total"] == 124_439_808  # Hugging Face's `gpt2`
    assert counts["head"] == 0  # tied: the head is the token embedding


def test_gpt2_small_maps_onto_transformers_default_gpt2_config():
    transformers = pytest.importorskip("transformers")
    model = dataclasses.replace(PRESETS["gpt2_small"]().model, vocab_size=GPT2_VOCAB)
    ours = huggingface.gpt2_config(model, eot=GPT2_VOCAB - 1, encoding="gpt2")
    theirs = transformers.GPT2Config()
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "tie_word_embeddings"):
        assert ours[key] == getattr(theirs, key), key
    assert ours["n_inner"] == 4 * theirs.n_embd  # transformers' None means 4 x n_embd
    with torch.device("meta"):
        reference = transformers.GPT2LMHeadModel(theirs)
    assert sum(p.numel() for p in reference.parameters()) == 124_439_808


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_presets_schedule_ends_where_its_run_ends_whatever_the_budget(name):
    """A --max-steps other than the preset's (or a scaling study's runs of many lengths) decays to
    min_lr at its own end. The `char` preset once fixed decay_steps at 2000: a 500-step run ended
    near the peak learning rate, and a scaling study's shorter runs at other shapes of schedule."""
    from pipeline.train.optim import lr_at

    optim = PRESETS[name]().optim
    if optim.schedule == "constant":
        return
    for total in (optim.warmup_steps + 50, 500, 5000):
        assert lr_at(total, optim, total) == pytest.approx(optim.min_lr)
        assert lr_at(total // 2 + optim.warmup_steps // 2, optim, total) > optim.min_lr
