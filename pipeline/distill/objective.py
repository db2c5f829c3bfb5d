"""The distill stage's loss function for the training loop, its logging, and teacher-student agreement at evaluation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor

from pipeline.data.vocab import VocabMap
from pipeline.distill.config import KDConfig, OnPolicyConfig
from pipeline.distill.divergences import attention_transfer, relative_state_error
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
    on-policy), attention, hidden; block_error and layerwise_share in a run with a layer-wise phase.
    DistillReporter turns them into per-token means of their own tokens.

    The loop tells it each step's number first (`at_step`): the first `layerwise_steps` steps
    (kd.layerwise_steps, or kd.layerwise_share of the run's) are the layer-wise phase (`phase`), and
    alpha and the temperature move linearly over the end-to-end steps when kd.alpha_end /
    kd.temperature_end are set. Both are pure functions of the step, so a resumed run continues them
    exactly.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        teacher: GPT | None,
        kd: KDConfig,
        on_policy: OnPolicyConfig,
        layers: list[int],
        fused: bool = True,
        total_steps: int = 0,
        layerwise_steps: int = 0,
    ) -> None:
        self.accelerator, self.teacher, self.kd, self.on_policy = accelerator, teacher, kd, on_policy
        self.layers, self.fused, self.total_steps = layers, fused, total_steps
        self.uses_teacher = kd.uses_teacher
        self.attention = kd.attention_weight > 0
        self.hidden = kd.hidden_weight > 0
        self.layerwise_steps = layerwise_steps
        self.step = 0

    def at_step(self, step: int) -> None:
        self.step = step

    def phase(self, step: int) -> str:
        """'layerwise' for the first `layerwise_steps` steps, then 'end_to_end'."""
        return "layerwise" if step < self.layerwise_steps else "end_to_end"

    def schedule(self, step: int) -> tuple[float, float]:
        """(alpha, temperature) at `step`: linear from the start values at the first end-to-end step to the end values at the last."""
        first, last = self.layerwise_steps, max(self.total_steps - 1, self.layerwise_steps)
        f = 0.0 if last == first else min(max((step - first) / (last - first), 0.0), 1.0)

        def at(start: float, end: float | None) -> float:
            return start if end is None else start + f * (end - start)

        return at(self.kd.alpha, self.kd.alpha_end), at(self.kd.temperature, self.kd.temperature_end)

    def __call__(self, model: torch.nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        if self.phase(self.step) == "layerwise":
            return self._layerwise(model, batch[0], batch[1])
        alpha, temperature = self.schedule(self.step)
        on_policy = batch[0].shape[1] != batch[1].shape[1]
        if on_policy:
            x, y = self._generate(model, batch[0], batch[1])
            weights = Weights(0.0, 1.0, temperature)
        else:
            x, y = batch[0], batch[1]
            weights = Weights(alpha, 1.0 - alpha, temperature)
        teacher, teacher_attn, teacher_states = self._teacher(x, batch[2:] if not on_policy else ())
        kd = (
            self.kd
            if temperature == self.kd.temperature
            else dataclasses.replace(self.kd, temperature=temperature)
        )
        head = DistillHead(y, teacher, kd, weights, fused=self.fused)
        attn_loss = hidden_loss = torch.zeros((), device=x.device)
        if self.attention or self.hidden:
            out = model(x, head_fn=head, need_weights=self.attention, need_states=self.hidden)
            (total, ce, soft), rest = out[0], list(out[1:])
            if self.attention:
                attn_loss = attention_transfer(rest.pop(0), teacher_attn, self.layers, y != IGNORE)
                total = total + self.kd.attention_weight * attn_loss
            if self.hidden:
                hidden_loss = self._state_error(rest.pop(0)[1:], teacher_states, y)
                total = total + self.kd.hidden_weight * hidden_loss
        else:
            total, ce, soft = model(x, head_fn=head)
        return total, self._extras(on_policy, ce, soft, attn_loss, hidden_loss, y)

    def _targets(self, states: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The teacher's residual states at each student block's input and where its output should be.

        Student block l stands for teacher layers layers[l] .. layers[l + 1] - 1 (the last: to the end).
        """
        inputs = [states[i] for i in self.layers]
        targets = [states[i] for i in self.layers[1:]] + [states[-1]]
        return inputs, targets

    def _state_error(self, student: list[Tensor], states: list[Tensor], y: Tensor) -> Tensor:
        inputs, targets = self._targets(states)
        return relative_state_error(student, targets, inputs, y != IGNORE)

    def _layerwise(self, model: torch.nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Each student block on the teacher's residual state, matched to the teacher's at the next mapped layer."""
        with torch.no_grad():
            states = self.teacher.residual_stream(x)
        inputs, targets = self._targets(states)
        outputs = model(x, block_inputs=inputs)
        error = relative_state_error(outputs, targets, inputs, y != IGNORE)
        zero = torch.zeros_like(error)
        extras = self._extras(False, zero, zero, zero, zero, y)
        extras |= {"block_error": error, "layerwise_share": (y != IGNORE).sum().float()}
        return error, extras

    def _extras(
        self, on_policy: bool, ce: Tensor, soft: Tensor, attn: Tensor, hidden: Tensor, y: Tensor
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
        if self.hidden:
            extras["hidden"] = hidden
        if self.layerwise_steps > 0:
            extras["block_error"] = zero
            extras["layerwise_share"] = zero
        return extras

    def _teacher(
        self, x: Tensor, cached: tuple[Tensor, ...]
    ) -> tuple[TeacherOutputs | None, list[Tensor], list[Tensor]]:
        if not self.uses_teacher and not self.hidden:
            return None, [], []
        if cached:
            ids, logp, tail = cached
            k = ids.shape[-1]
            outputs = TeacherOutputs(ids=ids.reshape(-1, k), logp=logp.reshape(-1, k), tail=tail.reshape(-1))
            if not self.hidden:
                return outputs, [], []
            with torch.no_grad():
                return outputs, [], self.teacher.residual_stream(x)
        with torch.no_grad():
            out = self.teacher(x, head_fn=_keep, need_weights=self.attention, need_states=self.hidden)
        hidden, rest = (out, []) if not (self.attention or self.hidden) else (out[0], list(out[1:]))
        attn = rest.pop(0) if self.attention else []
        states = rest.pop(0) if self.hidden else []
        outputs = TeacherOutputs(hidden=hidden.reshape(-1, hidden.shape[-1]), weight=self.teacher.head_weight)
        return (outputs if self.uses_teacher else None), attn, states

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


def _keep(hidden: Tensor, weight: Tensor) -> Tensor:
    """A head_fn that returns the final hidden states themselves (the teacher's logits are made per chunk later)."""
    return hidden


def per_token_means(values: dict[str, float]) -> dict[str, float | None]:
    """Extras as means over their own tokens: the loop divides every extra by all tokens of the interval.

    soft_on_policy belongs to the on-policy tokens (share on_policy_share), block_error to the
    layer-wise phase's (share layerwise_share), ce, soft, attention and hidden to the rest. None: the
    interval had no token of that kind.
    """
    if "on_policy_share" not in values and "layerwise_share" not in values:
        return dict(values)
    on, layerwise = values.get("on_policy_share", 0.0), values.get("layerwise_share", 0.0)
    rest = 1.0 - on - layerwise
    out: dict[str, float | None] = dict(values)
    for name in ("ce", "soft", "attention", "hidden"):
        if name in out:
            out[name] = values[name] / rest if rest > 1e-9 else None
    if "soft_on_policy" in out:
        out["soft_on_policy"] = values["soft_on_policy"] / on if on > 0 else None
    if "block_error" in out:
        out["block_error"] = values["block_error"] / layerwise if layerwise > 0 else None
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
            "block_error": "Loss/block_error",
            "hidden": "Loss/hidden",
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
    clean: list[tuple[Tensor, Tensor]] | None = None,
) -> Callable[[], dict[str, float]]:
    """eval_fn for the loop: the student's LM metrics and its agreement with the teacher, and with
    `clean` (fixed train windows, --train.clean-train-tokens) its eval-mode train_clean_loss, as
    pretrain logs it: beside val_loss, the gap that says the student overfits its data."""

    def eval_fn() -> dict[str, float]:
        metrics = evaluate_lm(model, batches, accelerator, vocab, bytes_per_token)
        if clean:
            train = evaluate_lm(model, clean, accelerator, vocab, bytes_per_token, prefix="train_clean")
            metrics["train_clean_loss"] = train["train_clean_loss"]
        return metrics | evaluate_agreement(model, teacher, batches, accelerator)

    return eval_fn
