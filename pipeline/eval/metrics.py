"""Compounding-error, degeneration and loss-by-position metrics as pure functions of arrays and texts.

Conventions, for M prompts and N generated tokens compared with the true continuation:

* `matches` is a (M, N) bool array: generated token k equals the reference token k. A reference
  token outside a compact model's kept ids (class `other`) never matches: the model could only
  name it by drawing one of the V - K unseen ids uniformly.
* a(k), accuracy by position: the fraction of prompts whose k-th generated token is right.
* S(k), survival: the fraction whose first k tokens are all right. If every token were right with
  probability p independently of the others, S(k) = p^k; S(k) above p^k means errors cluster,
  below means one error makes the next likelier.
* first divergence: the position (1-based) of the first wrong token; N + 1 when all N are right
  (a censored value: the true divergence lies beyond N).
* Confidence intervals are 95% percentile bootstraps over prompts (prompts are the independent
  units; positions within a prompt are not).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein
from scipy import stats

# --------------------------------------------------------------------------------------------------
# Edit distance
# --------------------------------------------------------------------------------------------------


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance: fewest insertions, deletions and substitutions turning a into b.

    Strings compare character by character, other sequences item by item (any hashable items, e.g.
    the words of a text); rapidfuzz's bit-parallel implementation.
    """
    return Levenshtein.distance(a, b)


def error_rate(hypothesis: Sequence, reference: Sequence) -> float:
    """edit_distance / len(reference); against an empty reference every hypothesis item counts as one error."""
    if not reference:
        return float(len(hypothesis))
    return edit_distance(hypothesis, reference) / len(reference)


def word_error_rate(hypothesis: str, reference: str) -> float:
    """WER over whitespace-separated words."""
    return error_rate(hypothesis.split(), reference.split())


def char_error_rate(hypothesis: str, reference: str) -> float:
    """CER over characters."""
    return error_rate(hypothesis, reference)


# --------------------------------------------------------------------------------------------------
# Compounding errors
# --------------------------------------------------------------------------------------------------


def token_matches(generated: np.ndarray, reference: np.ndarray, other: int | None = None) -> np.ndarray:
    """(M, N) bool: generated class == reference class, never on a reference of class `other`."""
    generated, reference = np.asarray(generated), np.asarray(reference)
    hit = generated == reference
    if other is not None:
        hit &= reference != other
    return hit


def accuracy_by_position(matches: np.ndarray) -> np.ndarray:
    """a(k) for k = 1..N: (N,)."""
    return np.asarray(matches, dtype=np.float64).mean(axis=0)


def survival_indicators(matches: np.ndarray) -> np.ndarray:
    """(M, N): 1 while every token so far matched."""
    return np.cumprod(np.asarray(matches, dtype=np.float64), axis=1)


def survival_by_position(matches: np.ndarray) -> np.ndarray:
    """S(k) for k = 1..N: (N,)."""
    return survival_indicators(matches).mean(axis=0)


def independence_prediction(p: float, n: int) -> np.ndarray:
    """p^k for k = 1..n: the survival curve if every token were right with probability p independently."""
    return float(p) ** np.arange(1, n + 1)


def first_divergence(matches: np.ndarray) -> np.ndarray:
    """(M,) 1-based position of the first mismatch; N + 1 for rows that never diverge."""
    matches = np.asarray(matches, dtype=bool)
    wrong = ~matches
    return np.where(wrong.any(axis=1), wrong.argmax(axis=1) + 1, matches.shape[1] + 1)


def divergence_histogram(first: np.ndarray, n: int) -> list[int]:
    """Counts of first-divergence positions 1..n+1 (the last bin: never diverged)."""
    return np.bincount(np.asarray(first, dtype=np.int64), minlength=n + 2)[1 : n + 2].tolist()


def half_life(survival: np.ndarray) -> int | None:
    """Smallest k with S(k) < 1/2: by then half the continuations have left the reference; None if never."""
    below = np.flatnonzero(np.asarray(survival) < 0.5)
    return int(below[0]) + 1 if len(below) else None


# --------------------------------------------------------------------------------------------------
# Loss by position (exercises H6.3, H9.5)
# --------------------------------------------------------------------------------------------------


def position_buckets(seq_len: int, trained_max_seq_len: int) -> list[tuple[int, int]]:
    """[start, end) buckets of window positions 0..seq_len-1: edges at the powers of two below seq_len,
    and at the trained max_seq_len when the window is longer (so no bucket straddles it)."""
    edges = {0, seq_len} | {2**i for i in range(seq_len.bit_length()) if 2**i < seq_len}
    if 0 < trained_max_seq_len < seq_len:
        edges.add(trained_max_seq_len)
    ordered = sorted(edges)
    return list(itertools.pairwise(ordered))


def bucket_means(
    sums: np.ndarray, counts: np.ndarray, buckets: list[tuple[int, int]]
) -> list[tuple[float, int]]:
    """(mean, count) of per-position sums and counts over each [start, end) bucket."""
    out = []
    for start, end in buckets:
        n = float(np.sum(counts[start:end]))
        out.append((float(np.sum(sums[start:end])) / max(n, 1.0), int(n)))
    return out


# --------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------


def bootstrap_ci(
    values: np.ndarray,
    stat: Callable[[np.ndarray], np.ndarray] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of stat(values) (default: the mean over axis 0), resampling rows.

    `values` is (M, ...) with one row per prompt; `stat` maps a (M, ...) resample to a statistic
    (any shape). Returns (low, high), each shaped like the statistic.

    `scipy.stats.bootstrap` draws the n_boot resamples (row indices from numpy's generator seeded
    with `seed`) and takes the percentiles. The mean, and a numpy reduction taking `axis` (e.g.
    np.median) on (M,) values, are computed on all resamples at once; any other statistic once per
    resample. With fewer than two rows every resample is the data itself: the interval is the
    statistic.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        theta = np.asarray((stat or (lambda v: v.mean(axis=0)))(values), dtype=np.float64)[()]
        return theta, theta
    if stat is None:
        data, statistic = (values,), np.mean
    elif values.ndim == 1 and _takes_axis(stat):
        data, statistic = (values,), stat
    else:  # resample row indices; the statistic sees each resample whole
        data = (np.arange(len(values)),)

        def statistic(rows: np.ndarray, axis: int = -1) -> np.ndarray:  # rows: (n_resamples, M)
            return np.moveaxis(np.stack([np.asarray(stat(values[r])) for r in rows]), 0, -1)

    ci = stats.bootstrap(
        data,
        statistic,
        n_resamples=n_boot,
        batch=_BOOTSTRAP_BATCH,
        vectorized=True,
        axis=0,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return ci.low, ci.high


_BOOTSTRAP_BATCH = 100  # resamples per vectorised call: a (200, 64) curve then takes 10 MB at a time


def _takes_axis(stat: Callable) -> bool:
    try:
        return "axis" in inspect.signature(stat).parameters
    except (TypeError, ValueError):  # no signature to read
        return False


def mean_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float | list[float]]:
    """{'mean', 'ci'} of per-prompt scalars (M,) or per-prompt curves (M, K), as plain JSON data."""
    values = np.asarray(values, dtype=np.float64)
    low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    mean = values.mean(axis=0)
    if mean.ndim == 0:
        return {"mean": float(mean), "ci": [float(low), float(high)]}
    return {"mean": mean.tolist(), "ci": [low.tolist(), high.tolist()]}


# --------------------------------------------------------------------------------------------------
# Degeneration (exercise H9.4)
# --------------------------------------------------------------------------------------------------


def ngrams(seq: Sequence, n: int) -> list[tuple]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seq: Sequence, n: int) -> float:
    """Distinct n-grams / n-grams in one continuation (Li et al. 2016); 1 = no n-gram repeats."""
    grams = ngrams(seq, n)
    return len(set(grams)) / len(grams) if grams else 1.0


def repetition_rate(seq: Sequence, n: int = 4) -> float:
    """Share of n-grams that already occurred earlier in the continuation (seq-rep-n, Welleck et al. 2019)."""
    grams = ngrams(seq, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def loop_period(seq: Sequence, min_repeats: int = 3, min_tokens: int = 8) -> int:
    """The shortest period p such that the continuation *ends* in a loop: its last max(min_repeats * p,
    min_tokens) tokens repeat with period p. 0 when it does not end in a loop."""
    seq = list(seq)
    for p in range(1, len(seq) // min_repeats + 1):
        span = max(min_repeats * p, min_tokens)
        if span > len(seq):
            break
        tail = seq[-span:]
        if all(tail[i] == tail[i - p] for i in range(p, span)):
            return p
    return 0


def degeneration(continuations: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """Per-continuation repetition rate (4-grams), distinct-1, distinct-2 and loop period: (M,) each."""
    return {
        "repetition_rate": np.array([repetition_rate(c) for c in continuations]),
        "distinct_1": np.array([distinct_n(c, 1) for c in continuations]),
        "distinct_2": np.array([distinct_n(c, 2) for c in continuations]),
        "loop_period": np.array([loop_period(c) for c in continuations]),
    }
