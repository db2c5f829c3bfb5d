"""The distillation head: CE and soft loss from the student's hidden states and head, in chunks, gradients in the forward.

The per-token objective is

    alpha * CE(student, label) + (1 - alpha) * T^2 * D(teacher_T, student_T)

where `_T` means softmax(logits / T) and the T^2 factor keeps the soft gradients' size independent
of T (Hinton et al. 2015); D is one of `pipeline.distill.divergences`. Like
pipeline/train/losses.py, the student's loss is computed inside its forward (a `head_fn`), in fp32,
chunk by chunk over rows: teacher and student logits exist for one chunk at a time, and the
gradients with respect to the student's hidden states and head are made in the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.distill.config import KDConfig
from pipeline.distill.divergences import (
    bucket_grad,
    divergence,
    divergence_r,
    kl,
    student_buckets,
    teacher_topk,
    wide_dtype,
)
from pipeline.train.losses import IGNORE, chunk_rows, chunked_logits, compute_dtype


@dataclass
class TeacherOutputs:
    """The teacher's side of a batch, rows flattened: live (hidden, weight) or cached (ids, logp, tail).

    Cached log-probs were computed at the run's temperature, so only their rows are taken here.
    """

    hidden: Tensor | None = None  # (N, C_teacher), final hidden states
    weight: Tensor | None = None  # (V, C_teacher), the teacher's LM head
    ids: Tensor | None = None  # (N, k) top-k classes
    logp: Tensor | None = None  # (N, k) log-probs on them
    tail: Tensor | None = None  # (N,) log-mass of the rest

    def buckets(self, rows: slice, kd: KDConfig, dtype: torch.dtype) -> tuple[Tensor | None, Tensor]:
        """(top-k ids or None, teacher log-probs over the buckets) for `rows`, at temperature T."""
        if self.ids is not None:
            wide = wide_dtype(dtype)
            logp = torch.cat((self.logp[rows].to(wide), self.tail[rows, None].to(wide)), dim=1)
            return self.ids[rows].long(), logp
        logits = (self.hidden[rows].to(dtype) @ self.weight.to(dtype).t()).to(wide_dtype(dtype))
        logp = (logits / kd.temperature).log_softmax(-1)
        if kd.loss == "topk_kl":
            return teacher_topk(logp, kd.top_k)
        return None, logp


@dataclass(frozen=True)
class Weights:
    """How one batch's terms add up per valid token: ce * CE + soft * T^2 * D."""

    ce: float
    soft: float
    temperature: float = 1.0

    def total(self, ce: Tensor, soft: Tensor) -> Tensor:
        return self.ce * ce + self.soft * self.temperature**2 * soft


def _chunk(
    zs: Tensor,
    t: Tensor,
    teacher: tuple[Tensor | None, Tensor] | None,
    kd: KDConfig,
    w: Weights,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Summed CE and soft loss of one chunk of fp32 student logits zs (n, V); with need_grad, d total / d zs."""
    valid = t != IGNORE
    safe_t = t.clamp(min=0)
    lse = zs.logsumexp(-1)
    ce = ((lse - zs.gather(1, safe_t[:, None]).squeeze(1)) * valid).sum()
    soft = torch.zeros_like(ce)
    grad = None
    if need_grad:
        grad = (zs - lse[:, None]).exp_()  # softmax - one_hot: d CE / d zs
        grad.scatter_add_(1, safe_t[:, None], torch.full_like(lse[:, None], -1.0))
        grad.mul_(w.ce)
    if teacher is not None:
        ids, logp = teacher
        logq = (zs / w.temperature).log_softmax(-1)
        logq_b, tail = student_buckets(logq, ids) if ids is not None else (logq, None)
        soft = (divergence(logp, logq_b, kd.loss, kd.beta) * valid).sum()
        if need_grad:
            r = divergence_r(logp, logq_b, kd.loss, kd.beta)
            grad.add_(bucket_grad(logq, r, ids, tail), alpha=w.soft * w.temperature)  # T^2 * (1/T)
    if need_grad:
        grad.mul_(valid[:, None])
    return ce, soft, grad


class LinearDistill(torch.autograd.Function):
    """(total, CE, soft) summed over valid rows of hidden @ weight.T, gradients made chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher, kd, w, dtype, chunk):
        h, wt = hidden.to(dtype), weight.to(dtype)
        wide = wide_dtype(dtype)
        grad_h = torch.zeros_like(hidden, dtype=wide)
        grad_w = torch.zeros_like(weight, dtype=wide)
        ce = torch.zeros((), dtype=wide, device=hidden.device)
        soft = torch.zeros_like(ce)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, min(start + chunk, h.shape[0]))
            zs = (h[rows] @ wt.t()).to(wide)  # (n, V)
            buckets = teacher.buckets(rows, kd, dtype) if teacher is not None else None
            c, s, g = _chunk(zs, targets[rows], buckets, kd, w, need_grad=True)
            ce += c
            soft += s
            g = g.to(dtype)
            grad_h[rows] = (g @ wt).to(wide)
            grad_w += (g.t() @ h[rows]).to(wide)
        ctx.save_for_backward(grad_h.to(hidden.dtype), grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(ce, soft)
        return w.total(ce, soft), ce, soft

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_soft):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_total, grad_w * grad_total, None, None, None, None, None, None


class DistillHead:
    """A `head_fn` for the student's GPT.forward: (total, CE, soft), each summed over valid targets (fp32).

    `teacher` holds the teacher's side for the same rows (None: hard labels only). fused=False
    materialises the full logits and lets autograd differentiate: the reference the fused path is
    tested against.
    """

    def __init__(
        self,
        targets: Tensor,
        teacher: TeacherOutputs | None,
        kd: KDConfig,
        weights: Weights,
        fused: bool = True,
        chunk: int | None = None,
    ) -> None:
        self.targets, self.teacher, self.kd, self.w = targets, teacher, kd, weights
        self.fused, self.chunk = fused, chunk

    @torch.compiler.disable  # eager under --train.compile, as train.losses.CrossEntropyHead
    def __call__(self, hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = hidden.reshape(-1, hidden.shape[-1])  # (B*T, C)
        t = self.targets.reshape(-1)
        dtype = compute_dtype(h)
        if not self.fused:
            return self._reference(h, weight, t, dtype)
        chunk = self.chunk or chunk_rows(weight.shape[0])
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            with torch.autocast(h.device.type, enabled=False):
                return LinearDistill.apply(h, weight, t, self.teacher, self.kd, self.w, dtype, chunk)
        ce = torch.zeros((), dtype=wide_dtype(dtype), device=h.device)
        soft = torch.zeros_like(ce)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, min(start + chunk, h.shape[0]))
            zs = (h[rows].to(dtype) @ weight.to(dtype).t()).to(wide_dtype(dtype))  # (n, V)
            buckets = self.teacher.buckets(rows, self.kd, dtype) if self.teacher is not None else None
            c, s, _ = _chunk(zs, t[rows], buckets, self.kd, self.w, need_grad=False)
            ce, soft = ce + c, soft + s
        return self.w.total(ce, soft), ce, soft

    def _reference(self, h: Tensor, weight: Tensor, t: Tensor, dtype: torch.dtype):
        zs = (h.to(dtype) @ weight.to(dtype).t()).to(wide_dtype(dtype))  # (N, V): the whole logits
        ce = F.cross_entropy(zs, t, ignore_index=IGNORE, reduction="sum")
        soft = torch.zeros_like(ce)
        if self.teacher is not None:
            ids, logp = self.teacher.buckets(slice(None), self.kd, dtype)
            logq = (zs / self.w.temperature).log_softmax(-1)
            logq_b = student_buckets(logq, ids)[0] if ids is not None else logq
            soft = (divergence(logp, logq_b, self.kd.loss, self.kd.beta) * (t != IGNORE)).sum()
        return self.w.total(ce, soft), ce.detach(), soft.detach()


class AgreementHead:
    """A `head_fn` for validation: summed top-1 agreement and KL(teacher || student) at T = 1.

    With a compacted vocabulary both models spread p(other) evenly over the same unseen ids, so the
    KL over classes equals the KL over the full vocabulary.
    """

    def __init__(self, teacher_hidden: Tensor, teacher_weight: Tensor) -> None:
        self.teacher_hidden, self.teacher_weight = teacher_hidden, teacher_weight

    def __call__(self, hidden: Tensor, weight: Tensor) -> Tensor:
        h = hidden.reshape(-1, hidden.shape[-1])
        th = self.teacher_hidden.reshape(-1, self.teacher_hidden.shape[-1])
        chunk = chunk_rows(weight.shape[0])
        dtype = compute_dtype(h)
        sums = torch.zeros(2, dtype=torch.float64, device=h.device)
        for rows, zs in chunked_logits(h, weight, chunk):
            zt = (th[rows].to(dtype) @ self.teacher_weight.to(dtype).t()).float()
            agree = (zs.argmax(-1) == zt.argmax(-1)).double().sum()
            div = kl(zt.log_softmax(-1), zs.log_softmax(-1)).double().sum()
            sums += torch.stack([agree, div])
        return sums
