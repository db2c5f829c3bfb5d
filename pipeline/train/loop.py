"""The training loop shared by pretraining and distillation, and the accumulation step it shares with lr_find.

One plain loop: fetch the step's micro-batches, forward/backward each (gradients synchronised only
on the last), clip once, step, log at intervals, evaluate and checkpoint at intervals. What differs
between stages is passed in as plain functions: `batch_fn(step, micro_step)` and
`loss_fn(model, batch) -> (summed loss, {name: summed extra})`, and optionally `step_fn(step)`, told
each step's number first (a loss that changes with the step: distillation's layer-wise phase).

Non-finite values (--train.nonfinite): a step whose gradient norm is not finite is skipped, and the
parameter groups whose gradient is non-finite are named; --train.max-skipped-steps bad steps in a
row, or `stop`, end the run with `nonfinite.json` in the run folder and `error: ...`. An update that
made the weights themselves non-finite is caught at the next step, whose loss and gradient are then
non-finite too; skipping cannot undo it, so the run stops at once whatever the policy. With torch's
fused AdamW and no fp16 scaler (the default) the skip happens on the device (the optimizer's
`found_inf`), so a step never waits for the host: each step's verdict is kept on the device and
judged, in order and with the same messages, at the next log step, checkpoint or end of training
(`_settle`); a bad step is then named by its own number, a few steps late. Otherwise the norm is
read on the host before every step (`optimizer_step`). A collective that times out (a stalled rank)
or loses a crashed rank fails naming this rank and the collective (pipeline/accel.py).

Diagnostics (pipeline/train/diagnostics.py): the share of clipped steps is counted on the device and
read at log steps with the per-group gradient RMS, weight norms and update/weight ratios
(--train.grad-stats). A fresh run is evaluated and probed once at step 0, before its first update
(--train.eval-at-start): the initial val loss is printed beside ln V, logged to the text card run/step0 in
TensorBoard and kept in the state (result.json: initial_val_loss, ln_vocab). metrics.jsonl starts at
the first logged step as before. Evaluation draws no random numbers, so it never moves the training RNG.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from torch import Tensor

from pipeline.accel import collective, peak_memory_gib
from pipeline.config import OptimConfig, TrainConfig
from pipeline.data.vocab import VocabMap
from pipeline.run.tracking import Reporter
from pipeline.train.batching import BatchPlan
from pipeline.train.diagnostics import GradDiagnostics
from pipeline.train.losses import IGNORE
from pipeline.train.noise_scale import GradNoiseScale, make_grad_noise
from pipeline.train.optim import group_grad_norms, lr_at, set_lr


@dataclass
class TrainState:
    """Everything besides model/optimizer/RNG that a resumed run needs."""

    step: int = 0
    tokens: int = 0
    best_val: float = math.inf
    best_step: int = -1
    bad_evals: int = 0
    stopped_early: bool = False
    skipped_steps: int = 0  # over the whole run
    skip_streak: int = 0  # skipped steps since the last good one
    elapsed: float = 0.0
    initial_val_loss: float | None = None  # the step-0 evaluation's (--train.eval-at-start)
    ln_vocab: float | None = None  # ln of the output classes: the loss of a uniform prediction
    ln_full_vocab: float | None = None  # ln of the tokenizer's whole vocabulary (differs when compacted)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["best_val"] = None if math.isinf(self.best_val) else self.best_val
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["best_val"] = math.inf if fields.get("best_val") is None else fields["best_val"]
        return cls(**fields)


@dataclass
class Loop:
    accelerator: Accelerator
    model: torch.nn.Module  # as returned by accelerator.prepare
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    optim: OptimConfig
    plan: BatchPlan
    batch_fn: Callable[[int, int], tuple[Tensor, ...]]
    loss_fn: Callable[[torch.nn.Module, tuple[Tensor, ...]], tuple[Tensor, dict[str, Tensor]]]
    eval_fn: Callable[[], dict[str, float]]
    checkpoint_fn: Callable[[TrainState, bool, bool], None]  # (state, improved, final)
    report: Reporter
    probe_fn: Callable[[int], None] | None = None  # extra eval-time logging (samples, attention)
    step_fn: Callable[[int], None] | None = (
        None  # told each step's number before its micro-batches (distill's phases)
    )
    grad_noise: GradNoiseScale | None = None  # gradient noise scale B_simple (pipeline/train/noise_scale.py)
    last_eval: dict[str, float] = field(default_factory=dict)
    vocab: VocabMap | None = None  # output classes for the step-0 line; None: the model's vocab_size
    pending: list[_Pending] = field(default_factory=list, init=False, repr=False)
    """Device-path steps not yet judged for non-finite values (`_settle`)."""
    diagnostics: GradDiagnostics = field(init=False, repr=False)
    step_model: torch.nn.Module = field(init=False, repr=False)
    """What the training micro-steps call: `model`, compiled under --train.compile. Only the training
    forward is compiled: evaluation, probes and sampling (other shapes, a KV cache) use `model` itself,
    so the compiled graph is built once instead of once per shape until dynamo's recompile limit."""

    def __post_init__(self) -> None:
        self.diagnostics = GradDiagnostics(self.accelerator.device)
        self.step_model = torch.compile(self.model) if self.cfg.compile else self.model
        if self.grad_noise is None and self.cfg.noise_scale:  # --train.noise-scale, whatever the stage
            self.grad_noise = make_grad_noise(self.accelerator, self.plan, self.report.print)


def fit(loop: Loop, state: TrainState) -> TrainState:
    acc, cfg, plan = loop.accelerator, loop.cfg, loop.plan
    device = acc.device
    sums = _Sums(device)
    session_start = time.perf_counter()
    elapsed_before = state.elapsed
    if state.step == 0 and cfg.eval_at_start:  # a fresh run: a resumed one has step > 0
        _evaluate_at_start(loop, state)
    mark = (time.perf_counter(), state.tokens)
    while (
        state.step < plan.total_steps
        and not state.stopped_early
        and not (cfg.stop_at and state.step >= cfg.stop_at)
    ):
        if loop.step_fn is not None:
            loop.step_fn(state.step)
        batches = [loop.batch_fn(state.step, m) for m in range(plan.grad_accum_steps)]
        step_loss = accumulate(acc, loop.step_model, batches, loop.loss_fn, loop.grad_noise)
        sums.add(step_loss.loss, step_loss.n_local, step_loss.extra)
        last = state.step + 1 == plan.total_steps
        evaluating = (state.step + 1) % cfg.eval_interval == 0 or last
        logging_now = (state.step + 1) % cfg.log_interval == 0 or evaluating
        noise = loop.grad_noise.full_batch(loop.model, logging_now) if loop.grad_noise is not None else {}
        grad_stats = _clip_and_step(loop, state, step_loss, logging_now) | noise
        state.step += 1
        state.tokens += plan.tokens_per_step
        if logging_now:
            now = time.perf_counter()
            state.elapsed = elapsed_before + now - session_start
            record = sums.collect(acc) | grad_stats
            record.update(
                lr=lr_at(state.step - 1, loop.optim, plan.total_steps),
                tokens=state.tokens,
                epoch=plan.epoch(state.step),
                tokens_per_s=(state.tokens - mark[1]) / max(now - mark[0], 1e-9),
                peak_mem_gib=peak_memory_gib(device),
                elapsed_s=state.elapsed,
            )
            loop.report.progress(state.step, **progress_postfix(record, loop.last_eval))
            improved = False
            if evaluating:
                metrics, improved = _evaluate(loop, state)
                record |= metrics
            loop.report.scalars(state.step, record)
            if evaluating:  # after the record: a kill -9 between leaves an older state, not a step unlogged
                _refuse_non_finite_weights(loop, state)
                with collective("saving the checkpoint"):
                    loop.checkpoint_fn(state, improved, False)
            mark = (time.perf_counter(), state.tokens)  # evaluation time does not count as training speed
    state.elapsed = elapsed_before + time.perf_counter() - session_start
    finished = state.step >= plan.total_steps or state.stopped_early
    _refuse_non_finite_weights(loop, state)
    with collective("saving the checkpoint"):
        loop.checkpoint_fn(state, False, finished)  # a state always; the `last` export only when finished
    return state


def progress_postfix(record: dict[str, Any], last_eval: dict[str, float]) -> dict[str, str]:
    """What the progress bar shows beside the step count: every loss named, on one scale.

    Distillation's total mixes CE with the soft loss, so the bar shows the two apart (ce is on the
    val loss's scale); the last evaluation's val loss sits beside them, then tokens/s.
    """
    shown: dict[str, str] = {}
    if record.get("soft") is not None:
        ce = record.get("ce")
        shown["ce"] = "-" if ce is None else f"{ce:.4f}"  # None: every token of the interval was on-policy
        shown["kd"] = f"{record['soft']:.4f}"
    else:
        shown["train_loss"] = f"{record['loss']:.4f}"
    if last_eval.get("val_loss") is not None:
        shown["val_loss"] = f"{last_eval['val_loss']:.4f}"
    shown["tok/s"] = f"{record['tokens_per_s']:,.0f}"
    return shown


class _Sums:
    """Loss and extras summed on the device between log points: no host sync until collected."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.tokens = 0.0
        self.extra: dict[str, Tensor] = {}

    def add(self, loss_sum: Tensor, tokens: float, extra: dict[str, Tensor]) -> None:
        self.loss += loss_sum
        self.tokens += tokens
        for k, v in extra.items():
            self.extra[k] = self.extra.get(k, 0) + v

    def collect(self, acc: Accelerator) -> dict[str, float]:
        names = sorted(self.extra)
        local = torch.stack([self.loss, *(self.extra[k] for k in names)])
        local = torch.cat((local, torch.tensor([self.tokens], dtype=torch.float64, device=self.device)))
        if acc.num_processes > 1:
            with collective("the all-reduce of the logged losses"):
                local = acc.reduce(local, "sum")
        total = local
        tokens = max(float(total[-1]), 1.0)
        out = {"loss": float(total[0]) / tokens}
        out.update({k: float(v) / tokens for k, v in zip(names, total[1:-1])})
        self.reset()
        return out


@dataclass
class StepLoss:
    """One optimizer step's summed loss and extras on this process (device tensors), and its token counts."""

    loss: Tensor
    extra: dict[str, Tensor]
    n_local: int  # valid target tokens of this process's micro-batches
    n_global: Tensor | int  # of every process's: what each loss is normalised by


def accumulate(
    acc: Accelerator,
    model: torch.nn.Module,
    batches: list[tuple[Tensor, ...]],
    loss_fn: Callable[[torch.nn.Module, tuple[Tensor, ...]], tuple[Tensor, dict[str, Tensor]]],
    grad_noise: GradNoiseScale | None = None,
) -> StepLoss:
    """Forward and backward every micro-batch of one optimizer step; gradients synchronise on the last.

    Each summed loss is scaled by world_size / (valid tokens of the step over all processes), so the
    synchronised gradient is that of the mean loss per token, whatever the accumulation and ranks.
    """
    device, world = acc.device, acc.num_processes
    n_local = sum(int((b[1] != IGNORE).sum()) for b in batches)
    n_global: Tensor | int = n_local
    if world > 1:
        with collective("the all-reduce of the step's token count"):
            n_global = acc.reduce(torch.tensor(float(n_local), device=device), "sum")
    loss = torch.zeros((), dtype=torch.float64, device=device)
    extra: dict[str, Tensor] = {}
    for m, batch in enumerate(batches):
        batch = tuple(t.to(device, non_blocking=True) for t in batch)
        sync = contextlib.nullcontext() if m == len(batches) - 1 else acc.no_sync(model)
        with sync:
            with acc.autocast():
                loss_sum, parts = loss_fn(model, batch)
            with collective(f"backward's gradient all-reduce (micro-batch {m})"):
                acc.backward(loss_sum * (world / n_global))
        if m == 0 and grad_noise is not None:  # still this process's micro-batch alone
            grad_noise.first_micro_batch(model, batch[1], n_global)
        loss += loss_sum.detach().double()
        for k, v in parts.items():
            extra[k] = extra.get(k, 0) + v.detach().double()
    return StepLoss(loss, extra, n_local, n_global)


def optimizer_step(
    acc: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float, lr: float
) -> tuple[Tensor, Tensor | bool]:
    """Clip once (gradients synchronised, fp16 unscaled first), then step at `lr`, unless the norm is not finite.

    Returns the pre-clip global norm and whether the optimizer stepped: a non-finite norm leaves the
    weights untouched (with fp16 the loss scaler makes that call itself). On the device path
    (`defers_check`) "stepped" is a device bool tensor, so nothing here waits for the host.
    """
    step = _device_step(model, optimizer, max_norm, lr) if defers_check(acc, optimizer) else None
    if step is not None:
        return step.norm, step.finite
    return _host_step(acc, model, optimizer, max_norm, lr)


def defers_check(acc: Accelerator, optimizer: torch.optim.Optimizer) -> bool:
    """Whether the non-finite check can stay on the device: a fused optimizer, no fp16 scaler, plain gradients.

    torch's fused Adam/AdamW (and the other optimizers marked `_step_supports_amp_scaling`) read the
    optimizer's `found_inf` tensor and skip the update on the device when it is 1, rolling their step
    counts back. The foreach and for-loop implementations refuse a found_inf, so skipping them takes a
    host branch; fp16's GradScaler sets and deletes found_inf on the optimizer itself, so ours would
    clash with it; and FSDP, DeepSpeed and XLA compute and clip the norm their own way (sharded,
    inside the engine, after an XLA reduce), which accelerate's clip_grad_norm_ keeps doing for them.
    """
    return (
        acc.scaler is None
        and acc.distributed_type not in _OWN_CLIPPING
        and getattr(_torch_optimizer(optimizer), "_step_supports_amp_scaling", False)
    )


_OWN_CLIPPING = {
    DistributedType.FSDP,
    DistributedType.DEEPSPEED,
    DistributedType.XLA,
    DistributedType.MEGATRON_LM,
}


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer: the object whose attributes step() reads."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _host_step(
    acc: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float, lr: float
) -> tuple[Tensor, bool]:
    """The norm read on the host, the step taken or not in Python: for optimizers that cannot skip on the device."""
    if acc.scaler is None:  # a found_inf the device path left would skip this step's update too
        _torch_optimizer(optimizer).__dict__.pop("found_inf", None)
    total_norm = acc.clip_grad_norm_(model.parameters(), max_norm or math.inf)
    if acc.scaler is None and not torch.isfinite(total_norm):
        return total_norm, False
    set_lr(optimizer, lr)
    optimizer.step()
    return total_norm, True


@dataclass
class _DeviceStep:
    """One step of the device path, nothing read: enough to judge it later as the host path would have."""

    norm: Tensor  # () pre-clip global gradient norm
    finite: Tensor  # () bool: whether the update was applied
    param_norms: Tensor  # (P,) gradient norm of each parameter that had a gradient, in `parts` order
    parts: list[str]  # the model part (optimizer group "part") of each of those parameters


def _device_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float, lr: float
) -> _DeviceStep | None:
    """Clip and step with no host sync; the fused kernel skips the update itself when the norm is not finite.

    The per-parameter norms are the ones torch.nn.utils.clip_grad_norm_ computes (one _foreach_norm),
    kept instead of thrown away: the global norm is their norm (bitwise the same when the gradients
    share one device and dtype, as fp32 master weights do), and a bad step's groups are named from them
    later at no extra pass over the gradients. None (then the host path runs) for gradients that are
    not plain tensors (a DTensor from tensor parallelism), which only accelerate's clipping handles.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads or any(type(g) is not Tensor for g in grads):
        return None
    param_norms = torch.stack([n.to(grads[0].device) for n in torch._foreach_norm(grads)])  # (P,)
    norm = torch.linalg.vector_norm(param_norms)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm or math.inf, norm)
    finite = torch.isfinite(norm)
    _torch_optimizer(optimizer).found_inf = (~finite).float()  # set every step: 0 lets the update through
    set_lr(optimizer, lr)
    optimizer.step()
    part_of = {id(p): g["part"] for g in optimizer.param_groups for p in g["params"]}
    return _DeviceStep(norm, finite, param_norms, [part_of.get(id(p), "?") for p in params])


@dataclass
class _Pending:
    """A device-path step not judged yet: what `_non_finite_step` needs, still on the device."""

    step: int
    lr: float
    outcome: _DeviceStep
    loss: Tensor  # this process's summed loss over its micro-batches
    n_local: int


def _clip_and_step(loop: Loop, state: TrainState, step_loss: StepLoss, logging_now: bool) -> dict[str, float]:
    """The shared optimizer step, then the loop's bookkeeping: skipped steps, per-group norms, histograms."""
    acc, optimizer = loop.accelerator, loop.optimizer
    lr = lr_at(state.step, loop.optim, loop.plan.total_steps)
    deferred = defers_check(acc, optimizer)
    device_step = _device_step(loop.model, optimizer, loop.optim.grad_clip, lr) if deferred else None
    if device_step is not None:  # judged at the next log step, checkpoint or end (`_settle`)
        total_norm, stepped = device_step.norm, device_step.finite
        loop.pending.append(_Pending(state.step, lr, device_step, step_loss.loss, step_loss.n_local))
        if logging_now:
            _settle(loop, state)
    else:
        total_norm, stepped = _host_step(acc, loop.model, optimizer, loop.optim.grad_clip, lr)
        _judge_now(loop, state, lr, total_norm, stepped, step_loss)
    loop.diagnostics.count_clip(total_norm, loop.optim.grad_clip)
    stats: dict[str, float] = {}
    if logging_now:
        # Clipping multiplied every gradient by one factor: divide it out to report pre-clip norms.
        max_norm = loop.optim.grad_clip or math.inf
        norm = float(total_norm)
        coef = min(1.0, max_norm / (norm + 1e-6)) if math.isfinite(norm) and norm > 0 else 1.0
        group_sq = group_grad_norms(optimizer)  # once: grad_norm/G here, grad_rms/G in the diagnostics
        for part, sq in group_sq.items():
            stats[f"grad_norm/{part}"] = float(sq) ** 0.5 / coef
        moved = bool(stepped) and not getattr(optimizer, "step_was_skipped", False)  # fp16's scaler may skip
        model = acc.unwrap_model(loop.model)
        stats |= loop.diagnostics.collect(optimizer, model, group_sq, coef, moved, loop.cfg.grad_stats)
    hist_every = loop.cfg.histogram_interval or loop.cfg.eval_interval
    if (state.step + 1) % hist_every == 0:
        loop.report.histograms(acc.unwrap_model(loop.model), state.step + 1)
    optimizer.zero_grad(set_to_none=True)
    if logging_now:
        stats["grad_norm/total"] = float(total_norm)
        stats["skipped_steps"] = state.skipped_steps
    return stats


def _judge_now(
    loop: Loop, state: TrainState, lr: float, total_norm: Tensor, stepped: bool, step_loss: StepLoss
) -> None:
    """The host path's verdict on the step just taken (gradients still there: the groups are named from them)."""
    if stepped:
        state.skip_streak = 0
        return
    sq = group_grad_norms(loop.optimizer)
    bad_grads = [part for part, value in sq.items() if not math.isfinite(float(value))]
    loss = float(step_loss.loss) / max(step_loss.n_local, 1)
    bad_weights = _non_finite_weight_groups(loop.optimizer)
    _non_finite_step(loop, state, state.step, lr, float(total_norm), bad_grads, bad_weights, loss)


def _settle(loop: Loop, state: TrainState) -> None:
    """Judge the device-path steps taken since the last settle, in order, exactly as the host path would have.

    One transfer reads which steps were finite; only a bad step reads more. Weights change only on a
    finite step, so a bad step after the last finite one saw today's weights, and they are checked now.
    A bad step followed by a finite one saw weights the finite step's gradient vouches for (a non-finite
    weight makes the loss and gradient non-finite), so none are named for it; every save checks the
    weights again (`_refuse_non_finite_weights`).
    """
    pending, loop.pending = loop.pending, []
    if not pending:
        return
    finite = torch.stack([p.outcome.finite for p in pending]).tolist()  # (N,) the one transfer
    last_finite = max((i for i, ok in enumerate(finite) if ok), default=-1)
    weights_now: list[str] | None = None
    for i, (p, ok) in enumerate(zip(pending, finite)):
        if ok:
            state.skip_streak = 0
            continue
        if i > last_finite and weights_now is None:
            weights_now = _non_finite_weight_groups(loop.optimizer)
        bad_weights = weights_now if i > last_finite else []
        loss = float(p.loss) / max(p.n_local, 1)
        _non_finite_step(
            loop, state, p.step, p.lr, float(p.outcome.norm), _bad_groups(p.outcome), bad_weights, loss
        )


def _bad_groups(outcome: _DeviceStep) -> list[str]:
    """The parts whose squared gradient norm is not finite, summed in fp32 as group_grad_norms sums it.

    From the pre-clip norms: clipping by a non-finite norm multiplies every gradient by 0 or NaN.
    """
    names = list(dict.fromkeys(outcome.parts))
    index = torch.tensor([names.index(part) for part in outcome.parts], device=outcome.param_norms.device)
    sq = outcome.param_norms.float().square()  # (P,)
    group_sq = torch.zeros(len(names), device=sq.device).index_add_(0, index, sq)  # (parts,)
    return [part for part, ok in zip(names, group_sq.isfinite().tolist()) if not ok]


def _non_finite_step(
    loop: Loop,
    state: TrainState,
    step: int,
    lr: float,
    total_norm: float,
    bad_grads: list[str],
    bad_weights: list[str],
    loss: float,
) -> None:
    """Step `step`'s gradient norm is not finite: name the groups, then skip it or stop (--train.nonfinite)."""
    cfg = loop.cfg
    state.skipped_steps += 1
    state.skip_streak += 1
    bad_grads = sorted(bad_grads)
    what = (
        f"step {step}: non-finite gradient norm ({total_norm}) in {', '.join(bad_grads) or 'no single group'}"
    )
    if bad_weights:
        what += f"; the weights of {', '.join(bad_weights)} are non-finite already (an earlier update)"
    streak_over = state.skip_streak >= cfg.max_skipped_steps
    if not (cfg.nonfinite == "stop" or bad_weights or streak_over):
        loop.report.print(
            f"{what}; step skipped ({state.skip_streak} in a row of at most {cfg.max_skipped_steps})"
        )
        return
    loop.report.run.write(
        "nonfinite.json",
        {
            "step": step,
            "lr": lr,
            "loss": loss if math.isfinite(loss) else str(loss),  # this process's mean over its micro-batches
            "grad_norm": str(total_norm),
            "non_finite_grad_groups": bad_grads,
            "non_finite_weight_groups": bad_weights,
            "skip_streak": state.skip_streak,
            "skipped_steps": state.skipped_steps,
            "policy": cfg.nonfinite,
            "precision": loop.accelerator.mixed_precision,
        },
    )
    why = "stopping (--train.nonfinite stop)" if cfg.nonfinite == "stop" else "stopping"
    if streak_over and not bad_weights and cfg.nonfinite == "skip":
        why = f"{state.skip_streak} steps in a row were skipped (--train.max-skipped-steps {cfg.max_skipped_steps})"
    raise FloatingPointError(
        f"{what}; {why}; diagnostics in {loop.report.run.path / 'nonfinite.json'}; {_advice(loop)}"
    )


def _refuse_non_finite_weights(loop: Loop, state: TrainState) -> None:
    """Before any state or export is written: weights that an update made non-finite are never saved.

    The steps not judged yet are judged first (`_settle`), so the state saved counts every skipped
    step and a bad step that should stop the run stops it before the save. Such an update is otherwise
    caught at the next step; checking here too, once per checkpoint and not per step, keeps a damaged
    model out of states/, best/ and last/ even when the save comes first.
    """
    _settle(loop, state)
    bad = _non_finite_weight_groups(loop.optimizer)
    if bad:
        raise FloatingPointError(
            f"step {state.step}: the weights of {', '.join(bad)} are non-finite (an update overflowed); "
            f"nothing was saved at this step, the states and exports written before are intact; {_advice(loop)}"
        )


def _non_finite_weight_groups(optimizer: torch.optim.Optimizer) -> list[str]:
    bad = {
        g["part"] for g in optimizer.param_groups if not all(bool(p.isfinite().all()) for p in g["params"])
    }
    return sorted(bad)


def _advice(loop: Loop) -> str:
    """What to try; fp32 only for a run that is not in fp32 already."""
    options = [f"lower --optim.lr (now {loop.optim.lr:g})"]
    if not loop.optim.grad_clip:
        options.append("clip gradients with --optim.grad-clip 1.0")
    if loop.accelerator.mixed_precision in ("bf16", "fp16"):
        options.append(f"train in fp32 with --train.precision no (now {loop.accelerator.mixed_precision})")
    else:
        options.append("look for inf/nan in the data or the loss (the run is fp32 already)")
    return "try: " + ", or ".join(options)


def _evaluate_at_start(loop: Loop, state: TrainState) -> None:
    """Step 0 of a fresh run: val metrics and the probes before any update, the loss beside ln V."""
    with collective("the evaluation at step 0"):
        metrics = loop.eval_fn()
    raw = loop.accelerator.unwrap_model(loop.model)
    n_classes = loop.vocab.n_classes if loop.vocab is not None else raw.cfg.vocab_size
    full = loop.vocab.full_size if loop.vocab is not None else n_classes
    val = metrics["val_loss"]
    state.initial_val_loss = val if math.isfinite(val) else None
    state.ln_vocab, state.ln_full_vocab = math.log(n_classes), math.log(full)
    line = f"step 0: val loss {val:.4f}; ln V = {state.ln_vocab:.4f} (uniform over {n_classes:,} classes)"
    if full != n_classes:  # compacted: the loss counts unseen ids over the full vocabulary
        line += (
            f"; ln {full:,} = {state.ln_full_vocab:.4f} (the full vocabulary); val loss also charges each val "
            f"token unseen in train log({full:,} - {n_classes - 1:,}) = {loop.vocab.log_unseen:.2f} nats on top of its class"
        )
    loop.report.print(line)
    # One point per number: a text card (run/step0), not scalar cards; metrics.jsonl keeps its steps >= 1.
    rows = {**metrics, "ln_vocab": state.ln_vocab, "ln_full_vocab": state.ln_full_vocab}
    table = "\n".join(f"| {k} | {v:.4f} |" for k, v in rows.items() if v is not None and math.isfinite(v))
    loop.report.markdown("run/step0", f"{line}\n\n| at step 0 | value |\n| --- | --- |\n{table}")
    if loop.probe_fn is not None:
        loop.probe_fn(0)


def _evaluate(loop: Loop, state: TrainState) -> tuple[dict[str, float], bool]:
    """Validation metrics and whether they improved on the best; early-stopping bookkeeping in `state`."""
    with collective("the evaluation"):
        metrics = loop.eval_fn()
    loop.last_eval = metrics
    val = metrics["val_loss"]
    improved = val < state.best_val - loop.cfg.early_stop_min_delta
    if improved:
        state.best_val, state.best_step, state.bad_evals = val, state.step, 0
    else:
        state.bad_evals += 1
        patience = loop.cfg.early_stop_patience
        state.stopped_early = bool(patience) and state.bad_evals >= patience
    metrics["val_best_loss"] = state.best_val
    loop.report.print(
        f"step {state.step}: val loss {val:.4f}, bpb {metrics.get('val_bpb', float('nan')):.4f}"
        + (" (best)" if improved else f" (best {state.best_val:.4f} at step {state.best_step})")
        + (" - early stop" if state.stopped_early else "")
    )
    if loop.probe_fn is not None:
        loop.probe_fn(state.step)
    return metrics, improved
