"""Divergences between teacher and student distributions over "buckets", and their gradients.

With p the teacher's and q the student's distribution:

* forward_kl: KL(p || q), mass-covering;
* reverse_kl: KL(q || p), mode-seeking;
* jsd: the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024),
  beta * KL(p || m) + (1 - beta) * KL(q || m) with m = beta * p + (1 - beta) * q. beta weighs the
  *teacher* in the mixture: as beta -> 0 it tends to beta * KL(p || q) (forward KL), as beta -> 1 to
  (1 - beta) * KL(q || p) (reverse KL). The endpoints are taken as exactly those two KLs:
  beta = 0 is forward KL, beta = 1 is reverse KL;
* topk_kl: forward KL over the teacher's top-k classes plus one bucket holding the rest of the
  mass of each distribution.

Every divergence is a function of two distributions over the same "buckets": single classes, or
(with topk_kl and with the teacher cache) the teacher's top-k classes and one tail bucket.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_FLOOR = -1e4  # log-probabilities below this count as zero probability (exp underflows to 0)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where losses are computed: fp32, or fp64 when the inputs are (gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kl(loga: Tensor, logb: Tensor) -> Tensor:
    """sum_b a_b (log a_b - log b_b) over the last dimension; a_b = 0 terms are 0."""
    loga = loga.clamp_min(LOG_FLOOR)
    return (loga.exp() * (loga - logb.clamp_min(LOG_FLOOR))).sum(-1)


def _mixture(logp: Tensor, logq: Tensor, beta: float) -> Tensor:
    """log(beta * p + (1 - beta) * q)."""
    return torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))


def _effective(kind: str, beta: float) -> str:
    if kind == "jsd" and beta == 0.0:
        return "forward_kl"
    if kind == "jsd" and beta == 1.0:
        return "reverse_kl"
    return "forward_kl" if kind == "topk_kl" else kind


def divergence(logp: Tensor, logq: Tensor, kind: str, beta: float = 0.5) -> Tensor:
    """Per-row divergence between teacher log-probs `logp` and student log-probs `logq`, both (n, K)."""
    kind = _effective(kind, beta)
    if kind == "forward_kl":
        return kl(logp, logq)
    if kind == "reverse_kl":
        return kl(logq, logp)
    logm = _mixture(logp, logq, beta)
    return beta * kl(logp, logm) + (1.0 - beta) * kl(logq, logm)


def divergence_r(logp: Tensor, logq: Tensor, kind: str, beta: float = 0.5) -> Tensor:
    """r_b = q_b * dD/dq_b per bucket (n, K), from which every logit gradient follows.

    forward KL: -p_b; reverse KL: q_b (log q_b - log p_b + 1); jsd: (1 - beta) q_b (log q_b - log m_b).
    """
    kind = _effective(kind, beta)
    logq = logq.clamp_min(LOG_FLOOR)
    if kind == "forward_kl":
        return -logp.exp()
    q = logq.exp()
    if kind == "reverse_kl":
        return q * (logq - logp.clamp_min(LOG_FLOOR) + 1.0)
    return (1.0 - beta) * q * (logq - _mixture(logp, logq, beta))


def bucket_grad(logq: Tensor, r: Tensor, ids: Tensor | None, logq_tail: Tensor | None) -> Tensor:
    """d D / d (student logits / T), (n, V), from the bucket quantities r (n, K).

    With single-class buckets: r - q * sum(r). With top-k buckets `ids` (n, k) and a tail bucket
    (log-mass `logq_tail`), a tail class j gets q_j / q_tail * r_tail - q_j * sum(r).
    """
    q = logq.exp()
    total = r.sum(-1, keepdim=True)
    if ids is None:
        return r - q * total
    grad = (logq - logq_tail[:, None]).exp() * r[:, -1:] - q * total
    return grad.scatter_(1, ids, r[:, :-1] - q.gather(1, ids) * total)


def student_buckets(logq: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """The student's log-probs on the teacher's top-k `ids` plus the tail bucket: ((n, k + 1), tail (n,))."""
    tail = logq.scatter(1, ids, -math.inf).logsumexp(-1)
    return torch.cat((logq.gather(1, ids), tail[:, None]), dim=1), tail


def teacher_topk(logp: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The teacher's top-k classes and its log-probs on them plus the tail bucket: (ids (n, k), (n, k + 1))."""
    top, ids = logp.topk(k, dim=-1)
    tail = logp.scatter(1, ids, -math.inf).logsumexp(-1)
    return ids, torch.cat((top, tail[:, None]), dim=1)


def attention_transfer(
    student: list[Tensor], teacher: list[Tensor], layers: list[int], valid: Tensor
) -> Tensor:
    """KL(teacher's head-averaged attention row || student's), summed over valid query rows, mean over layers.

    student[i] (B, H_s, T, S) is matched with teacher[layers[i]] (B, H_t, T, S); valid (B, T).
    """
    total = torch.zeros((), dtype=torch.float32, device=valid.device)
    for probs, layer in zip(student, layers):
        p = teacher[layer].float().mean(1)  # (B, T, S)
        q = probs.float().mean(1)
        div = kl(p.clamp_min(1e-30).log(), q.clamp_min(1e-30).log())  # (B, T)
        total = total + (div * valid).sum()
    return total / max(len(student), 1)


def relative_state_error(
    student: list[Tensor], teacher: list[Tensor], inputs: list[Tensor], valid: Tensor
) -> Tensor:
    """Squared error of residual states relative to the teacher's update, summed over valid tokens, mean over layers.

    Per token, ||s - t||^2 / ||t - input||^2: the error as a share of the teacher's own change from
    `inputs` (detached), so 1.0 means "as far off as not moving at all", whatever the states' scale.
    A per-token ratio depends on no other token: the loss is the same however the batch is split
    over micro-batches and processes. student[i], teacher[i], inputs[i]: (B, T, C); valid (B, T).
    """
    mask = valid.float()
    total = torch.zeros((), dtype=torch.float32, device=valid.device)
    for s, t, h in zip(student, teacher, inputs):
        t = t.float()
        update = (t - h.float()).pow(2).sum(-1).detach().clamp_min(1e-12)  # (B, T)
        total = total + ((s.float() - t).pow(2).sum(-1) / update * mask).sum()
    return total / max(len(student), 1)
