"""The memory account: the sheet's numbers, the scaling factors, and activations counted as autograd keeps them."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import run_recipe

from pipeline.config import ModelConfig
from pipeline.data.tokenize import DATA_ROOT_ENV
from pipeline.errors import ConfigError
from pipeline.model.gpt import GPT
from pipeline.model.memory import memory_account, model_account, parameter_count
from pipeline.train.losses import CrossEntropyHead, loss_chunk_rows
from teachers import seed

SEED_V = 200_019  # o200k_base


def seed_model() -> ModelConfig:
    return dataclasses.replace(seed().model, vocab_size=SEED_V)


def test_seed_attention_scores_and_probabilities_are_33554432_bytes_each_in_fp32():
    # H1.1: (32, 4, 256, 256) fp32 = 8,388,608 numbers x 4 bytes, for the scores and again for the softmax.
    for kernel in ("matmul", "sdpa"):
        account = memory_account(seed_model(), 32, 256, precision="no", attention_kernel=kernel)
        scores, probs = account.row("attention_scores"), account.row("attention_probs")
        assert scores.bytes == probs.bytes == 33_554_432 and scores.formula == "B*H*T^2*4"
        assert scores.counted == probs.counted == (kernel == "matmul")  # fused SDPA never holds them
    # H10.3: 102.7M parameters; weights, gradients and AdamW's two moments, all fp32.
    account = memory_account(seed_model(), 32, 256)
    P = parameter_count(seed_model())
    assert P == 2 * SEED_V * 256 + 256 * 256 + (4 * 256 * 256 + 4 * 256) == 102_738_432
    assert [account.row(n).bytes for n in ("weights", "gradients", "optimizer")] == [4 * P, 4 * P, 8 * P]
    assert account.row("logits_full").bytes == 32 * 256 * SEED_V * 4


def test_each_term_scales_as_its_formula_says_when_T_d_model_or_heads_double():
    account = memory_account(
        seed_model(), 32, 256, chunk_rows=loss_chunk_rows(SEED_V), attention_kernel="matmul"
    )
    scales = {r.name: r.scales for r in account.rows}
    assert scales["attention_scores"] == {"T": 4.0, "d_model": 1.0, "n_heads": 2.0}
    assert scales["attention_probs"] == {"T": 4.0, "d_model": 1.0, "n_heads": 2.0}
    assert scales["logits_full"] == {"T": 2.0, "d_model": 1.0, "n_heads": 1.0}
    assert scales["logits_chunk"] == {"T": 1.0, "d_model": 1.0, "n_heads": 1.0}  # the chunk is fixed in rows
    assert scales["weights"]["n_heads"] == 1.0 and 1.0 < scales["weights"]["d_model"] <= 4.0
    assert scales["activations"]["T"] == 2.0  # d_model: x2 but for the token ids
    assert scales["activations"]["d_model"] == pytest.approx(2.0, rel=1e-2)
    # H1.4: halving seq_len from 256 to 128 quarters the scores and halves the logits.
    half = memory_account(
        seed_model(), 32, 128, chunk_rows=loss_chunk_rows(SEED_V), attention_kernel="matmul"
    )
    assert half.row("attention_scores").bytes * 4 == account.row("attention_scores").bytes
    assert half.row("logits_full").bytes * 2 == account.row("logits_full").bytes
    # A doubling the config cannot have (6 heads of d_model 96 -> 12 heads of 8: fine; 5 -> 10 of 96: not).
    odd = memory_account(ModelConfig(n_heads=5, d_model=80, vocab_size=50), 2, 8)
    assert odd.row("attention_scores").scales["n_heads"] == 2.0
    assert (
        memory_account(ModelConfig(n_heads=3, d_model=3, vocab_size=50), 2, 8).total_scales["n_heads"] is None
    )


def test_chunked_loss_counts_its_chunk_and_the_textbook_loss_its_full_logits():
    cfg, N = seed_model(), 32 * 256
    chunked = memory_account(cfg, 32, 256, chunk_rows=loss_chunk_rows(SEED_V))
    full = memory_account(cfg, 32, 256, chunk_rows=0)
    assert chunked.row("logits_chunk").counted and not chunked.row("logits_full").counted
    # One chunk: LinearCrossEntropy drops each chunk's logits before it computes the next ones.
    assert chunked.row("logits_chunk").bytes == loss_chunk_rows(SEED_V) * SEED_V * 4
    assert full.row("logits_full").counted and full.row("logits_full_loss").bytes == 2 * N * SEED_V * 4
    assert full.total - chunked.total > 3 * N * SEED_V * 4 - chunked.row("logits_chunk").bytes - 1
    tiny = memory_account(cfg, 1, 8, chunk_rows=loss_chunk_rows(SEED_V))
    assert tiny.row("logits_chunk").bytes == 8 * SEED_V * 4  # one chunk holds every token


def test_mixed_precision_keeps_fp32_weights_and_adds_their_casts():
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=100)
    fp32, bf16 = memory_account(cfg, 4, 16), memory_account(cfg, 4, 16, precision="bf16")
    P = parameter_count(cfg)
    assert fp32.row("weights").bytes == bf16.row("weights").bytes == 4 * P
    linear = 2 * (4 * 64 * 64 + 2 * 4 * 64 * 64)
    assert bf16.row("weight_casts").bytes == 2 * linear and bf16.row("weight_casts").counted
    assert fp32.row("weight_casts").bytes == 0 and not fp32.row("weight_casts").counted
    assert bf16.row("activations").bytes < fp32.row("activations").bytes


def test_activation_checkpointing_keeps_block_inputs_and_one_recomputed_block():
    def activations(layers: int, checkpointing: bool) -> tuple[int, int]:
        cfg = ModelConfig(n_layers=layers, d_model=32, n_heads=2, vocab_size=50)
        account = memory_account(cfg, 3, 16, checkpointing=checkpointing, attention_kernel="matmul")
        return account.row("activations").bytes, account.row("attention_probs").bytes

    plain = [activations(n, False) for n in (1, 2, 3)]
    kept = [activations(n, True) for n in (1, 2, 3)]
    block_input = 3 * 16 * 32 * 4  # (B, T, C) of the fp32 residual stream
    assert kept[2][0] - kept[1][0] == kept[1][0] - kept[0][0] == block_input
    assert plain[2][0] - plain[1][0] > 5 * block_input  # a whole block's tensors per layer
    assert kept[0][1] == kept[2][1] == plain[0][1] and plain[2][1] == 3 * plain[0][1]


def _configs() -> dict[str, dict]:
    base = dict(n_layers=2, n_heads=2, d_model=32, max_seq_len=16, vocab_size=50)
    configs = {
        "attention_only": dict(base, block="attention_only", n_heads=4),
        "transformer": dict(base),
        "rope": dict(base, positions="rope"),
        "no_residual_no_layernorm_tied": dict(base, residual=False, layernorm=False, tie_head=True),
    }
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if "activation" in fields:
        configs["rope_relu"] = dict(base, positions="rope", activation="relu")
    if "attention" in fields:
        configs["ffn_only"] = dict(base, attention=False, ffn_mult=6)
    return configs


def _saved_bytes(model: GPT, idx: torch.Tensor, bf16: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(idx, head_fn=lambda h, w: h.float().sum())
    return sum(seen.values())


@pytest.mark.parametrize("kw", _configs().values(), ids=_configs().keys())
def test_activations_are_what_autograd_saves(kw):
    """Every term of the block count against the tensors the graph really keeps (the loss's are its own)."""
    cfg = ModelConfig(**kw)
    assert parameter_count(cfg) == GPT(cfg).param_counts()["total"]
    idx = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(0))
    for kernel in ("sdpa", "matmul"):
        for precision in ("no", "bf16"):
            model = GPT(cfg)
            model.set_attention_kernel(kernel)
            account = model_account(model, 3, 16, precision, chunk_rows=0)
            probs = account.row("attention_probs")
            expected = account.row("activations").bytes + account.row("weight_casts").bytes
            expected += probs.bytes if probs.counted else 0
            assert _saved_bytes(model, idx, precision == "bf16") == expected, (kernel, precision)


def test_the_fused_loss_takes_the_same_rows_in_fp32_and_bf16(monkeypatch):
    """~100M logits per chunk whatever the dtype: 512 rows of 8,192 at the seed preset's classes."""
    from pipeline.train import losses

    used = []
    apply = losses.LinearCrossEntropy.apply
    monkeypatch.setattr(losses.LinearCrossEntropy, "apply", lambda *a: used.append(a[3:]) or apply(*a))
    hidden = torch.randn(2, 8, 16, requires_grad=True)
    weight = torch.randn(300_000, 16, requires_grad=True)
    head = CrossEntropyHead(torch.zeros(2, 8, dtype=torch.long))
    head(hidden, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        head(hidden, weight)
    assert used == [(torch.float32, 349), (torch.bfloat16, 349)]  # 104,857,600 // 300,000
    assert losses.balanced_rows(8192, loss_chunk_rows(SEED_V)) == 512


def test_the_chunk_counted_is_the_one_the_fused_loss_uses(monkeypatch):
    from pipeline.train import losses

    used = []
    apply = losses.LinearCrossEntropy.apply
    monkeypatch.setattr(losses.LinearCrossEntropy, "apply", lambda *a: used.append(a[4]) or apply(*a))
    cfg = ModelConfig(n_layers=1, d_model=16, n_heads=2, max_seq_len=8, vocab_size=300_000)
    hidden = torch.randn(2, 8, 16, requires_grad=True)
    CrossEntropyHead(torch.zeros(2, 8, dtype=torch.long))(hidden, torch.randn(300_000, 16))
    account = memory_account(cfg, 2, 8, chunk_rows=loss_chunk_rows(cfg.vocab_size))
    assert used == [loss_chunk_rows(cfg.vocab_size)] and used[0] < 1024  # ~100M logits per chunk
    assert account.row("logits_chunk").bytes == min(used[0], 16) * 300_000 * 4


def test_unknown_vocabulary_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match=r"--model\.vocab-size"):
        memory_account(ModelConfig(), 2, 8)


def test_memory_recipe_prints_the_seed_account_and_the_scaling(tmp_path):
    # fp32, the sheet's arithmetic, on any CPU (auto would pick bf16 where the CPU runs it fast)
    proc = run_recipe(
        "memory", "--preset", "seed", "--model.vocab-size", str(SEED_V), "--train.precision", "no"
    )
    scores = next(line for line in proc.stdout.splitlines() if "attention_scores" in line)
    assert (
        "33,554,432" in scores
        and "B*H*T^2*4" in scores
        and scores.split()[-3:] == ["x4.00", "x1.00", "x2.00"]
    )
    assert "102,738,432" in proc.stdout and "total" in proc.stdout
    # H6.1 / H3.2: the parameter groups; H4.1: the causal mask's share of the score matrix
    params = next(line for line in proc.stdout.splitlines() if line.startswith("parameters:"))
    assert "tok_emb 51,204,864" in params and "pos_emb 65,536" in params and "attention 263,168" in params
    mask = next(line for line in proc.stdout.splitlines() if line.startswith("causal mask:"))
    assert "32,640 of the 65,536" in mask and "49.8%" in mask
    short = run_recipe(
        "memory", "--preset", "seed", "--model.vocab-size", str(SEED_V), "--data.seq-len", "128",
        "--train.precision", "no",
    )  # fmt: skip
    assert "8,388,608" in next(line for line in short.stdout.splitlines() if "attention_scores" in line)


def test_memory_recipe_without_a_vocabulary_size_names_the_flag(tmp_path):
    env = {DATA_ROOT_ENV: str(tmp_path)}  # no tokenized data to read a meta.json from
    bad = run_recipe("memory", "--preset", "char", check=False, env=env)
    assert bad.returncode == 2 and "--model.vocab-size" in bad.stderr


def test_memory_recipe_measures_one_cpu_step(char_data):
    proc = run_recipe(
        "memory", "--preset", "tiny", "--data", str(char_data), "--measure", "--train.precision", "no"
    )
    line = next(line for line in proc.stdout.splitlines() if line.startswith("measured"))
    assert "peak resident" in line and "analytic total" in line


def test_training_start_prints_the_account_and_writes_memory_json(char_data, tmp_path):
    out = tmp_path / "run"
    proc = run_recipe(
        "pretrain", "--preset", "tiny", "--data", str(char_data), "--out", str(out), "--max-steps", "1",
        "--train.precision", "no", "--train.no-progress", "--train.sample-tokens", "0",
        "--train.projector-tokens", "0", "--train.activation-checkpointing",
    )  # fmt: skip
    assert "memory: " in proc.stdout and "per process for a step (analytic" in proc.stdout
    saved = json.loads((out / "memory.json").read_text())
    config = json.loads((out / "config.json").read_text())
    model_cfg = ModelConfig(**config["model"])
    expected = memory_account(
        model_cfg, config["train"]["micro_batch_size"], config["data"]["seq_len"],
        chunk_rows=loss_chunk_rows(model_cfg.vocab_size), checkpointing=True,
    )  # fmt: skip
    assert saved["total_bytes"] == expected.total and saved["shape"]["checkpointing"] is True
    assert saved["rows"][0]["name"] == "weights" and "scales" in saved["rows"][0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    card = events.Tensors("run/memory/text_summary")
    text = card[0].tensor_proto.string_val[0].decode()
    assert [e.step for e in card] == [0] and f"{expected.total:,}" in text.split("total")[-1]
    assert f"{expected.rows[0].bytes:,}" in text.split("weights")[1].splitlines()[0]
