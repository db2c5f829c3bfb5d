"""Compounding-error metrics: hand-computed values, and models whose behaviour is known exactly."""

from __future__ import annotations

import dataclasses
import json
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
from pipeline.eval.results import AttentionResult, Compounding, ModelResult, Shape, TeacherForced
from pipeline.run.checkpoint import DataInfo, ExportInfo

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


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["the", "cat", "sat"]), max_size=7),
    st.lists(st.sampled_from(["the", "a"]), max_size=7),
)
def test_edit_distance_over_words_matches_the_recursive_definition(a, b):
    assert metrics.edit_distance(a, b) == _naive(tuple(a), tuple(b))


def test_error_rates_keep_every_character_and_count_all_errors_against_an_empty_reference():
    assert metrics.char_error_rate(" kitten", "kitten") == pytest.approx(1 / 6)  # no stripping
    assert metrics.char_error_rate("a\tb", "a b") == pytest.approx(1 / 3)  # nor whitespace folding
    assert metrics.word_error_rate("a b", "") == 2.0 and metrics.char_error_rate("ab", "") == 2.0
    assert metrics.word_error_rate("", "a b") == 1.0 and metrics.word_error_rate("  ", "") == 0.0


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


def _simple_bootstrap(values, stat, n_boot, seed):
    """Percentile bootstrap written out: (low, high, standard error of the statistic)."""
    rng = np.random.default_rng(seed)
    draws = np.stack([stat(values[rng.integers(0, len(values), len(values))]) for _ in range(n_boot)])
    return np.quantile(draws, 0.025, axis=0), np.quantile(draws, 0.975, axis=0), draws.std(axis=0)


K = np.arange(1, 7)
_DATA = np.random.default_rng(0)
_SCALARS = _DATA.normal(2.0, 1.0, 200)
_CURVES = (_DATA.random((200, 6)) < np.linspace(0.9, 0.4, 6)).astype(np.float64)


@pytest.mark.parametrize(
    ("values", "stat", "plain"),
    [
        (_SCALARS, None, lambda v: v.mean(axis=0)),
        (_CURVES, None, lambda v: v.mean(axis=0)),
        (_SCALARS, np.median, np.median),
        (_CURVES, lambda v: v.mean() ** K, lambda v: v.mean() ** K),
    ],
    ids=["mean", "curve", "median", "mean-power"],
)
def test_bootstrap_agrees_with_simple_resampling_and_covers_the_statistic(values, stat, plain):
    """scipy's interval against the loop above with another seed: they differ only by Monte-Carlo
    noise. A 2.5% (97.5%) percentile from 2000 resamples has a Monte-Carlo error of about 0.06
    bootstrap standard errors, so two independent runs differ by about 0.09; allowed: 0.5 standard
    errors, which also covers the 1/M steps of a mean of 0/1 values (0.16 to 0.24 of one here)."""
    low, high = metrics.bootstrap_ci(values, stat, n_boot=2000, seed=0)
    simple_low, simple_high, se = _simple_bootstrap(values, plain, 2000, seed=1)
    assert np.all(np.abs(low - simple_low) <= 0.5 * se)
    assert np.all(np.abs(high - simple_high) <= 0.5 * se)
    theta = plain(values)
    assert np.all(low < theta) and np.all(theta < high)
    assert np.all(high - low == pytest.approx(2 * 1.96 * se, rel=0.15))  # ~ normal at M = 200


def test_bootstrap_is_seeded_and_the_same_whether_vectorised_or_not():
    low, high = metrics.bootstrap_ci(_SCALARS, np.median, n_boot=300, seed=5)
    assert (low, high) == metrics.bootstrap_ci(_SCALARS, np.median, n_boot=300, seed=5)
    assert (low, high) != metrics.bootstrap_ci(_SCALARS, np.median, n_boot=300, seed=6)
    # np.median takes `axis` (all resamples at once), the lambda does not (one resample at a time).
    assert (low, high) == metrics.bootstrap_ci(_SCALARS, lambda v: np.median(v), n_boot=300, seed=5)
    curve = metrics.bootstrap_ci(_CURVES, n_boot=300, seed=5)
    looped = metrics.bootstrap_ci(_CURVES, lambda v: v.mean(axis=0), n_boot=300, seed=5)
    assert np.allclose(curve, looped, rtol=0, atol=1e-12)
    narrow = metrics.bootstrap_ci(_SCALARS, n_boot=300, seed=5, level=0.5)
    wide = metrics.bootstrap_ci(_SCALARS, n_boot=300, seed=5)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_bootstrap_of_one_prompt_is_the_statistic():
    assert metrics.bootstrap_ci(np.array([3.0])) == (3.0, 3.0)
    low, high = metrics.bootstrap_ci(np.array([[1.0, 0.0, 1.0]]))
    assert low.tolist() == high.tolist() == [1.0, 0.0, 1.0]
    assert metrics.mean_ci(np.array([0.25])) == {"mean": 0.25, "ci": [0.25, 0.25]}


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


def measure(model, prompts, judge=None, **cfg_overrides) -> Compounding:
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
    g, ref = m.greedy, m.reference
    assert g.accuracy_by_position.mean == [1.0] * 12
    assert g.survival_by_position.mean == [1.0] * 12
    assert ref.teacher_forced_accuracy.mean == 1.0 and ref.independence_prediction.mean == [1.0] * 12
    assert g.first_divergence_mean.mean == 13.0 and g.half_life is None and g.diverged_fraction == 0.0
    assert g.wer.mean == 0.0 and g.cer.mean == 0.0
    assert m.samples[0].continuations["greedy"].text == m.samples[0].reference
    assert np.allclose(g.exposure_gap.gap.mean, 0.0, atol=1e-6)  # its own prefix is the true prefix
    assert g.judge.agreement_rollout.mean == 1.0 and g.judge.agreement_data.mean == 1.0
    assert g.judge.nll.mean == pytest.approx(0.0, abs=1e-5)
    assert m.sampled.accuracy_by_position.mean == [1.0] * 12  # the distribution is one-hot


def test_copy_model_on_counting_data_is_always_wrong_and_loops():
    prompts = counting_prompts(m=20, p=4, n=12)
    m = measure(copy_model(V), prompts, judge=successor_model(V))
    g = m.greedy
    assert m.reference.teacher_forced_accuracy.mean == 0.0 and g.survival_by_position.mean == [0.0] * 12
    # The constant output meets the counting data again every V tokens: a(k) recovers, S(k) never does.
    assert g.accuracy_by_position.mean == [1.0 if k % V == 0 else 0.0 for k in range(1, 13)]
    assert g.first_divergence_mean.mean == 1.0 and g.half_life == 1
    assert g.first_divergence_histogram[0] == 20
    assert g.degeneration.looping.mean == 1.0 and g.degeneration.distinct_1.mean == pytest.approx(1 / 12)
    assert g.judge.agreement_rollout.mean == 0.0  # the judge always expects the successor
    assert g.judge.nll.mean > 10 > g.judge.nll_reference.mean  # the teacher finds the copies absurd
    assert g.wer.mean > 0.5 and g.cer.mean > 0.9


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
    survival = m.greedy.survival_by_position.mean
    assert m.reference.teacher_forced_accuracy.mean == pytest.approx(q, abs=0.02)
    assert np.allclose(survival, q ** np.arange(1, n + 1), atol=0.025)
    assert np.allclose(survival, m.reference.independence_prediction.mean, atol=0.03)
    # a(k) is higher than S(k): after leaving, the data can come back to the copied token.
    assert m.greedy.accuracy_by_position.mean[-1] > survival[-1] + 0.05


def test_uniformly_random_model_is_right_one_time_in_v():
    prompts = counting_prompts(m=400, p=2, n=10)
    m = measure(uniform_model(V), prompts, batch_size=400)
    assert float(np.mean(m.sampled.accuracy_by_position.mean)) == pytest.approx(1 / V, abs=0.02)
    assert m.reference.teacher_forced_loss == pytest.approx(math.log(V), abs=1e-5)
    first = m.sampled.first_divergence_mean
    assert first.low < 1 / (1 - 1 / V) < first.high + 0.05  # geometric: mean first error at 1 / (1 - 1/V)


METRICS_JSON_KEYS = """path kind preset parameters shape val_loss val_ppl bits_per_byte top1_acc top5_acc ece
val_tokens prompts teacher_forced_loss teacher_forced_accuracy teacher_forced_accuracy_ci
teacher_forced_accuracy_by_position independence_prediction independence_prediction_ci accuracy_by_position
accuracy_by_position_ci survival_by_position survival_by_position_ci half_life first_divergence_mean
first_divergence_mean_ci first_divergence_median first_divergence_median_ci first_divergence_histogram
diverged_fraction wer wer_ci cer cer_ci exposure_gap degeneration judge sampled samples attention""".split()  # noqa: SIM905


@pytest.mark.parametrize("judged_and_sampled", [True, False])
def test_model_result_is_metrics_json_and_round_trips(judged_and_sampled):
    """ModelResult.to_json is a model's metrics.json entry: greedy metrics at the top level, sampled ones
    under "sampled", each interval as <name>_ci, no attention maps; from_json reads it back."""
    prompts = counting_prompts(m=20, p=4, n=12)
    judge = successor_model(V) if judged_and_sampled else None
    c = measure(copy_model(V), prompts, judge=judge, sampled=judged_and_sampled)
    m = ModelResult(
        path="runs/pretrain/x/best",
        kind="teacher",
        preset="tiny",
        parameters=1234,
        shape=Shape(n_layers=1, n_heads=2, d_model=8, positions="rope"),
        teacher_forced=TeacherForced(2.0, 7.4, 2.9, 0.25, 0.5, 0.125, 4096.0),
        reference=c.reference,
        greedy=c.greedy,
        sampled=c.sampled,
        samples=c.samples,
        attention=AttentionResult(
            [[1.5, 0.5]], [[0.75, 0.25]], [[0.5, 0.95]], 0.9, [[0, 1]], np.ones((1, 2, 4, 4))
        ),
    )
    data = json.loads(json.dumps(m.to_json()))
    assert list(data) == [k for k in METRICS_JSON_KEYS if judged_and_sampled or k not in ("judge", "sampled")]
    assert list(data["attention"]) == [
        "entropy",
        "entropy_normalised",
        "max_prob",
        "collapse_threshold",
        "collapsed",
    ]
    assert data["wer"] == c.greedy.wer.mean and data["wer_ci"] == [c.greedy.wer.low, c.greedy.wer.high]
    assert data["exposure_gap"]["gap_ci"] == [c.greedy.exposure_gap.gap.low, c.greedy.exposure_gap.gap.high]
    modes = ["greedy", "sampled"] if judged_and_sampled else ["greedy"]
    assert list(data["samples"][0]) == [
        "prompt",
        "reference",
        *modes,
        *[f"{mode}_diverge_char" for mode in modes],
    ]
    back = ModelResult.from_json(data)
    assert back == m and back.attention.maps is None and back.to_json() == data


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
                ExportInfo("teacher", "tiny", "x", DataInfo("d", "char", len(chars), 100, 1.0)),
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
