"""Typed records of one model's evaluation, as the report reads them and metrics.json stores them.

`compounding.summarize` builds a `Compounding` (the prompts' teacher-forced scores, the rollouts:
greedy, sampled, nucleus, beam; each rollout's confidence curves; sample texts); the evaluate recipe
adds the model's identity, its teacher-forced metrics on val windows, its loss by position and its
attention into a `ModelResult`. `to_json()` gives the metrics.json layout: a model's greedy rollout
metrics at its top level, the other rollouts under "sampled", "nucleus" and "beam" (the same keys),
an interval beside its mean as "<name>_ci", the attention maps left out; then, where measured,
"rollout_confidence", "loss_by_position" and "teacher_forced_views". `from_json` reads it back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T", float, list[float])


@dataclass(frozen=True)
class Interval(Generic[T]):
    """A mean over prompts (a number, or a curve over positions) and its bootstrap 95% interval."""

    mean: T
    low: T
    high: T

    def to_json(self, name: str) -> dict[str, Any]:
        return {name: self.mean, f"{name}_ci": [self.low, self.high]}

    @classmethod
    def from_json(cls, data: dict[str, Any], name: str) -> Interval:
        low, high = data[f"{name}_ci"]
        return cls(data[name], low, high)


@dataclass(frozen=True)
class ExposureGap:
    """Loss on the next `horizon` true tokens after the model's own first j tokens, and after the true j."""

    j: list[int]
    horizon: int
    own_prefix_loss: list[float]
    true_prefix_loss: list[float]
    gap: Interval[list[float]]  # own minus true prefix, per j

    def to_json(self) -> dict[str, Any]:
        return {
            "j": self.j,
            "horizon": self.horizon,
            "own_prefix_loss": self.own_prefix_loss,
            "true_prefix_loss": self.true_prefix_loss,
            **self.gap.to_json("gap"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExposureGap:
        own, true = data["own_prefix_loss"], data["true_prefix_loss"]
        return cls(data["j"], data["horizon"], own, true, Interval.from_json(data, "gap"))


@dataclass(frozen=True)
class Degeneration:
    """Repetition in a rollout's continuations (see pipeline.eval.metrics.degeneration)."""

    repetition_rate: Interval[float]
    distinct_1: Interval[float]
    distinct_2: Interval[float]
    looping: Interval[float]  # share of continuations that end in a loop

    def to_json(self) -> dict[str, Any]:
        return {
            **self.repetition_rate.to_json("repetition_rate"),
            **self.distinct_1.to_json("distinct_1"),
            **self.distinct_2.to_json("distinct_2"),
            **self.looping.to_json("looping"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Degeneration:
        return cls(*(Interval.from_json(data, f.name) for f in dataclasses.fields(cls)))


@dataclass(frozen=True)
class Judge:
    """A teacher's verdict on a rollout: its NLL of the continuations, and top-1 agreement with the model."""

    teacher: str  # the judge's display name
    nll: Interval[float]
    nll_reference: Interval[float]  # of the true continuations
    agreement_rollout: Interval[float]  # along the model's own rollout
    agreement_data: Interval[float]  # along the data

    def to_json(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher,
            **self.nll.to_json("nll"),
            **self.nll_reference.to_json("nll_reference"),
            **self.agreement_rollout.to_json("agreement_rollout"),
            **self.agreement_data.to_json("agreement_data"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Judge:
        scores = (Interval.from_json(data, f.name) for f in dataclasses.fields(cls)[1:])
        return cls(data["teacher"], *scores)


@dataclass(frozen=True)
class RolloutResult:
    """One rollout (greedy or sampled) of every prompt, set against the true continuations."""

    accuracy_by_position: Interval[list[float]]  # a(k), k = 1..N
    survival_by_position: Interval[list[float]]  # S(k)
    half_life: int | None  # the first k with S(k) < 1/2; None: not within N
    first_divergence_mean: Interval[float]  # position of the first wrong token (N + 1: none)
    first_divergence_median: Interval[float]
    first_divergence_histogram: list[int]  # prompts per first wrong position 1..N + 1
    diverged_fraction: float
    wer: Interval[float]
    cer: Interval[float]
    exposure_gap: ExposureGap
    degeneration: Degeneration
    judge: Judge | None  # None: no judge

    def to_json(self) -> dict[str, Any]:
        out = {
            **self.accuracy_by_position.to_json("accuracy_by_position"),
            **self.survival_by_position.to_json("survival_by_position"),
            "half_life": self.half_life,
            **self.first_divergence_mean.to_json("first_divergence_mean"),
            **self.first_divergence_median.to_json("first_divergence_median"),
            "first_divergence_histogram": self.first_divergence_histogram,
            "diverged_fraction": self.diverged_fraction,
            **self.wer.to_json("wer"),
            **self.cer.to_json("cer"),
            "exposure_gap": self.exposure_gap.to_json(),
            "degeneration": self.degeneration.to_json(),
        }
        return out | ({"judge": self.judge.to_json()} if self.judge is not None else {})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutResult:
        return cls(
            accuracy_by_position=Interval.from_json(data, "accuracy_by_position"),
            survival_by_position=Interval.from_json(data, "survival_by_position"),
            half_life=data["half_life"],
            first_divergence_mean=Interval.from_json(data, "first_divergence_mean"),
            first_divergence_median=Interval.from_json(data, "first_divergence_median"),
            first_divergence_histogram=data["first_divergence_histogram"],
            diverged_fraction=data["diverged_fraction"],
            wer=Interval.from_json(data, "wer"),
            cer=Interval.from_json(data, "cer"),
            exposure_gap=ExposureGap.from_json(data["exposure_gap"]),
            degeneration=Degeneration.from_json(data["degeneration"]),
            judge=Judge.from_json(data["judge"]) if "judge" in data else None,
        )


@dataclass(frozen=True)
class Confidence:
    """The model's own next-token distribution at each generated position k of a rollout (temperature 1)."""

    entropy: Interval[list[float]]  # nats over vocabulary ids, k = 1..N, mean over prompts
    max_prob: Interval[list[float]]  # probability of the most likely id

    def to_json(self) -> dict[str, Any]:
        return {**self.entropy.to_json("entropy"), **self.max_prob.to_json("max_prob")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Confidence:
        return cls(Interval.from_json(data, "entropy"), Interval.from_json(data, "max_prob"))


@dataclass(frozen=True)
class PositionBucket:
    """Mean teacher-forced NLL of the predictions at window positions start..end-1 (0-based)."""

    start: int
    end: int
    loss: float  # nats per token
    tokens: int
    past_trained_context: bool  # start >= the model's max_seq_len: positions it never trained at


@dataclass(frozen=True)
class LossByPosition:
    """Teacher-forced loss against the position in the --seq-len window (causal view): does loss fall
    with context, and does it hold past the trained max_seq_len (length extrapolation)?"""

    seq_len: int
    trained_max_seq_len: int
    per_position: list[float]  # mean NLL at positions 0..seq_len-1 (position t: predicting token t+1)
    buckets: list[PositionBucket]  # powers of two, split at trained_max_seq_len

    def to_json(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "trained_max_seq_len": self.trained_max_seq_len,
            "extrapolated": self.seq_len > self.trained_max_seq_len,
            "per_position": self.per_position,
            "buckets": [dataclasses.asdict(b) for b in self.buckets],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LossByPosition:
        buckets = [PositionBucket(**b) for b in data["buckets"]]
        return cls(data["seq_len"], data["trained_max_seq_len"], data["per_position"], buckets)


@dataclass(frozen=True)
class Reference:
    """The prompts' true continuations scored teacher-forced: accuracy p, and p^k to set S(k) against."""

    prompts: int  # M
    teacher_forced_loss: float
    teacher_forced_accuracy: Interval[float]  # p
    teacher_forced_accuracy_by_position: list[float]
    independence_prediction: Interval[list[float]]  # p^k, k = 1..N

    def to_json(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "teacher_forced_loss": self.teacher_forced_loss,
            **self.teacher_forced_accuracy.to_json("teacher_forced_accuracy"),
            "teacher_forced_accuracy_by_position": self.teacher_forced_accuracy_by_position,
            **self.independence_prediction.to_json("independence_prediction"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reference:
        return cls(
            data["prompts"],
            data["teacher_forced_loss"],
            Interval.from_json(data, "teacher_forced_accuracy"),
            data["teacher_forced_accuracy_by_position"],
            Interval.from_json(data, "independence_prediction"),
        )


@dataclass(frozen=True)
class Continuation:
    """A rollout's text for one prompt, and its length in characters up to the first wrong token."""

    text: str
    diverge_char: int


@dataclass(frozen=True)
class Sample:
    """A prompt shown as text: its true continuation and the model's, per rollout."""

    prompt: str
    reference: str
    continuations: dict[str, Continuation]  # by rollout: greedy, sampled

    def to_json(self) -> dict[str, Any]:
        texts = {mode: c.text for mode, c in self.continuations.items()}
        cuts = {f"{mode}_diverge_char": c.diverge_char for mode, c in self.continuations.items()}
        return {"prompt": self.prompt, "reference": self.reference} | texts | cuts

    @classmethod
    def from_json(cls, data: dict[str, Any], modes: list[str]) -> Sample:
        continuations = {mode: Continuation(data[mode], data[f"{mode}_diverge_char"]) for mode in modes}
        return cls(data["prompt"], data["reference"], continuations)


@dataclass(frozen=True)
class Compounding:
    """What `compounding.summarize` gives for one model: the reference scores and the rollouts."""

    reference: Reference
    greedy: RolloutResult
    sampled: RolloutResult | None  # None: --no-sampled
    samples: list[Sample]
    nucleus: RolloutResult | None = None  # None: not in --rollouts
    beam: RolloutResult | None = None
    confidence: dict[str, Confidence] = field(default_factory=dict)  # by rollout


@dataclass(frozen=True)
class AttentionResult:
    """Attention entropy and max-probability per layer and head on val windows, and average maps."""

    entropy: list[list[float]]  # (L, H) nats
    entropy_normalised: list[list[float]]
    max_prob: list[list[float]]
    collapse_threshold: float
    collapsed: list[list[int]]  # [[layer, head], ...]
    maps: np.ndarray | None = field(default=None, compare=False)  # (L, H, n, n); not in metrics.json

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "maps"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AttentionResult:
        return cls(**data)


@dataclass(frozen=True)
class Shape:
    n_layers: int
    n_heads: int
    d_model: int
    positions: str
    causal: bool = True  # trained with the causal mask (ModelConfig.causal)


@dataclass(frozen=True)
class TeacherForced:
    """Teacher-forced metrics on a fixed set of val windows (pipeline.eval.teacher_forced.evaluate_lm)."""

    val_loss: float  # nats per token, full vocabulary
    val_ppl: float
    bits_per_byte: float
    top1_acc: float
    top5_acc: float
    ece: float
    val_tokens: float

    @classmethod
    def from_metrics(cls, tf: dict[str, float]) -> TeacherForced:
        """From evaluate_lm's dictionary (prefix "val")."""
        keys = ("loss", "ppl", "bpb", "top1", "top5", "ece", "tokens")
        return cls(*(tf[f"val_{k}"] for k in keys))


LEAKY_NOTE = (
    "trained without the causal mask: 'leaky' is as trained (mask off, each position sees its target), "
    "'causal' with the mask on (the honest view, also the top-level metrics); rollouts are causal by construction"
)
OPTIONAL_MODES = ("sampled", "nucleus", "beam")


@dataclass(frozen=True)
class ModelResult:
    """Everything measured of one model: its metrics.json entry, with the attention maps."""

    path: str  # its export folder
    kind: str  # the export's kind (teacher, student), "–" where unrecorded
    preset: str | None
    parameters: int
    shape: Shape
    teacher_forced: TeacherForced  # with the causal mask
    reference: Reference
    greedy: RolloutResult
    sampled: RolloutResult | None  # None: --no-sampled
    samples: list[Sample]
    attention: AttentionResult
    nucleus: RolloutResult | None = None  # None: not in --rollouts
    beam: RolloutResult | None = None
    confidence: dict[str, Confidence] = field(default_factory=dict)  # by rollout
    loss_by_position: LossByPosition | None = None
    leaky: TeacherForced | None = None  # mask off, as trained: only for a model trained without it

    def rollouts(self) -> dict[str, RolloutResult]:
        """{'greedy': ..., 'sampled': ..., 'nucleus': ..., 'beam': ...}, those measured."""
        others = {mode: getattr(self, mode) for mode in OPTIONAL_MODES}
        return {"greedy": self.greedy} | {mode: r for mode, r in others.items() if r is not None}

    def result_entry(self) -> dict[str, Any]:
        """A model's headline numbers, its entry of result.json (every rollout mode's under "rollouts")."""
        tf, g = self.teacher_forced, self.greedy
        rollouts = {
            mode: {
                "first_divergence_mean": r.first_divergence_mean.mean,
                "wer": r.wer.mean,
                "cer": r.cer.mean,
            }
            for mode, r in self.rollouts().items()
        }
        return {
            "val_loss": tf.val_loss,
            "bits_per_byte": tf.bits_per_byte,
            "top1_acc": tf.top1_acc,
            "first_divergence_mean": g.first_divergence_mean.mean,
            "half_life": g.half_life,
            "wer": g.wer.mean,
            "cer": g.cer.mean,
            "rollouts": rollouts,
        } | ({} if self.leaky is None else {"val_loss_leaky": self.leaky.val_loss})

    def to_json(self) -> dict[str, Any]:
        """The model's entry of metrics.json (the attention maps left out)."""
        out = {
            "path": self.path,
            "kind": self.kind,
            "preset": self.preset,
            "parameters": self.parameters,
            "shape": dataclasses.asdict(self.shape),
            **dataclasses.asdict(self.teacher_forced),
            **self.reference.to_json(),
            **self.greedy.to_json(),
        }
        out |= {mode: r.to_json() for mode, r in self.rollouts().items() if mode != "greedy"}
        out["samples"] = [sample.to_json() for sample in self.samples]
        out["attention"] = self.attention.to_json()
        if self.confidence:
            out["rollout_confidence"] = {mode: c.to_json() for mode, c in self.confidence.items()}
        if self.loss_by_position is not None:
            out["loss_by_position"] = self.loss_by_position.to_json()
        if self.leaky is not None:
            views = {"leaky": self.leaky, "causal": self.teacher_forced}
            out["teacher_forced_views"] = {k: dataclasses.asdict(v) for k, v in views.items()}
            out["teacher_forced_views"]["note"] = LEAKY_NOTE
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelResult:
        """A metrics.json entry as a record (without attention maps)."""
        others = {mode: RolloutResult.from_json(data[mode]) for mode in OPTIONAL_MODES if mode in data}
        modes = ["greedy", *others]
        views = data.get("teacher_forced_views")
        positions = data.get("loss_by_position")
        return cls(
            path=data["path"],
            kind=data["kind"],
            preset=data["preset"],
            parameters=data["parameters"],
            shape=Shape(**data["shape"]),
            teacher_forced=_teacher_forced(data),
            reference=Reference.from_json(data),
            greedy=RolloutResult.from_json(data),
            sampled=others.get("sampled"),
            samples=[Sample.from_json(s, modes) for s in data["samples"]],
            attention=AttentionResult.from_json(data["attention"]),
            nucleus=others.get("nucleus"),
            beam=others.get("beam"),
            confidence={m: Confidence.from_json(c) for m, c in data.get("rollout_confidence", {}).items()},
            loss_by_position=LossByPosition.from_json(positions) if positions else None,
            leaky=_teacher_forced(views["leaky"]) if views else None,
        )


def _teacher_forced(data: dict[str, Any]) -> TeacherForced:
    return TeacherForced(*(data[f.name] for f in dataclasses.fields(TeacherForced)))


@dataclass(frozen=True)
class Context:
    """What every model was measured on: the data, the prompts, the rollouts and the judge."""

    data: str  # the tokenized data folder
    models: dict[str, str]  # display name -> export folder
    judge: str | None
    judge_rule: str  # what chose the judge
    prompts: int
    prompt_tokens: int
    new_tokens: int
    prompt_starts: list[int]
    seed: int
    sampled: bool
    temperature: float
    top_k: int
    top_p: float
    seq_len: int
    rollouts: list[str] = field(default_factory=lambda: ["greedy", "sampled"])  # the modes measured
    beam_width: int = 1
    nucleus: float = 1.0
    eval_tokens: int = 0  # val tokens asked for the teacher-forced metrics (--eval-tokens); 0: unrecorded

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
