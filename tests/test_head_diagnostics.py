"""Per-head diagnostics of pretraining (pipeline/eval/heads.py, the probe): score scaling, entropy by
context, previous-token share, head similarity, ablation importance, and the TensorBoard tags."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ModelConfig, ProbeConfig
from pipeline.data.vocab import VocabMap
from pipeline.errors import ConfigError
from pipeline.eval import heads
from pipeline.eval.probes import log_attention_diagnostics
from pipeline.model.gpt import GPT


def tiny_gpt(positions: str = "learned", seed: int = 0, **changes) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        n_layers=2, n_heads=4, d_model=32, max_seq_len=16, vocab_size=13, positions=positions, **changes
    )
    model = GPT(cfg).eval()
    with torch.no_grad():  # far from initialisation, so heads differ and scores are not all ~0
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def tokens(B: int = 3, T: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 13, (B, T), generator=torch.Generator().manual_seed(seed))


def causal_softmax(scores: torch.Tensor) -> torch.Tensor:
    T = scores.shape[-1]
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    return scores.masked_fill(~allowed, -math.inf).softmax(-1)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_raw_scores_are_the_model_scores_before_scaling(positions):
    model = tiny_gpt(positions)
    raw, probs = heads.capture_attention(model, tokens())
    assert len(raw) == len(probs) == 2 and raw[0].shape == (3, 4, 16, 16)
    d = model.cfg.head_dim
    for s, p in zip(
        raw, probs, strict=True
    ):  # the captured QK^T (RoPE applied) reproduces the model's softmax
        torch.testing.assert_close(causal_softmax(s / math.sqrt(d)), p, atol=1e-5, rtol=1e-4)
    stats = heads.score_stats(raw, d, causal=True)
    assert stats["score_std_raw"].shape == (2, 4)
    torch.testing.assert_close(
        stats["score_std_raw"] / stats["score_std"], torch.full((2, 4), math.sqrt(d), dtype=torch.float64)
    )
    torch.testing.assert_close(
        stats["score_range_raw"] / stats["score_range"], torch.full((2, 4), math.sqrt(d), dtype=torch.float64)
    )
    assert (stats["score_std"] > 0).all()


def test_score_statistics_use_only_allowed_positions():
    T = 4
    s = torch.zeros(1, 1, T, T)
    s[0, 0] = torch.tensor([[1.0, 99, 99, 99], [2, 3, 99, 99], [1, 2, 3, 99], [4, 1, 2, 3]])
    causal = heads.score_stats([s], head_dim=4, causal=True)
    assert causal["score_range_raw"][0, 0] == 3.0  # 4 - 1: the 99s above the diagonal are masked
    assert causal["score_range"][0, 0] == 1.5  # after / sqrt(4)
    allowed = s[0, 0][torch.ones(T, T, dtype=torch.bool).tril()].double()
    assert causal["score_std_raw"][0, 0] == pytest.approx(float(allowed.std(correction=0)))
    assert heads.score_stats([s], head_dim=4, causal=False)["score_range_raw"][0, 0] == 98.0


def test_entropy_by_context_of_uniform_attention_is_ln_n():
    T = 20
    uniform = causal_softmax(torch.zeros(2, 3, T, T))  # row t: 1/(t+1) on keys 0..t
    rows = heads.entropy_by_row([uniform, uniform])
    visible = heads.visible_keys(T, T, causal=True)
    torch.testing.assert_close(rows[1, 2], torch.arange(1, T + 1).double().log(), atol=1e-6, rtol=1e-6)
    buckets = heads.entropy_by_context(rows, visible)
    assert sorted(buckets) == [1, 2, 4, 8, 16]
    for start, per_layer in buckets.items():
        n = torch.arange(start, min(2 * start, T + 1)).double()
        torch.testing.assert_close(
            per_layer, torch.full((2,), float(n.log().mean()), dtype=torch.float64), atol=1e-6, rtol=1e-6
        )
    # Without the mask every row sees all T keys: one bucket, at ln T.
    full = torch.full((1, 2, T, T), 1.0 / T)
    open_buckets = heads.entropy_by_context(
        heads.entropy_by_row([full]), heads.visible_keys(T, T, causal=False)
    )
    assert list(open_buckets) == [16] and float(open_buckets[16][0]) == pytest.approx(math.log(T))


def test_previous_token_share_of_a_previous_token_head_is_one():
    T = 16
    _, probs = heads.capture_attention(tiny_gpt(), tokens(T=T))
    # Head 0 of layer 0 forced onto the previous token: a huge score bonus on key t-1 (row 0 sees only key 0).
    prev = torch.zeros(T, T)
    prev[torch.arange(1, T), torch.arange(0, T - 1)] = 1.0
    forced = probs[0].clone()
    forced[:, 0] = causal_softmax(1e4 * prev.expand(3, T, T))
    share = heads.prev_token_share([forced, probs[1]])
    assert share.shape == (2, 4)
    assert float(share[0, 0]) == pytest.approx(1.0, abs=1e-6)
    assert (share[0, 1:] < 0.9).all()
    uniform = causal_softmax(torch.zeros(1, 1, T, T))
    expected = torch.tensor([1.0 / (t + 1) for t in range(1, T)]).double().mean()
    assert float(heads.prev_token_share([uniform])[0, 0]) == pytest.approx(float(expected))


def test_identical_heads_have_similarity_one():
    model = tiny_gpt()
    d, D = model.cfg.d_model, model.cfg.head_dim
    with torch.no_grad():  # head 2's queries and keys copied from head 0: the same attention maps
        w = model.blocks[0].attn.qkv.weight
        b = model.blocks[0].attn.qkv.bias
        for offset in (0, d):  # q rows, then k rows
            w[offset + 2 * D : offset + 3 * D] = w[offset : offset + D]
            b[offset + 2 * D : offset + 3 * D] = b[offset : offset + D]
    _, probs = heads.capture_attention(model, tokens())
    sim = heads.head_similarity(probs[0])
    assert sim.shape == (4, 4)
    assert float(sim[0, 2]) == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(sim.diagonal(), torch.ones(4, dtype=torch.float64))
    assert float(sim[0, 1]) < 0.999
    assert heads.max_similarity(sim) == pytest.approx(1.0, abs=1e-9)
    assert math.isnan(heads.max_similarity(torch.ones(1, 1)))


def test_ablating_a_dead_head_costs_nothing_and_the_weights_come_back():
    model = tiny_gpt()
    D = model.cfg.head_dim
    with torch.no_grad():  # head 1 of layer 0 already contributes nothing
        model.blocks[0].attn.proj.weight[:, D : 2 * D] = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 13, (4, 16), generator=g), torch.randint(0, 13, (4, 16), generator=g))]
    base, scores = heads.ablation_scores(
        model, lambda m: heads.local_val_loss(m, batches, VocabMap.identity(13))
    )
    assert scores.shape == (2, 4)
    assert abs(float(scores[0, 1])) < 1e-6
    assert (scores.flatten()[[0, 2, 3, 4, 5, 6, 7]].abs() > 1e-4).all()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    logits = model(batches[0][0])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batches[0][1].flatten())
    assert base == pytest.approx(float(expected.detach()), rel=1e-5)


class Recorder:
    """A stand-in Reporter that keeps what the probe logs."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.images: dict[str, object] = {}

    def scalars(self, step: int, values: dict[str, float], record: bool = True) -> None:
        self.values |= values

    def image(self, tag: str, figure: object, step: int) -> None:
        self.images[tag] = figure


def test_log_attention_diagnostics_tags_and_switches():
    model = tiny_gpt("rope")
    report = Recorder()
    log_attention_diagnostics(report, model, tokens(), ProbeConfig(map_tokens=8), step=0)
    for stat in ("score_std_raw", "score_std", "score_range_raw", "score_range", "prev_token"):
        assert {f"attention/{stat}/layer{i}_head{h}" for i in range(2) for h in range(4)} <= set(
            report.values
        )
    assert {
        f"attention/entropy_by_context/layer{i}_ctx{n}" for i in range(2) for n in (1, 2, 4, 8, 16)
    } <= set(report.values)
    assert {"heads/max_similarity/layer0", "heads/max_similarity/layer1"} <= set(report.values)
    assert set(report.images) == {
        "attention_images/entropy_vs_context",
        "heads/similarity/layer0",
        "heads/similarity/layer1",
        "attention_maps/layer0",
        "attention_maps/layer1",
    }
    map_axes = report.images["attention_maps/layer0"].axes
    assert map_axes[0].get_xlabel() == "key" and map_axes[0].get_ylabel() == "query"
    assert map_axes[0].get_images()[0].get_array().shape == (8, 8)
    assert len(map_axes) == 4 + 1 and map_axes[-1].get_ylabel() == "attention probability"  # the colorbar
    quiet = Recorder()
    off = ProbeConfig(scores=False, entropy_by_context=False, prev_token=False, similarity=False, maps=False)
    log_attention_diagnostics(quiet, model, tokens(), off, step=0)
    assert quiet.values == {} and quiet.images == {}


def test_an_unmasked_model_is_measured_over_every_key():
    if "causal" not in ModelConfig.__dataclass_fields__:
        pytest.skip("ModelConfig has no causal switch")
    model = tiny_gpt(causal=False)
    assert not heads.is_causal(model)
    report = Recorder()
    log_attention_diagnostics(report, model, tokens(), ProbeConfig(), step=0)
    assert {k for k in report.values if k.startswith("attention/entropy_by_context/")} == {
        "attention/entropy_by_context/layer0_ctx16",
        "attention/entropy_by_context/layer1_ctx16",
    }
    raw, probs = heads.capture_attention(model, tokens())
    torch.testing.assert_close(
        (raw[0] / math.sqrt(model.cfg.head_dim)).softmax(-1), probs[0], atol=1e-5, rtol=1e-4
    )


def test_a_model_without_attention_has_nothing_to_probe():
    if "attention" not in ModelConfig.__dataclass_fields__:
        pytest.skip("ModelConfig has no attention switch")
    from pipeline.eval.teacher_forced import attention_stats

    model = tiny_gpt(attention=False, block="transformer")
    assert heads.attention_layers(model) == []
    assert attention_stats(model, tokens())["entropy"].shape == (0, 4)


def test_probe_config_refuses_empty_budgets():
    with pytest.raises(ConfigError, match=r"train\.probe\.importance_tokens must be > 0"):
        ProbeConfig(importance_tokens=0)
    with pytest.raises(ConfigError, match=r"train\.probe\.map_tokens"):
        ProbeConfig(map_tokens=0)


def test_the_probe_writes_every_diagnostic_to_tensorboard(char_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.accel import build_accelerator
    from pipeline.config import DataConfig, TrainConfig
    from pipeline.eval.probes import make_probe
    from pipeline.run.folder import RunDir
    from pipeline.run.tracking import Reporter
    from pipeline.train import stage
    from pipeline.train.batching import plan_batches

    accelerator = build_accelerator("no", log_with="tensorboard")
    shape = ModelConfig(n_layers=2, n_heads=2, d_model=16, max_seq_len=16)
    data, vocab, _, model_cfg = stage.resolve_lm(
        accelerator, DataConfig(dir=str(char_data), seq_len=16), shape, False
    )
    train = TrainConfig(max_steps=2, sample_tokens=0, probe=ProbeConfig(map_tokens=8, importance_tokens=64))
    plan = plan_batches(train, 16, 1, len(data.train))
    run = RunDir(tmp_path / "run")
    report = Reporter(accelerator, run, plan.total_steps, 0, progress=False)
    ctx = stage.RunContext(accelerator, run, report, data, vocab, plan)
    torch.manual_seed(0)
    model = GPT(model_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = make_probe(ctx, model, stage.val_batches(ctx, train)[0][0][:2], train)
    probe(0)  # the step-0 evaluation
    probe(5)
    report.close()
    assert all(
        torch.equal(v, before[k]) for k, v in model.state_dict().items()
    )  # ablation restored the weights
    assert model.training  # and the mode

    events = EventAccumulator(str(run.path / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    per_head = [f"layer{i}_head{h}" for i in range(2) for h in range(2)]
    prefixes = ["score_std_raw", "score_std", "score_range_raw", "score_range", "prev_token"]
    for prefix in [f"attention/{p}" for p in prefixes] + ["heads/importance", "attention/entropy"]:
        assert {f"{prefix}/{name}" for name in per_head} <= scalars, prefix
    assert {
        f"attention/entropy_by_context/layer{i}_ctx{n}" for i in range(2) for n in (1, 2, 4, 8)
    } <= scalars
    assert {"heads/max_similarity/layer0", "heads/max_similarity/layer1"} <= scalars
    assert images == {
        "attention_images/entropy_vs_context",
        *(f"heads/similarity/layer{i}" for i in range(2)),
        *(f"attention_maps/layer{i}" for i in range(2)),
    }
    assert [e.step for e in events.Scalars("heads/importance/layer1_head0")] == [0, 5]
    assert [e.step for e in events.Images("attention_maps/layer0")] == [0, 5]
    std_raw = events.Scalars("attention/score_std_raw/layer0_head1")[-1].value
    std = events.Scalars("attention/score_std/layer0_head1")[-1].value
    assert std_raw / std == pytest.approx(math.sqrt(model_cfg.head_dim), rel=1e-5)
    for name in per_head:
        assert 0.0 <= events.Scalars(f"attention/prev_token/{name}")[-1].value <= 1.0
