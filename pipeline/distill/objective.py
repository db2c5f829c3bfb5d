"""The distill stage's loss function for the training loop, its logging, and teacher-student agreement at evaluation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor

from pipeline.data.vocab import VocabMap
from pipeline.distill.config import KDConfig, OnPolicyConfig
from pipeline.distill.divergences import attention_transfer
from pipeline.distill.head import AgreementHead, DistillHead, TeacherOutputs, Weights
from pipeline.errors import UsageError
from pipeline.eval.teacher_forced import evaluate_lm
from pipeline.model.generation import SamplingConfig, generate
from pipeline.model.gpt import GPT
from pipeline.run.tracking import Reporter
from pipeline.train.losses import IGNORE


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


def check_on_policy_supported(accelerator: Accelerator, fraction: float) -> None:
    """On-policy batches generate with the whole student on each process, which FSDP does not hold."""
    if fraction > 0 and accelerator.distributed_type == DistributedType.FSDP:
        raise UsageError(
            "on-policy distillation generates with the whole student on each process, but FSDP shards it; "
            "launch with DDP (launch/gpu_ddp.yaml) or set --on-policy.fraction 0"
        )


class DistillLoss:
    """loss_fn(model, batch) -> (summed total loss, {name: summed extra}) for pipeline.train.loop.Loop.

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
        student = self.accelerator.unwrap_model(model, keep_torch_compile=False)  # KV-cache shapes: eager
        sampling = SamplingConfig(
            max_new_tokens=y.shape[1] + 1 - prompt.shape[1], temperature=self.on_policy.temperature
        )
        seq = generate(student, prompt, sampling, None)  # (B, T + 1); the global RNG is saved with the state
        x, targets = seq[:, :-1], seq[:, 1:].clone()
        targets[y == IGNORE] = IGNORE
        return x, targets


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
    """The Reporter, with the distillation extras turned into per-token means of their own tokens.

    In TensorBoard the CE on the labels is Loss/train (what a pretrain run's loss is, so the two
    overlay), the soft loss Loss/kd and their alpha-weighted mix Loss/total.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.renames = {
            "ce": "Loss/train",
            "soft": "Loss/kd",
            "loss": "Loss/total",
            "soft_on_policy": "Loss/kd_on_policy",
        }

    def scalars(self, step: int, values: dict[str, float], record: bool = True) -> None:
        super().scalars(step, per_token_means(values), record)


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
