"""The exercise sheet's model switches (issue 13): causal mask, attention removed, mask value and score
dtype, ReLU, the sinusoidal amplitude; and the numerics table of recipes/numerics.py."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import ROOT, run_recipe
from safetensors.torch import save_file

from pipeline import cli
from pipeline.config import ModelConfig, PretrainConfig
from pipeline.data.tokenizer import Tokenizer
from pipeline.data.vocab import VocabMap
from pipeline.errors import ConfigError
from pipeline.model.gpt import GPT, KVCache, sinusoidal_table
from pipeline.model.numerics import numerics_table, overflow_entry, qk_overflows
from pipeline.run import checkpoint
from pipeline.train.losses import CrossEntropyHead
from teachers import PRESETS

V = 23


def tiny(**kw) -> ModelConfig:
    base = dict(n_layers=2, n_heads=2, d_model=16, max_seq_len=12, vocab_size=V)
    return ModelConfig(**(base | kw))


def built(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


# --------------------------------------------------------------------------------------------------
# --model.causal
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "alibi"])
def test_without_the_mask_position_0_sees_a_later_token(positions):
    idx = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(0))
    later = idx.clone()
    later[0, 7] = (later[0, 7] + 1) % V
    leaky = built(tiny(causal=False, positions=positions))
    assert not torch.allclose(leaky(idx)[0, 0], leaky(later)[0, 0])
    causal = built(tiny(positions=positions))
    torch.testing.assert_close(causal(idx)[0, :7], causal(later)[0, :7], atol=0, rtol=0)
    leaky.set_causal(True)  # the causal view of the same weights: the future is hidden again
    torch.testing.assert_close(leaky(idx)[0, :7], leaky(later)[0, :7], atol=0, rtol=0)


def test_without_the_mask_the_weights_reach_the_future():
    model = built(tiny(causal=False))
    _, probs = model(torch.randint(0, V, (2, 12)), need_weights=True)
    assert probs[0].triu(1).sum() > 1.0  # mass above the diagonal: positions attend to later ones
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(2, 2, 12))


def test_kv_cache_generation_is_causal_by_construction():
    """A model trained without the mask, run with a cache, computes its causal view."""
    model = built(tiny(causal=False))
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    cache = KVCache.empty(2)
    parts = [model(idx[:, :5], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(5, 12)]
    model.set_causal(True)
    torch.testing.assert_close(torch.cat(parts, 1), model(idx), atol=1e-5, rtol=1e-5)


def _train_loss(causal: bool, steps: int = 60) -> float:
    """Train a 2-layer model on i.i.d. uniform tokens: the future is the only thing to learn from."""
    torch.manual_seed(0)
    vocab, T = 16, 16
    cfg = ModelConfig(
        n_layers=2, n_heads=2, d_model=32, max_seq_len=T, vocab_size=vocab, positions="rope", causal=causal
    )  # RoPE: "attend to the next position" is one relative offset, learnt in a few dozen steps
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        seq = torch.randint(0, vocab, (16, T + 1), generator=gen)
        x, y = seq[:, :-1], seq[:, 1:]
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


def test_without_the_mask_train_loss_collapses_through_leakage():
    """Random tokens cannot be predicted from the past (loss ln 16 = 2.77); the next input is visible."""
    causal, leaky = _train_loss(True), _train_loss(False)
    assert causal > math.log(16) - 0.15
    assert leaky < 1.0


# --------------------------------------------------------------------------------------------------
# --model.attention
# --------------------------------------------------------------------------------------------------


def test_attention_off_needs_an_ffn():
    with pytest.raises(ConfigError, match=r"--model\.ffn True"):
        tiny(block="attention_only", attention=False)
    with pytest.raises(ConfigError, match=r"--model\.ffn True"):
        tiny(attention=False, ffn=False)


def test_without_attention_positions_do_not_mix():
    model = built(tiny(attention=False))
    idx = torch.randint(0, V, (1, 12))
    later = idx.clone()
    later[0, 3] = (later[0, 3] + 1) % V
    out, probs = model(idx, need_weights=True)
    changed = (out - model(later)).abs().amax(-1)[0]
    assert changed[3] > 0 and torch.all(changed[torch.arange(12) != 3] == 0)
    assert probs == [] and model.param_counts()["attention"] == 0
    cache = KVCache.empty(2)
    parts = [model(idx[:, :4], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(4, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), out)


def _counts(cfg: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        return GPT(cfg).param_counts()


def _non_embedding(counts: dict[str, int]) -> int:
    return counts["total"] - counts["tok_emb"] - counts["pos_emb"] - counts["head"]


def test_ffn_only_baseline_matches_the_parameter_count():
    """ffn_mult + 2 replaces attention's 4d^2 + 4d per layer; what is left over is biases and LayerNorms."""
    d, layers = 64, 4
    base = ModelConfig(n_layers=layers, n_heads=4, d_model=d, vocab_size=100)
    ffn_only = dataclasses.replace(base, attention=False, ffn_mult=base.ffn_mult + 2)
    a, b = _counts(base), _counts(ffn_only)
    assert _non_embedding(a) - _non_embedding(b) == layers * 4 * d  # ln1 (2d) + 4d biases - 2d biases
    assert abs(a["total"] - b["total"]) / a["total"] < 0.005

    seed = dataclasses.replace(PRESETS["seed"]().model, vocab_size=200_019)
    seed_ffn = dataclasses.replace(seed, attention=False, ffn=True, ffn_mult=2)
    a, b = _counts(seed), _counts(seed_ffn)
    assert a["attention"] == 4 * 256 * 256 + 4 * 256 and b["attention"] == 0
    assert a["attention"] - b["ffn"] == 256  # the biases: 4d against 2d + d
    assert abs(a["total"] - b["total"]) / a["total"] < 0.005


# --------------------------------------------------------------------------------------------------
# --model.mask-value, --model.score-dtype
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "alibi"])
@pytest.mark.parametrize(
    ("switches", "tol"),
    [
        ({"mask_value": -1e9}, 1e-6),
        ({"mask_value": torch.finfo(torch.float32).min}, 1e-6),
        ({"score_dtype": "fp32"}, 1e-6),
        ({"score_dtype": "fp16", "mask_value": -1e4}, 1e-3),
        ({"score_dtype": "bf16"}, 2e-2),
    ],
)
def test_explicit_score_paths_equal_sdpa(positions, switches, tol):
    model = built(tiny(positions=positions))
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    idx = torch.randint(0, V, (2, 12))
    reference = model(idx)
    explicit = GPT(tiny(positions=positions, **switches)).eval()
    explicit.load_state_dict(model.state_dict())
    assert explicit.blocks[0].attn.explicit
    torch.testing.assert_close(explicit(idx), reference, atol=tol, rtol=tol)
    cache = KVCache.empty(2)
    parts = [explicit(idx[:, :5], cache=cache)] + [
        explicit(idx[:, t : t + 1], cache=cache) for t in range(5, 12)
    ]
    torch.testing.assert_close(torch.cat(parts, 1), reference, atol=tol, rtol=tol)


def test_need_weights_keeps_the_score_dtype():
    model = built(tiny(score_dtype="bf16"))
    idx = torch.randint(0, V, (2, 12))
    _, probs = model(idx, need_weights=True)
    _, exact = built(tiny())(idx, need_weights=True)
    assert probs[0].dtype == torch.float32 and torch.all(probs[0].triu(1) == 0)
    assert 0 < (probs[0] - exact[0]).abs().max() < 2e-2  # bf16 rounding shows in the probabilities


def _overflowing(score_dtype: str) -> GPT:
    """One head whose q and k are (160, ..., 160): unscaled q.k = 16 * 160^2 = 409,600 > 65,504."""
    cfg = ModelConfig(
        block="attention_only", n_layers=1, n_heads=1, d_model=16, max_seq_len=8, vocab_size=V,
        positions="none", score_dtype=score_dtype,
    )  # fmt: skip
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.fill_(10.0)
        model.blocks[0].attn.qkv.weight[:32].fill_(1.0)
        model.blocks[0].attn.qkv.bias.zero_()
    return model


def test_fp16_scores_that_overflow_give_nan_logits_not_silence():
    idx = torch.randint(0, V, (2, 8))
    y = torch.randint(0, V, (2, 8))
    overflow = _overflowing("fp16")
    assert torch.isnan(overflow(idx)).all()
    assert torch.isnan(overflow(idx, head_fn=CrossEntropyHead(y)))  # the loss the loop checks
    for dtype in ("fp32", "auto"):
        assert torch.isfinite(_overflowing(dtype)(idx)).all()


def test_mask_value_must_be_negative():
    with pytest.raises(ConfigError, match=r"--model.mask-value=-1e9"):
        tiny(mask_value=0.0)
    with pytest.raises(ConfigError, match="negative"):
        tiny(mask_value=math.nan)


@pytest.mark.parametrize("form", [["--model.mask-value", "-1e9"], ["--model.mask-value=-1e9"]])
def test_mask_value_flag_parses_both_forms(form):
    cfg = cli.parse(PretrainConfig, PRESETS, ["--preset", "tiny", *form, "--model.score-dtype", "fp16"])
    assert cfg.model.mask_value == -1e9 and cfg.model.score_dtype == "fp16"


def test_switch_flags_parse():
    flags = ["--model.causal", "False", "--model.activation", "relu", "--model.sinusoidal-scale", "unit"]
    cfg = cli.parse(PretrainConfig, PRESETS, ["--preset", "seed", *flags, "--model.attention", "False",
                                              "--model.ffn", "True", "--model.ffn-mult", "2"])  # fmt: skip
    m = cfg.model
    assert not m.causal and not m.attention and m.use_ffn
    assert (m.activation, m.sinusoidal_scale) == ("relu", "unit")
    d = cli.parse(PretrainConfig, PRESETS, ["--preset", "tiny"]).model
    assert d.causal and d.attention and (d.mask_value, d.mask, d.score_dtype) == (None, -math.inf, "auto")
    with pytest.raises(SystemExit) as exc:
        cli.parse(PretrainConfig, PRESETS, ["--preset", "seed", "--model.attention", "False"])
    assert exc.value.code == 2


# --------------------------------------------------------------------------------------------------
# --model.activation
# --------------------------------------------------------------------------------------------------


def test_relu_ffn_differs_from_gelu_and_is_relu():
    gelu = built(tiny())
    relu = GPT(tiny(activation="relu")).eval()
    relu.load_state_dict(gelu.state_dict())
    idx = torch.randint(0, V, (2, 12))
    assert not torch.allclose(relu(idx), gelu(idx), atol=1e-4)
    x = torch.randn(3, 16)
    ffn = relu.blocks[0].ffn
    torch.testing.assert_close(ffn(x), ffn.proj(torch.relu(ffn.fc(x))))


# --------------------------------------------------------------------------------------------------
# --model.sinusoidal-scale
# --------------------------------------------------------------------------------------------------


def test_matched_sinusoidal_table_has_a_learned_tables_rms():
    positions = torch.arange(64)
    for init_std in (0.02, 0.1):
        model = GPT(tiny(positions="sinusoidal", max_seq_len=64, init_std=init_std))
        rms = model.sinusoidal_positions(positions).pow(2).mean(-1).sqrt()  # per position, over coordinates
        torch.testing.assert_close(rms, torch.full((64,), init_std))
        learned = GPT(tiny(max_seq_len=64, init_std=init_std)).pos_emb.weight
        assert abs(learned.pow(2).mean().sqrt().item() - init_std) < 0.1 * init_std
    unit = GPT(tiny(positions="sinusoidal", sinusoidal_scale="unit"))
    torch.testing.assert_close(unit.sinusoidal_positions(positions), sinusoidal_table(positions, 16))


def test_matched_sinusoidal_differs_from_learned_only_in_being_fixed():
    """A learned table holding the matched codes computes what the sinusoidal model computes."""
    fixed = built(tiny(positions="sinusoidal"))
    learned = GPT(tiny()).eval()
    state = fixed.state_dict() | {"pos_emb.weight": fixed.sinusoidal_positions(torch.arange(12))}
    learned.load_state_dict(state)
    idx = torch.randint(0, V, (2, 12))
    torch.testing.assert_close(learned(idx), fixed(idx))


def _export(dest, model: GPT, drop: tuple[str, ...] = ()) -> None:
    """Export `model`; `drop`: model-config keys removed, as an export written before they existed."""
    tokenizer = Tokenizer.char("".join(chr(c) for c in range(97, 97 + V)))
    checkpoint.export_model(dest, model.state_dict(), model.cfg, tokenizer.spec, VocabMap.identity(V), {})
    config = json.loads((dest / checkpoint.CONFIG).read_text())
    if drop:
        config["model"] = {k: v for k, v in config["model"].items() if k not in drop}
        described = {key: config[key] for key in ("model", "tokenizer", "vocab")}
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        metadata = {"format": "pt", **checkpoint._config_metadata(described)}
        save_file(state, str(dest / checkpoint.WEIGHTS), metadata=metadata)
        (dest / checkpoint.CONFIG).write_text(json.dumps(config))


def test_an_older_sinusoidal_export_keeps_its_unit_table(tmp_path):
    old = built(tiny(positions="sinusoidal", sinusoidal_scale="unit"))
    new_fields = ("sinusoidal_scale", "causal", "attention", "mask_value", "score_dtype", "activation")
    _export(tmp_path / "old", old, drop=new_fields)
    loaded = checkpoint.load_export(tmp_path / "old")
    assert loaded.model_cfg.sinusoidal_scale == "unit"
    idx = torch.randint(0, V, (2, 12))
    torch.testing.assert_close(loaded.model(idx), old(idx))
    new = built(tiny(positions="sinusoidal"))
    _export(tmp_path / "new", new)
    assert checkpoint.load_export(tmp_path / "new").model_cfg.sinusoidal_scale == "matched"
    learned = built(tiny(positions="learned"))
    _export(tmp_path / "learned", learned, drop=("sinusoidal_scale",))
    assert checkpoint.load_export(tmp_path / "learned").model_cfg == learned.cfg


# --------------------------------------------------------------------------------------------------
# Numerics (recipes/numerics.py)
# --------------------------------------------------------------------------------------------------


def _rows(**kw) -> dict[tuple[str, str], object]:
    return {(r.mask, r.dtype): r for r in numerics_table(**kw)}


def test_numerics_mask_values_against_score_dtypes():
    rows = _rows()
    assert len(rows) == 15
    fp16 = rows["-1e9", "fp16"]
    assert fp16.stored == -math.inf and fp16.becomes_inf and fp16.full_row == "nan"
    fp32 = rows["-1e9", "fp32"]
    assert fp32.stored == -1e9 and not fp32.becomes_inf and fp32.full_row == "uniform"
    assert all(rows["-inf", d].full_row == "nan" for d in ("fp32", "bf16", "fp16"))
    assert rows["finfo(fp32).min", "bf16"].becomes_inf  # bf16's range ends just below fp32's
    assert rows["finfo(dtype).min", "bf16"].full_row == "uniform"
    assert rows["-1e9", "bf16"].stored != -1e9 and math.isfinite(rows["-1e9", "bf16"].stored)
    assert all(r.leaked == 0 for r in rows.values())  # scores of std 3: no finite value leaks
    errors = [rows["-inf", d].max_error for d in ("bf16", "fp16", "fp32")]
    assert errors[0] > 10 * errors[1] > 100 * errors[2]  # 8, 11 and 24 significant bits
    assert rows["-inf", "fp16"].overflow_score == 65504


def test_numerics_a_small_mask_value_leaks_beside_big_scores():
    rows = _rows(score_scale=1e4)
    assert rows["-1e4", "fp32"].leaked > 0.5
    assert rows["-1e9", "fp32"].leaked == 0 and rows["-inf", "fp32"].leaked == 0


def test_numerics_overflow_threshold_is_where_the_matmul_overflows():
    for dtype, head_dim in ((torch.float16, 64), (torch.float16, 16), (torch.bfloat16, 64)):
        entry = overflow_entry(dtype, head_dim)
        assert qk_overflows(dtype, head_dim, 1.01 * entry) and not qk_overflows(dtype, head_dim, 0.99 * entry)
    assert overflow_entry(torch.float16, 64) == pytest.approx(32.0, rel=1e-3)


def test_numerics_recipe_prints_the_table():
    out = run_recipe("numerics", "--head-dim", "16", cwd=ROOT).stdout
    lines = [line for line in out.splitlines() if line.startswith(("-inf", "-1e", "finfo"))]
    assert len(lines) == 15
    fp16 = next(line.split() for line in lines if line.startswith("-1e9") and " fp16 " in line)
    assert fp16[2:6] == ["-inf", "(was", "finite)", "nan"]
