"""Evaluate's extras: length extrapolation, beam and nucleus rollouts, confidence along rollouts, and the
leaky against the causal view of a model trained without the causal mask (exercises H4.3, H6.3, H9.2-H9.5)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_recipe
from known_models import counting, successor_model, uniform_model

from pipeline.config import ModelConfig
from pipeline.data.shards import TokenData, windows
from pipeline.data.tokenizer import Tokenizer
from pipeline.data.vocab import VocabMap
from pipeline.errors import ConfigError
from pipeline.eval import compounding, metrics
from pipeline.eval.config import ROLLOUT_MODES, EvaluateConfig
from pipeline.eval.results import ModelResult, RolloutResult
from pipeline.model.gpt import GPT
from pipeline.run import checkpoint
from pipeline.run.checkpoint import ExportInfo

N_NEW = 16  # the quick preset's new_tokens
TRAINED = 32  # the tiny preset's max_seq_len
SEQ_LEN = 2 * TRAINED


def train_and_export(dest: Path, data_dir: Path, steps: int, **model: object) -> Path:
    """A one-layer GPT of the tiny preset's width and context, trained in-process for `steps` AdamW
    steps on the data's train split (seconds), exported as a teacher."""
    data = TokenData.open(data_dir)
    cfg = ModelConfig(n_layers=1, n_heads=2, d_model=32, max_seq_len=TRAINED, vocab_size=data.vocab_size)
    cfg = dataclasses.replace(cfg, dropout=0.0, **model)
    torch.manual_seed(0)
    net = GPT(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        x, y = windows(data.train, rng.integers(0, len(data.train) - TRAINED - 1, 16), TRAINED, None)
        loss = F.cross_entropy(net(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    info = ExportInfo(kind="teacher", preset="tiny", run=dest.parent.name).to_json()
    vocab = VocabMap.identity(data.vocab_size)
    checkpoint.export_model(dest, net.state_dict(), cfg, data.meta["tokenizer"], vocab, info)
    return dest


@pytest.fixture(scope="module")
def models(char_data, tmp_path_factory) -> dict[str, Path]:
    """RoPE models trained with and without the causal mask, and an untrained learned-position model."""
    root = tmp_path_factory.mktemp("extras-models")
    return {
        "rope": train_and_export(root / "rope" / "best", char_data, 60, positions="rope"),
        "leaky": train_and_export(root / "leaky" / "best", char_data, 60, positions="rope", causal=False),
        "learned": train_and_export(root / "learned" / "best", char_data, 0, positions="learned"),
    }


@pytest.fixture(scope="module")
def extrapolated(models, char_data, tmp_path_factory) -> Path:
    """Both RoPE models evaluated at twice their max_seq_len, every rollout mode (the quick preset), into the
    default run folder (under $GPT_DISTILL_RUNS), with the progress bar on; its output in ../stderr.txt."""
    root = tmp_path_factory.mktemp("extras-eval")
    args = ["--models", str(models["rope"]), str(models["leaky"]), "--data", str(char_data)]
    proc = run_recipe(
        "evaluate", *args, "--seq-len", str(SEQ_LEN), "--preset", "quick", env={"GPT_DISTILL_RUNS": str(root)}
    )
    (out,) = (root / "evaluate").iterdir()
    (root / "stderr.txt").write_text(proc.stderr)
    return out


def test_default_run_folder_is_the_first_model_name_and_one_timestamp(extrapolated):
    assert re.fullmatch(r"rope-\d{8}-\d{6}", extrapolated.name), extrapolated.name
    assert sorted(p.name for p in (extrapolated / "tb").iterdir() if p.is_dir()) == ["leaky", "rope"]


def test_progress_names_each_phase_of_each_model(extrapolated):
    shown = (extrapolated.parent.parent / "stderr.txt").read_text()
    # rope is a teacher export followed by another model: it judges both.
    for model in ("rope", "leaky"):
        for phase in ("teacher-forced", "greedy rollouts", "judge on sampled", "beam rollouts", "attention"):
            assert f"{model}: {phase}" in shown, (model, phase)
    assert "writing report.md, plots and TensorBoard events" in shown and "100%" in shown


def metrics_json(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def scalar_tags(log_dir: Path) -> dict[str, list]:
    """TensorBoard scalars of one run folder: tag -> its events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


# --------------------------------------------------------------------------------------------------
# Length extrapolation
# --------------------------------------------------------------------------------------------------


def test_learned_positions_refuse_a_window_past_max_seq_len(models, char_data, tmp_path):
    out = tmp_path / "refused"
    args = ["--models", str(models["learned"]), "--data", str(char_data), "--out", str(out)]
    proc = run_recipe("evaluate", *args, "--seq-len", str(SEQ_LEN), "--preset", "quick", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"--seq-len {SEQ_LEN}" in last
    assert f"the learned table has {TRAINED} rows, so a position >= {TRAINED} has no embedding" in last
    assert f"pick --seq-len <= {TRAINED} or train with --model.positions rope|alibi|sinusoidal|none" in last
    assert not out.exists()  # refused before any work


def test_rope_model_reports_loss_by_position_past_its_max_seq_len(extrapolated):
    data = metrics_json(extrapolated)
    assert data["context"]["seq_len"] == SEQ_LEN
    m = data["models"]["rope"]
    lp = m["loss_by_position"]
    assert lp["seq_len"] == SEQ_LEN and lp["trained_max_seq_len"] == TRAINED and lp["extrapolated"]
    assert len(lp["per_position"]) == SEQ_LEN and all(math.isfinite(v) and v > 0 for v in lp["per_position"])
    buckets = lp["buckets"]
    edges = [b["start"] for b in buckets] + [buckets[-1]["end"]]
    assert edges == [0, 1, 2, 4, 8, 16, 32, 64]  # powers of two; the trained context is one of them
    assert [b["past_trained_context"] for b in buckets] == [False] * 6 + [True]
    assert sum(b["tokens"] for b in buckets) == m["val_tokens"]  # every teacher-forced prediction, once
    for b in buckets:  # a bucket's loss is the mean of its positions' (each position has as many windows)
        assert b["loss"] == pytest.approx(np.mean(lp["per_position"][b["start"] : b["end"]]), rel=1e-6)
    # The loss over the window is the token-weighted mean of the buckets: val_loss itself.
    weighted = sum(b["loss"] * b["tokens"] for b in buckets) / m["val_tokens"]
    assert weighted == pytest.approx(m["val_loss"], rel=1e-3)
    report = (extrapolated / "report.md").read_text()
    assert "## Loss by position" in report and "past the trained context" in report
    tags = scalar_tags(extrapolated / "tb" / "rope")
    assert {"loss_by_position/per_position", "loss_by_position/bucket", "rollout_entropy/beam"} <= set(tags)
    assert len(tags["loss_by_position/per_position"]) == SEQ_LEN
    assert len(tags["rollout_max_prob/nucleus"]) == N_NEW
    png = extrapolated / "plots" / "loss_by_position.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_position_buckets_split_at_the_trained_context():
    assert metrics.position_buckets(8, 8) == [(0, 1), (1, 2), (2, 4), (4, 8)]
    assert metrics.position_buckets(40, 24) == [
        (0, 1),
        (1, 2),
        (2, 4),
        (4, 8),
        (8, 16),
        (16, 24),
        (24, 32),
        (32, 40),
    ]
    sums, counts = np.arange(8, dtype=float) * 3, np.full(8, 3.0)
    assert metrics.bucket_means(sums, counts, [(0, 1), (1, 4), (4, 8)]) == [(0.0, 3), (2.0, 9), (5.5, 12)]


# --------------------------------------------------------------------------------------------------
# Decoding comparisons and confidence along rollouts
# --------------------------------------------------------------------------------------------------


def test_beam_and_nucleus_rollouts_have_the_greedy_metrics(extrapolated):
    data = metrics_json(extrapolated)
    assert data["context"]["rollouts"] == list(ROLLOUT_MODES) and data["context"]["beam_width"] == 2
    for name, m in data["models"].items():
        greedy_keys = set(RolloutResult.from_json(m).to_json())
        for mode in ("sampled", "nucleus", "beam"):
            assert set(m[mode]) == greedy_keys, (name, mode)
            assert len(m[mode]["accuracy_by_position"]) == N_NEW and "judge" in m[mode]
            assert sum(m[mode]["first_divergence_histogram"]) == m["prompts"]
        assert set(m["samples"][0]) >= {"greedy", "sampled", "nucleus", "beam", "beam_diverge_char"}
        assert ModelResult.from_json(m).to_json() == m  # the typed record round-trips every mode
    result = json.loads((extrapolated / "result.json").read_text())
    assert set(result["models"]["rope"]["rollouts"]) == set(ROLLOUT_MODES)
    report = (extrapolated / "report.md").read_text()
    assert "by beam search (2 beams)" in report and "by nucleus sampling (top-p 0.9" in report
    rollout_rows = report.split("## Rollouts:", 1)[1].split("##", 1)[0]
    assert all(f"| {mode} |" in rollout_rows for mode in ROLLOUT_MODES)


def test_confidence_curves_have_one_value_per_generated_position(extrapolated):
    for m in metrics_json(extrapolated)["models"].values():
        curves = m["rollout_confidence"]
        assert list(curves) == list(ROLLOUT_MODES)
        for c in curves.values():
            assert len(c["entropy"]) == len(c["max_prob"]) == N_NEW
            assert all(0 <= e <= math.log(1000) for e in c["entropy"]) and all(
                0 < p <= 1 for p in c["max_prob"]
            )
    assert "## Confidence along the rollouts" in (extrapolated / "report.md").read_text()


def test_rollout_confidence_matches_a_direct_computation_and_known_models():
    V, vocab = 8, VocabMap.identity(8)
    prompts = counting(torch.tensor([0, 3, 5]), 4, V)
    generated = counting(torch.tensor([4, 7, 1]), 6, V)
    entropy, top = compounding.rollout_confidence(successor_model(V), prompts, generated, vocab)
    assert entropy.shape == top.shape == (3, 6)
    assert np.all(entropy < 1e-5) and np.allclose(top, 1.0, atol=1e-6)  # deterministic: no uncertainty
    entropy, top = compounding.rollout_confidence(uniform_model(V), prompts, generated, vocab)
    assert np.allclose(entropy, math.log(V), atol=1e-5) and np.allclose(top, 1 / V, atol=1e-6)
    # A random GPT with a window shorter than the sequences: each generated position's distribution.
    torch.manual_seed(0)
    model = successor_model(V, max_seq_len=4)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(V, V))
    entropy, top = compounding.rollout_confidence(model, prompts, generated, vocab)
    seqs = torch.cat((prompts, generated), dim=1)
    # The distribution after the prompt and k generated tokens (the model looks at one token only).
    for k in range(6):
        with torch.no_grad():
            logp = model(seqs[:, 3 + k : 4 + k])[:, -1].log_softmax(-1)
        assert np.allclose(entropy[:, k], -(logp.exp() * logp).sum(-1).numpy(), atol=1e-5)
        assert np.allclose(top[:, k], logp.exp().max(-1).values.numpy(), atol=1e-6)


def test_every_mode_of_a_known_model_follows_the_counting_data():
    V = 8
    prompts = compounding.Prompts(np.arange(6), counting(torch.arange(6), 4 + 8, V).numpy(), 4, 8)
    cfg = EvaluateConfig(prompts=6, prompt_tokens=4, new_tokens=8, gap_horizon=2, bootstrap=50, samples=1)
    cfg = dataclasses.replace(cfg, rollouts=ROLLOUT_MODES, beam_width=3)
    raw = compounding.measure_model(
        successor_model(V),
        VocabMap.identity(V),
        Tokenizer.char("abc defg"),
        prompts,
        np.arange(6),
        cfg,
        torch.device("cpu"),
    )
    c = compounding.summarize(compounding.merge_shares([raw]), cfg)
    for mode in ROLLOUT_MODES:
        r = getattr(c, mode)
        assert r.accuracy_by_position.mean == [1.0] * 8, mode  # a one-hot model: every decoder agrees
        assert max(c.confidence[mode].entropy.mean) < 1e-5 and min(c.confidence[mode].max_prob.mean) > 0.999


def test_rollouts_flag_and_no_sampled():
    cfg = EvaluateConfig(rollouts=ROLLOUT_MODES, beam_width=5, nucleus=0.8)
    modes = compounding.rollout_configs(cfg)
    assert list(modes) == ["greedy", "sampled", "nucleus", "beam"]
    assert modes["beam"].num_beams == 5 and modes["nucleus"].top_p == 0.8 and modes["greedy"].temperature == 0
    no_sampled = dataclasses.replace(cfg, sampled=False)
    assert list(compounding.rollout_configs(no_sampled)) == ["greedy", "nucleus", "beam"]
    for bad, flag in (({"rollouts": ("beam",)}, "--rollouts"), ({"nucleus": 0.0}, "--nucleus")):
        with pytest.raises(ConfigError, match=flag):
            EvaluateConfig(**bad)
    with pytest.raises(ConfigError, match="beam_width"):
        EvaluateConfig(beam_width=0)


# --------------------------------------------------------------------------------------------------
# Leaky against causal view
# --------------------------------------------------------------------------------------------------


def test_model_without_the_causal_mask_is_reported_leaky_and_causal(extrapolated):
    data = metrics_json(extrapolated)
    m, rope = data["models"]["leaky"], data["models"]["rope"]
    assert m["shape"]["causal"] is False and rope["shape"]["causal"] is True
    assert "teacher_forced_views" not in rope
    views = m["teacher_forced_views"]
    assert views["causal"]["val_loss"] == m["val_loss"]  # the top-level metrics are the honest view
    # As trained, each position sees the token it predicts: the leaky loss is far below the causal one.
    assert views["leaky"]["val_loss"] < views["causal"]["val_loss"] - 0.2
    assert views["leaky"]["top1_acc"] > views["causal"]["top1_acc"]
    assert "causal by construction" in views["note"]
    report = (extrapolated / "report.md").read_text()
    assert "leaky (mask off, as trained)" in report and "causal (mask on)" in report
    assert "Rollouts are causal by construction" in report


@pytest.mark.parametrize("positions", ["rope", "alibi", "sinusoidal", "none"])
def test_positions_that_extrapolate_score_windows_past_max_seq_len(positions):
    """Twice the trained context: every position scored, and the first max_seq_len positions score as
    they do in a window of max_seq_len (causal: later tokens change nothing before them)."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, n_heads=2, d_model=16, max_seq_len=8, vocab_size=11, positions=positions)
    model = GPT(cfg).eval()
    x = torch.randint(0, 11, (3, 17))
    long = compounding.position_nll(
        model, [(x[:, :16], x[:, 1:17])], VocabMap.identity(11), torch.device("cpu")
    )
    short = compounding.position_nll(
        model, [(x[:, :8], x[:, 1:9])], VocabMap.identity(11), torch.device("cpu")
    )
    assert long[0].shape == (16,) and torch.isfinite(long[0]).all() and torch.all(long[1] == 3)
    torch.testing.assert_close(long[0][:8], short[0], rtol=1e-4, atol=1e-5)
