"""Knowledge distillation: soft losses, the distillation head, teacher handling, batches and logging.

The per-token objective is

    alpha * CE(student, label) + (1 - alpha) * T^2 * D(teacher_T, student_T)

where `_T` means softmax(logits / T) and the T^2 factor keeps the soft gradients' size independent
of T (Hinton et al. 2015). D is one of, with p the teacher's and q the student's distribution:

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

Like pipeline/losses.py, the student's loss is computed inside its forward (a `head_fn`), in fp32,
chunk by chunk over rows: teacher and student logits exist for one chunk at a time, and the
gradients with respect to the student's hidden states and head are made in the forward pass.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor

from pipeline.checkpoint import Export
from pipeline.cli import UsageError
from pipeline.config import KDConfig, OnPolicyConfig
from pipeline.data import TokenData, TrainWindows
from pipeline.evaluation import evaluate_lm
from pipeline.generation import SamplingConfig, generate
from pipeline.losses import IGNORE, chunk_rows, chunked_logits, compute_dtype
from pipeline.model import GPT
from pipeline.tracking import Reporter
from pipeline.vocab import VocabMap

LOG_FLOOR = -1e4  # log-probabilities below this count as zero probability (exp underflows to 0)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """Where losses are computed: fp32, or fp64 when the inputs are (gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# Divergences over buckets, and their gradients
# --------------------------------------------------------------------------------------------------


def _kl(loga: Tensor, logb: Tensor) -> Tensor:
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
        return _kl(logp, logq)
    if kind == "reverse_kl":
        return _kl(logq, logp)
    logm = _mixture(logp, logq, beta)
    return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)


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


# --------------------------------------------------------------------------------------------------
# What the teacher provides: live hidden states, or cached top-k log-probs
# --------------------------------------------------------------------------------------------------


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
            wide = _wide(dtype)
            logp = torch.cat((self.logp[rows].to(wide), self.tail[rows, None].to(wide)), dim=1)
            return self.ids[rows].long(), logp
        logits = (self.hidden[rows].to(dtype) @ self.weight.to(dtype).t()).to(_wide(dtype))
        logp = (logits / kd.temperature).log_softmax(-1)
        if kd.loss == "topk_kl":
            return teacher_topk(logp, kd.top_k)
        return None, logp


# --------------------------------------------------------------------------------------------------
# The distillation head
# --------------------------------------------------------------------------------------------------


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
        wide = _wide(dtype)
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
        ce = torch.zeros((), dtype=_wide(dtype), device=h.device)
        soft = torch.zeros_like(ce)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, min(start + chunk, h.shape[0]))
            zs = (h[rows].to(dtype) @ weight.to(dtype).t()).to(_wide(dtype))  # (n, V)
            buckets = self.teacher.buckets(rows, self.kd, dtype) if self.teacher is not None else None
            c, s, _ = _chunk(zs, t[rows], buckets, self.kd, self.w, need_grad=False)
            ce, soft = ce + c, soft + s
        return self.w.total(ce, soft), ce, soft

    def _reference(self, h: Tensor, weight: Tensor, t: Tensor, dtype: torch.dtype):
        zs = (h.to(dtype) @ weight.to(dtype).t()).to(_wide(dtype))  # (N, V): the whole logits
        ce = F.cross_entropy(zs, t, ignore_index=IGNORE, reduction="sum")
        soft = torch.zeros_like(ce)
        if self.teacher is not None:
            ids, logp = self.teacher.buckets(slice(None), self.kd, dtype)
            logq = (zs / self.w.temperature).log_softmax(-1)
            logq_b = student_buckets(logq, ids)[0] if ids is not None else logq
            soft = (divergence(logp, logq_b, self.kd.loss, self.kd.beta) * (t != IGNORE)).sum()
        return self.w.total(ce, soft), ce.detach(), soft.detach()


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
        kl = _kl(p.clamp_min(1e-30).log(), q.clamp_min(1e-30).log())  # (B, T)
        total = total + (kl * valid).sum()
    return total / max(len(student), 1)


# --------------------------------------------------------------------------------------------------
# Validation: teacher-student agreement
# --------------------------------------------------------------------------------------------------


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
            kl = _kl(zt.log_softmax(-1), zs.log_softmax(-1)).double().sum()
            sums += torch.stack([agree, kl])
        return sums


@torch.no_grad()
def evaluate_agreement(
    model: torch.nn.Module, teacher: GPT, batches: list[tuple[Tensor, Tensor]], accelerator: Accelerator
) -> dict[str, float]:
    """val_agree_top1 (share of tokens where student and teacher agree on the top class) and val_kl."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for x, _ in batches:
        x = x.to(accelerator.device)
        with accelerator.autocast():
            hidden, _ = teacher.hidden_states(x)
            agree_kl = model(x, head_fn=AgreementHead(hidden, teacher.head_weight))
        sums += torch.cat((agree_kl, torch.tensor([float(x.numel())], dtype=torch.float64, device=x.device)))
    sums = accelerator.reduce(sums, "sum")
    if was_training:
        model.train()
    n = max(float(sums[2]), 1.0)
    return {"val_agree_top1": float(sums[0]) / n, "val_kl": float(sums[1]) / n}


# --------------------------------------------------------------------------------------------------
# The teacher: frozen, compatible with the data, its heads ranked
# --------------------------------------------------------------------------------------------------


def check_on_policy_supported(accelerator: Accelerator, fraction: float) -> None:
    """On-policy batches generate with the whole student on each process, which FSDP does not hold."""
    if fraction > 0 and accelerator.distributed_type == DistributedType.FSDP:
        raise UsageError(
            "on-policy distillation generates with the whole student on each process, but FSDP shards it; "
            "launch with DDP (launch/gpu_ddp.yaml) or set --on-policy.fraction 0"
        )


def freeze(model: GPT) -> GPT:
    """A frozen function: eval mode, no gradients (so no optimizer can ever step it)."""
    model.eval()
    model.requires_grad_(False)
    return model


def _tokenizer_identity(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "path"}  # a .tiktoken file is known by its sha256


def check_teacher_data(export: Export, data: TokenData) -> None:
    """Refuse data tokenized differently from the teacher, before any work."""
    teacher_spec = _tokenizer_identity(export.tokenizer.spec)
    data_spec = _tokenizer_identity(data.meta["tokenizer"])
    if teacher_spec != data_spec or export.vocab.full_size != data.vocab_size:
        raise UsageError(
            f"the teacher {export.path} uses tokenizer {export.tokenizer.name} ({export.vocab.full_size:,} ids) but "
            f"{data.dir} is tokenized with {data.meta['encoding']} ({data.vocab_size:,} ids); teacher and student "
            f"must share the tokenizer: pass the teacher's data folder ({export.info.get('data', {}).get('dir', '?')}) "
            f"or tokenize the teacher's corpus with recipes/tokenize.py --encoding {export.tokenizer.name}"
        )


def layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layer behind each student layer: evenly spaced, first and last kept (one layer: the first)."""
    if n_student > n_teacher:
        raise ValueError(f"a student of {n_student} layers cannot be mapped onto a teacher of {n_teacher}")
    if n_student == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def ablate_head(state: dict[str, Tensor], layer: int, head: int, n_heads: int) -> dict[str, Tensor]:
    """The state with one head's output removed: its columns of the output projection zeroed.

    This removes the head's whole contribution, its value bias included (attention rows sum to 1,
    so the value bias reaches the output through the same columns).
    """
    key = f"blocks.{layer}.attn.proj.weight"
    weight = state[key].clone()
    width = weight.shape[1] // n_heads
    weight[:, head * width : (head + 1) * width] = 0
    return {**state, key: weight}


@torch.no_grad()
def head_importance(
    teacher: GPT,
    batches: list[tuple[Tensor, Tensor]],
    accelerator: Accelerator,
    vocab: VocabMap,
    bytes_per_token: float,
) -> tuple[float, Tensor]:
    """(teacher val loss, (layers, heads) increase of val loss when each head alone is ablated)."""
    base = evaluate_lm(teacher, batches, accelerator, vocab, bytes_per_token)["val_loss"]
    probe = freeze(copy.deepcopy(teacher))
    state = teacher.state_dict()
    cfg = teacher.cfg
    scores = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            probe.load_state_dict(ablate_head(state, layer, head, cfg.n_heads), strict=True)
            scores[layer, head] = (
                evaluate_lm(probe, batches, accelerator, vocab, bytes_per_token)["val_loss"] - base
            )
    return base, scores


# --------------------------------------------------------------------------------------------------
# Batches: data windows, cached teacher outputs, on-policy prompts
# --------------------------------------------------------------------------------------------------


class DistillBatches:
    """batch_fn for the loop: (x, y), (x, y, ids, logp, tail) with the cache, or an on-policy (prompt, y).

    An on-policy micro-batch is recognised by its shape alone (prompt shorter than y, no host sync):
    y marks the positions whose continuation the student will generate (the rest are IGNORE), so
    the loop counts the right number of tokens before the generation happens. Which micro-batches
    are on-policy is a pure function of (seed, step, micro-step), the same on every rank.
    """

    def __init__(
        self, windows: TrainWindows, on_policy: OnPolicyConfig, seed: int, cache: Any = None
    ) -> None:
        self.windows, self.on_policy, self.seed, self.cache = windows, on_policy, seed, cache

    def is_on_policy(self, step: int, micro_step: int) -> bool:
        if self.on_policy.fraction <= 0:
            return False
        rng = np.random.default_rng([self.seed, step, micro_step, 0x6F6E])
        return bool(rng.random() < self.on_policy.fraction)

    def __call__(self, step: int, micro_step: int) -> tuple[Tensor, ...]:
        x, y = self.windows.batch(step, micro_step)
        if self.is_on_policy(step, micro_step):
            prompt = self.on_policy.prompt_len
            y = y.clone()
            y[:, : prompt - 1] = IGNORE
            return x[:, :prompt].contiguous(), y
        if self.cache is None:
            return x, y
        ids, logp, tail = self.cache.rows(self.windows.starts(step, micro_step) // self.windows.seq_len)
        return x, y, ids, logp, tail


# --------------------------------------------------------------------------------------------------
# The loss function of the training loop
# --------------------------------------------------------------------------------------------------


class DistillLoss:
    """loss_fn(model, batch) -> (summed total loss, {name: summed extra}) for pipeline.train.Loop.

    The frozen teacher runs under no_grad (inside the loop's autocast); its final hidden states and
    head go into the student's head_fn, which makes both models' logits chunk by chunk. Extras: ce
    and soft (off-policy tokens), soft_on_policy and on_policy_share (the share of tokens that were
    on-policy), attention; DistillReporter turns them into per-token means of their own tokens.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        teacher: GPT | None,
        kd: KDConfig,
        on_policy: OnPolicyConfig,
        layers: list[int],
        fused: bool = True,
    ) -> None:
        self.accelerator, self.teacher, self.kd, self.on_policy = accelerator, teacher, kd, on_policy
        self.layers, self.fused = layers, fused
        self.uses_teacher = kd.alpha < 1.0
        self.attention = kd.attention_weight > 0

    def __call__(self, model: torch.nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        on_policy = batch[0].shape[1] != batch[1].shape[1]
        if on_policy:
            x, y = self._generate(model, batch[0], batch[1])
            weights = Weights(0.0, 1.0, self.kd.temperature)
        else:
            x, y = batch[0], batch[1]
            weights = Weights(self.kd.alpha, 1.0 - self.kd.alpha, self.kd.temperature)
        teacher, teacher_attn = self._teacher(x, batch[2:] if not on_policy else ())
        head = DistillHead(y, teacher, self.kd, weights, fused=self.fused)
        attn_loss = torch.zeros((), device=x.device)
        if self.attention:
            (total, ce, soft), student_attn = model(x, head_fn=head, need_weights=True)
            attn_loss = attention_transfer(student_attn, teacher_attn, self.layers, y != IGNORE)
            total = total + self.kd.attention_weight * attn_loss
        else:
            total, ce, soft = model(x, head_fn=head)
        return total, self._extras(on_policy, ce, soft, attn_loss, y)

    def _extras(
        self, on_policy: bool, ce: Tensor, soft: Tensor, attn: Tensor, y: Tensor
    ) -> dict[str, Tensor]:
        zero = torch.zeros_like(ce)
        extras = {"ce": zero if on_policy else ce}
        if self.uses_teacher:
            extras["soft"] = zero if on_policy else soft
        if self.on_policy.fraction > 0:
            extras["soft_on_policy"] = soft if on_policy else zero
            extras["on_policy_share"] = (y != IGNORE).sum().float() if on_policy else zero
        if self.attention:
            extras["attention"] = attn
        return extras

    def _teacher(self, x: Tensor, cached: tuple[Tensor, ...]) -> tuple[TeacherOutputs | None, list[Tensor]]:
        if not self.uses_teacher:
            return None, []
        if cached:
            ids, logp, tail = cached
            k = ids.shape[-1]
            return TeacherOutputs(ids=ids.reshape(-1, k), logp=logp.reshape(-1, k), tail=tail.reshape(-1)), []
        with torch.no_grad():
            hidden, attn = self.teacher.hidden_states(x, need_weights=self.attention)
        outputs = TeacherOutputs(hidden=hidden.reshape(-1, hidden.shape[-1]), weight=self.teacher.head_weight)
        return outputs, attn

    def _generate(self, model: torch.nn.Module, prompt: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The student continues each prompt to a window of y's length (+1); IGNORE stays on the prompt."""
        student = self.accelerator.unwrap_model(model)
        sampling = SamplingConfig(
            max_new_tokens=y.shape[1] + 1 - prompt.shape[1], temperature=self.on_policy.temperature
        )
        seq = generate(student, prompt, sampling, None)  # (B, T + 1); the global RNG is saved with the state
        x, targets = seq[:, :-1], seq[:, 1:].clone()
        targets[y == IGNORE] = IGNORE
        return x, targets


# --------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------


def per_token_means(values: dict[str, float]) -> dict[str, float | None]:
    """Extras as means over their own tokens: the loop divides every extra by all tokens of the interval.

    ce, soft and attention belong to the off-policy tokens, soft_on_policy to the on-policy ones,
    whose share of all tokens is on_policy_share.
    """
    share = values.get("on_policy_share")
    if share is None:
        return dict(values)
    out: dict[str, float | None] = dict(values)
    for name in ("ce", "soft", "attention"):
        if name in out:
            out[name] = values[name] / (1.0 - share) if share < 1.0 else None
    out["soft_on_policy"] = values["soft_on_policy"] / share if share > 0 else None
    return out


class DistillReporter(Reporter):
    """The Reporter, with the distillation extras turned into per-token means of their own tokens."""

    def scalars(self, step: int, values: dict[str, float], record: bool = True) -> None:
        super().scalars(step, per_token_means(values), record)


def head_importance_scalars(scores: Tensor) -> dict[str, float]:
    return {
        f"head_importance/layer{layer}_head{head}": float(scores[layer, head])
        for layer in range(scores.shape[0])
        for head in range(scores.shape[1])
    }


def describe_importance(scores: Tensor) -> str:
    rows = [f"  layer {i}: " + "  ".join(f"{v:+.4f}" for v in row) for i, row in enumerate(scores.tolist())]
    return "teacher head importance (val loss increase when the head is ablated):\n" + "\n".join(rows)


def make_eval_fn(
    model: torch.nn.Module,
    teacher: GPT,
    batches: list[tuple[Tensor, Tensor]],
    accelerator: Accelerator,
    vocab: VocabMap,
    bytes_per_token: float,
) -> Callable[[], dict[str, float]]:
    """eval_fn for the loop: the student's LM metrics and its agreement with the teacher."""

    def eval_fn() -> dict[str, float]:
        metrics = evaluate_lm(model, batches, accelerator, vocab, bytes_per_token)
        return metrics | evaluate_agreement(model, teacher, batches, accelerator)

    return eval_fn
