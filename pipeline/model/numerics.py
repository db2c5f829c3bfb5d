"""Attention-score numerics (exercise H2.3): mask values against score dtypes, as data.

The model adds `--model.mask-value` to masked scores in `--model.score-dtype` and takes the softmax
there (pipeline/model/gpt.py); these pure functions do the same to one row of scores and measure
what a learner asks about:

* whether the mask value survives the cast (-1e9 is past fp16's largest magnitude, 65504: -inf);
* a fully masked row: -inf everywhere gives a softmax of NaN (0/0); a finite value gives the row
  the same score everywhere (uniform: attention leaks onto keys it must not see) or, when the value
  is small beside the scores, the softmax of the unmasked scores (or of those scores rounded to the
  float spacing at the mask value's magnitude);
* the probability mass leaked onto masked keys of a partly masked row, and the row's largest
  error against an fp64 reference (the masked keys dropped, exactly);
* the unscaled QK^T magnitude past which the dtype overflows to inf, and the size of aligned q and
  k entries that reach it at a given head size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.model.gpt import SCORE_DTYPES

# Mask values as (label, value or None); None: the score dtype's own most negative finite number.
MASK_VALUES: tuple[tuple[str, float | None], ...] = (
    ("-inf", -math.inf),
    ("-1e9", -1e9),
    ("-1e4", -1e4),
    ("finfo(fp32).min", torch.finfo(torch.float32).min),
    ("finfo(dtype).min", None),
)


@dataclass(frozen=True)
class MaskNumerics:
    """One (mask value, score dtype) pair: what the cast, the softmax and the matmul do with it."""

    mask: str  # label in MASK_VALUES
    dtype: str  # key of SCORE_DTYPES
    value: float  # the mask value asked for
    stored: float  # the mask value once cast to the score dtype
    becomes_inf: bool  # a finite value the cast turned into -inf
    full_row: str  # fully masked row's softmax: "nan", "uniform", "unmasked" (as if no mask) or "rounded"
    leaked: float  # probability on masked keys of the partly masked row
    max_error: float  # largest |p - p_fp64| over the partly masked row (masked keys: p_fp64 = 0)
    overflow_score: float  # unscaled QK^T past this magnitude is inf in the dtype
    overflow_entry: float  # aligned q, k entries of this size reach overflow_score at the head size


def mask_value_in(label: str, dtype: torch.dtype) -> float:
    """The value of MASK_VALUES' `label` for scores in `dtype` (before any cast)."""
    value = dict(MASK_VALUES)[label]
    return torch.finfo(dtype).min if value is None else value


def cast(value: float, dtype: torch.dtype) -> float:
    """`value` after the model's cast: written in fp32, then converted to `dtype`."""
    return torch.tensor(value, dtype=torch.float32).to(dtype).item()


def masked_softmax(scores: Tensor, allowed: Tensor, value: float, dtype: torch.dtype) -> Tensor:
    """The model's explicit path on one row: scores and mask in `dtype`, added, softmax there."""
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, value).to(dtype)
    return (scores.to(dtype) + mask).softmax(dim=-1).double()


def reference_softmax(scores: Tensor, allowed: Tensor) -> Tensor:
    """fp64 softmax over the allowed keys only; masked keys get exactly 0."""
    masked = scores.double().masked_fill(~allowed, -math.inf)
    return masked.softmax(dim=-1)


def classify_full_row(probs: Tensor, scores: Tensor) -> str:
    """What a fully masked row's softmax became: nan, uniform, unmasked (softmax of the scores) or
    rounded (the scores, rounded to the float spacing at the mask value's magnitude)."""
    if torch.isnan(probs).any():
        return "nan"
    if bool((probs == probs[0]).all()):
        return "uniform"
    if torch.allclose(probs, scores.double().softmax(dim=-1), atol=1e-2):
        return "unmasked"
    return "rounded"


def overflow_entry(dtype: torch.dtype, head_dim: int) -> float:
    """Entry size a at which q = k = (a, ..., a) of `head_dim` entries give q.k = finfo.max."""
    return math.sqrt(torch.finfo(dtype).max / head_dim)


def qk_overflows(dtype: torch.dtype, head_dim: int, entry: float) -> bool:
    """Whether q.k with q = k = (entry, ..., entry) is inf when the matmul runs in `dtype`."""
    q = torch.full((1, head_dim), entry, dtype=torch.float32).to(dtype)
    return bool(torch.isinf(q @ q.T).any())


def score_row(n_keys: int, score_scale: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed row of `n_keys` scores (std `score_scale`) and its causal mask (first half allowed)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_keys, generator=gen, dtype=torch.float64) * score_scale
    allowed = torch.arange(n_keys) < max(1, n_keys // 2)
    return scores, allowed


def mask_numerics(
    label: str, dtype_name: str, scores: Tensor, allowed: Tensor, head_dim: int
) -> MaskNumerics:
    """Measure one (mask value, score dtype) pair on the row `scores` with mask `allowed`."""
    dtype = SCORE_DTYPES[dtype_name]
    value = mask_value_in(label, dtype)
    stored = cast(value, dtype)
    partial = masked_softmax(scores, allowed, value, dtype)
    full = masked_softmax(scores, torch.zeros_like(allowed), value, dtype)
    return MaskNumerics(
        mask=label,
        dtype=dtype_name,
        value=value,
        stored=stored,
        becomes_inf=math.isfinite(value) and math.isinf(stored),
        full_row=classify_full_row(full, scores),
        leaked=float(partial[~allowed].sum()),
        max_error=float((partial - reference_softmax(scores, allowed)).abs().max()),
        overflow_score=torch.finfo(dtype).max,
        overflow_entry=overflow_entry(dtype, head_dim),
    )


def numerics_table(
    head_dim: int = 64, n_keys: int = 16, score_scale: float = 3.0, seed: int = 0
) -> list[MaskNumerics]:
    """Every mask value of MASK_VALUES against every score dtype (fp32, bf16, fp16)."""
    scores, allowed = score_row(n_keys, score_scale, seed)
    return [
        mask_numerics(label, dtype_name, scores, allowed, head_dim)
        for label, _ in MASK_VALUES
        for dtype_name in SCORE_DTYPES
    ]
