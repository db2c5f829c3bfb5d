"""Compounding-error metrics: hand-computed values, and models whose behaviour is known exactly."""

from __future__ import annotations

import dataclasses
import math
from functools import cache

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from known_models import copy_model, counting, successor_model, uniform_model

from pipeline.config import SamplingConfig
from pipeline.data.tokenizer import Tokenizer
from pipeline.data.vocab import VocabMap
from pipeline.errors import UsageError
from pipeline.eval import compounding, metrics
from pipeline.eval.config import EvaluateConfig

V = 8
CHARS = "abc defg"  # 8 symbols with a space, so that WER has words to count
GREEDY = SamplingConfig(temperature=0.0)


# --------------------------------------------------------------------------------------------------
# Edit distance, WER, CER
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("intention", "execution", 5),
        (["the", "cat", "sat"], ["the", "cat", "sat", "down"], 1),
        (["a", "b", "c"], ["c", "b", "a"], 2),
    ],
)
def test_edit_distance_hand_computed(a, b, distance):
    assert metrics.edit_distance(a, b) == distance
    assert metrics.edit_distance(b, a) == distance


@cache
def _naive(a: str, b: str) -> int:
    if not a or not b:
        return len(a) + len(b)
    return min(_naive(a[1:], b) + 1, _naive(a, b[1:]) + 1, _naive(a[1:], b[1:]) + (a[0] != b[0]))


@settings(max_examples=200, deadline=None)
@given(st.text("abc", max_size=7), st.text("abc", max_size=7))
def test_edit_distance_matches_the_recursive_definition(a, b):
    assert metrics.edit_distance(a, b) == _naive(a, b)


def test_word_and_character_error_rates():
    assert metrics.word_error_rate("the cat sat", "the cat sat down") == pytest.approx(1 / 4)
    assert metrics.word_error_rate("a  b\nc", "a b c") == 0.0  # any whitespace separates words
    assert metrics.word_error_rate("x y z w", "a b") == pytest.approx(4 / 2)  # can exceed 1
    assert metrics.char_error_rate("kitten", "sitting") == pytest.approx(3 / 7)
    assert metrics.char_error_rate("", "") == 0.0


# --------------------------------------------------------------------------------------------------
# Survival, divergence, bootstrap, degeneration
# --------------------------------------------------------------------------------------------------


def test_position_metrics_hand_computed():
    matches = np.array([[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=bool)
    assert metrics.accuracy_by_position(matches).tolist() == [0.75, 0.75, 0.75, 1.0]
    assert metrics.survival_by_position(matches).tolist() == [0.75, 0.5, 0.25, 0.25]
    assert metrics.first_divergence(matches).tolist() == [3, 2, 5, 1]  # 5 = never within N = 4
    assert metrics.divergence_histogram(metrics.first_divergence(matches), 4) == [1, 1, 1, 0, 1]
    assert metrics.half_life(metrics.survival_by_position(matches)) == 3
    assert metrics.half_life(np.array([0.9, 0.6])) is None


def test_survival_equals_p_to_the_k_when_errors_are_independent():
    p, n = 0.8, 10
    matches = np.random.default_rng(0).random((40000, n)) < p
    survival = metrics.survival_by_position(matches)
    assert np.allclose(survival, metrics.independence_prediction(p, n), atol=0.01)
    assert np.allclose(metrics.accuracy_by_position(matches), p, atol=0.01)


def test_survival_exceeds_p_to_the_k_when_errors_cluster():
    """Half the prompts always right, half always wrong: p = 0.5 but S(k) stays 0.5."""
    matches = np.repeat(np.array([[True], [False]]), 10, axis=1)
    assert metrics.survival_by_position(matches)[-1] == 0.5
    assert metrics.independence_prediction(0.5, 10)[-1] == pytest.approx(0.5**10)


def test_other_never_matches():
    other = 3
    hit = metrics.token_matches(np.array([[3, 1, 2]]), np.array([[3, 1, 0]]), other)
    assert hit.tolist() == [[False, True, False]]


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_prompts():
    rng = np.random.default_rng(0)
    small, large = rng.normal(2.0, 1.0, 50), rng.normal(2.0, 1.0, 5000)
    low_s, high_s = metrics.bootstrap_ci(small, n_boot=500)
    low_l, high_l = metrics.bootstrap_ci(large, n_boot=500)
    assert low_s < small.mean() < high_s and low_l < 2.0 < high_l
    assert (high_l - low_l) < (high_s - low_s) / 5  # ~ 1 / sqrt(100) as wide
    assert (high_s - low_s) == pytest.approx(2 * 1.96 / math.sqrt(50), rel=0.3)
    curve_low, curve_high = metrics.bootstrap_ci(rng.random((30, 4)), n_boot=100)
    assert curve_low.shape == (4,) and bool((curve_low <= curve_high).all())


def test_degeneration_hand_computed():
    assert metrics.distinct_n([1, 2, 1, 2], 1) == 0.5
    assert metrics.distinct_n([1, 2, 1, 2], 2) == pytest.approx(2 / 3)  # (1,2) (2,1) (1,2)
    assert metrics.repetition_rate([1, 2, 3, 4, 1, 2, 3, 4], n=4) == pytest.approx(1 - 4 / 5)
    assert metrics.repetition_rate([1, 2, 3, 4, 5], n=4) == 0.0
    assert metrics.loop_period([5, 6, 7, 1, 2, 1, 2, 1, 2, 1, 2]) == 2
    assert metrics.loop_period([9] * 8) == 1
    assert metrics.loop_period([9] * 7) == 0  # too short to call a loop
    assert metrics.loop_period([1, 2, 3, 4, 5, 6, 7, 8, 9]) == 0
    assert metrics.loop_period([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3]) == 3


# --------------------------------------------------------------------------------------------------
# Scoring windows
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_tokens", "window"), [(5, 8), (8, 8), (9, 8), (40, 8), (41, 7), (100, 2)])
def test_score_windows_cover_every_prediction_once_with_context(n_tokens, window):
    scored = []
    for start, first, end in compounding.score_windows(n_tokens, window):
        assert start >= 0 and end <= n_tokens - 1 and end - start <= window - 1
        assert first - start >= min(first, window // 2 - 1)  # at least half a window of context
        scored += range(first, end)
    assert scored == list(range(n_tokens - 1))


def test_score_tokens_past_max_seq_len_uses_windows():
    model = successor_model(V, max_seq_len=6)
    seqs = counting(torch.tensor([0, 5]), 20, V)
    nll, top = compounding.score_tokens(model, seqs, VocabMap.identity(V), batch_size=1)
    assert nll.shape == top.shape == (2, 19)
    assert torch.equal(top, seqs[:, 1:])
    assert float(nll.max()) < 1e-6
    last_nll, last_top = compounding.score_tokens(model, seqs, VocabMap.identity(V), last=3)
    assert last_nll.shape == (2, 3)
    assert torch.equal(last_top, seqs[:, -3:])


def test_uniform_model_costs_log_v_per_token_and_compact_other_costs_more():
    seqs = counting(torch.tensor([0, 1]), 10, V)
    nll, _ = compounding.score_tokens(uniform_model(V), seqs, VocabMap.identity(V))
    assert torch.allclose(nll, torch.full_like(nll, math.log(V)))
    compact = VocabMap(100, np.arange(V - 1))  # 7 kept ids + other: an `other` target costs log(93) more
    nll, _ = compounding.score_tokens(uniform_model(V), seqs, compact)
    is_other = seqs[:, 1:] == V - 1
    assert torch.allclose(nll[is_other], torch.tensor(math.log(V) + math.log(100 - 7)))
    assert torch.allclose(nll[~is_other], torch.tensor(math.log(V)))


# --------------------------------------------------------------------------------------------------
# Known models through the whole measurement
# --------------------------------------------------------------------------------------------------


def counting_prompts(m: int, p: int, n: int, seed: int = 0) -> compounding.Prompts:
    starts = torch.as_tensor(np.random.default_rng(seed).integers(0, V, m))
    return compounding.Prompts(starts.numpy(), counting(starts, p + n, V).numpy(), p, n)


def measure(model, prompts, judge=None, **cfg_overrides) -> dict:
    cfg = EvaluateConfig(prompts=len(prompts), gap_horizon=2, bootstrap=100, samples=1, **cfg_overrides)
    cfg = dataclasses.replace(cfg, prompt_tokens=prompts.prompt_tokens, new_tokens=prompts.new_tokens)
    raw = compounding.measure_model(
        model,
        VocabMap.identity(V),
        Tokenizer.char(CHARS),
        prompts,
        np.arange(len(prompts)),
        cfg,
        torch.device("cpu"),
        judge,
    )
    return compounding.summarize(compounding.merge_shares([raw]), cfg, "judge" if judge is not None else None)


def test_always_right_model():
    prompts = counting_prompts(m=20, p=4, n=12)
    m = measure(successor_model(V), prompts, judge=successor_model(V))
    assert m["accuracy_by_position"] == [1.0] * 12
    assert m["survival_by_position"] == [1.0] * 12
    assert m["teacher_forced_accuracy"] == 1.0 and m["independence_prediction"] == [1.0] * 12
    assert m["first_divergence_mean"] == 13.0 and m["half_life"] is None and m["diverged_fraction"] == 0.0
    assert m["wer"] == 0.0 and m["cer"] == 0.0
    assert m["samples"][0]["greedy"] == m["samples"][0]["reference"]
    assert np.allclose(m["exposure_gap"]["gap"], 0.0, atol=1e-6)  # its own prefix is the true prefix
    assert m["judge"]["agreement_rollout"] == 1.0 and m["judge"]["agreement_data"] == 1.0
    assert m["judge"]["nll"] == pytest.approx(0.0, abs=1e-5)
    assert m["sampled"]["accuracy_by_position"] == [1.0] * 12  # the distribution is one-hot


def test_copy_model_on_counting_data_is_always_wrong_and_loops():
    prompts = counting_prompts(m=20, p=4, n=12)
    m = measure(copy_model(V), prompts, judge=successor_model(V))
    assert m["teacher_forced_accuracy"] == 0.0 and m["survival_by_position"] == [0.0] * 12
    # The constant output meets the counting data again every V tokens: a(k) recovers, S(k) never does.
    assert m["accuracy_by_position"] == [1.0 if k % V == 0 else 0.0 for k in range(1, 13)]
    assert m["first_divergence_mean"] == 1.0 and m["half_life"] == 1
    assert m["first_divergence_histogram"][0] == 20
    assert m["degeneration"]["looping"] == 1.0 and m["degeneration"]["distinct_1"] == pytest.approx(1 / 12)
    assert m["judge"]["agreement_rollout"] == 0.0  # the judge always expects the successor
    assert m["judge"]["nll"] > 10 > m["judge"]["nll_reference"]  # the teacher finds the copies absurd
    assert m["wer"] > 0.5 and m["cer"] > 0.9


def test_copy_model_on_sticky_data_survives_as_p_to_the_k():
    """Data that repeats the previous token with probability q, else jumps to another one: the copy
    model is right with probability q at every step, independently, so S(k) = p^k = q^k."""
    q, m_prompts, p_len, n = 0.7, 3000, 2, 6
    rng = np.random.default_rng(0)
    seqs = np.zeros((m_prompts, p_len + n), dtype=np.int64)
    seqs[:, 0] = rng.integers(0, V, m_prompts)
    for t in range(1, p_len + n):
        jump = (seqs[:, t - 1] + rng.integers(1, V, m_prompts)) % V  # any other token
        seqs[:, t] = np.where(rng.random(m_prompts) < q, seqs[:, t - 1], jump)
    prompts = compounding.Prompts(np.arange(m_prompts), seqs, p_len, n)
    m = measure(copy_model(V), prompts, sampled=False, batch_size=1000)
    assert m["teacher_forced_accuracy"] == pytest.approx(q, abs=0.02)
    assert np.allclose(m["survival_by_position"], q ** np.arange(1, n + 1), atol=0.025)
    assert np.allclose(m["survival_by_position"], m["independence_prediction"], atol=0.03)
    # a(k) is higher than S(k): after leaving, the data can come back to the copied token.
    assert m["accuracy_by_position"][-1] > m["survival_by_position"][-1] + 0.05


def test_uniformly_random_model_is_right_one_time_in_v():
    prompts = counting_prompts(m=400, p=2, n=10)
    m = measure(uniform_model(V), prompts, batch_size=400)
    assert float(np.mean(m["sampled"]["accuracy_by_position"])) == pytest.approx(1 / V, abs=0.02)
    assert m["teacher_forced_loss"] == pytest.approx(math.log(V), abs=1e-5)
    lo, hi = m["sampled"]["first_divergence_mean_ci"]
    assert lo < 1 / (1 - 1 / V) < hi + 0.05  # geometric: mean first error at 1 / (1 - 1/V)


def test_exposure_gap_is_zero_at_j_zero_and_positive_when_the_own_prefix_misleads():
    """The copy model on counting data: after its own (constant) prefix it still copies, so the true
    continuation is as wrong as ever; after the true prefix too. A model whose loss depends on the
    context shows a gap: the successor model fed the copy model's output."""
    prompts = counting_prompts(m=10, p=3, n=8)
    cls = torch.as_tensor(prompts.ids)
    own = copy_model(V)
    generated = compounding.rollout(own, cls[:, :3], 8, GREEDY, VocabMap.identity(V))
    positions = compounding.gap_positions(8, 2)
    assert positions == [0, 1, 2, 4, 6]
    judge = successor_model(V)
    own_loss, true_loss = compounding.exposure_gap(
        judge, cls[:, :3], generated, cls[:, 3:], VocabMap.identity(V), 2, positions
    )
    assert np.allclose(own_loss[:, 0], true_loss[:, 0])
    assert np.allclose(true_loss, 0.0, atol=1e-5)
    assert (own_loss[:, 1:] > 5).all()  # the first true token after a copied one is unexpected


def test_incompatible_models_are_refused():
    class FakeExport:
        def __init__(self, chars, vocab):
            self.tokenizer, self.vocab, self.path, self.info = (
                Tokenizer.char(chars),
                vocab,
                "x",
                {"data": {"dir": "d"}},
            )

    ok = FakeExport(CHARS, VocabMap.identity(V))
    compounding.check_compatible(Tokenizer.char(CHARS).spec, "data", {"a": ok, "b": ok})
    with pytest.raises(UsageError, match="tokenizer char"):
        compounding.check_compatible(Tokenizer.char("xyz").spec, "data", {"a": ok})
    other = FakeExport(CHARS, VocabMap(V, np.arange(3)))
    with pytest.raises(UsageError, match="different vocabulary maps"):
        compounding.check_compatible(Tokenizer.char(CHARS).spec, "data", {"a": ok, "b": other})


def test_prompts_are_seeded_and_checked():
    val = np.arange(1000)
    a = compounding.sample_prompts(val, 10, 4, 6, seed=3)
    assert np.array_equal(a.ids, compounding.sample_prompts(val, 10, 4, 6, seed=3).ids)
    assert not np.array_equal(a.starts, compounding.sample_prompts(val, 10, 4, 6, seed=4).starts)
    assert np.array_equal(a.ids, a.starts[:, None] + np.arange(10))  # real val windows
    assert len(set(a.starts.tolist())) == 10
    with pytest.raises(UsageError, match="fewer than --prompt-tokens"):
        compounding.sample_prompts(np.arange(5), 2, 4, 6, seed=0)
