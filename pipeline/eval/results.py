"""Typed records of one model's evaluation, as the report reads them and metrics.json stores them.

`compounding.summarize` builds a `Compounding` (the prompts' teacher-forced scores, the greedy and
sampled rollouts, sample texts); the evaluate recipe adds the model's identity, its teacher-forced
metrics on val windows and its attention into a `ModelResult`. `to_json()` gives the metrics.json
layout: a model's greedy rollout metrics at its top level, the sampled ones under "sampled", an
interval beside its mean as "<name>_ci", the attention maps left out. `from_json` reads it back.
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


@dataclass(frozen=True)
class ModelResult:
    """Everything measured of one model: its metrics.json entry, with the attention maps."""

    path: str  # its export folder
    kind: str  # the export's kind (teacher, student), "–" where unrecorded
    preset: str | None
    parameters: int
    shape: Shape
    teacher_forced: TeacherForced
    reference: Reference
    greedy: RolloutResult
    sampled: RolloutResult | None  # None: --no-sampled
    samples: list[Sample]
    attention: AttentionResult

    def rollouts(self) -> dict[str, RolloutResult]:
        """{'greedy': ..., 'sampled': ...}, the sampled one where measured."""
        return {"greedy": self.greedy} | ({"sampled": self.sampled} if self.sampled is not None else {})

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
        if self.sampled is not None:
            out["sampled"] = self.sampled.to_json()
        out["samples"] = [sample.to_json() for sample in self.samples]
        return out | {"attention": self.attention.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelResult:
        """A metrics.json entry as a record (without attention maps)."""
        sampled = RolloutResult.from_json(data["sampled"]) if "sampled" in data else None
        modes = ["greedy", "sampled"] if sampled is not None else ["greedy"]
        return cls(
            path=data["path"],
            kind=data["kind"],
            preset=data["preset"],
            parameters=data["parameters"],
            shape=Shape(**data["shape"]),
            teacher_forced=TeacherForced(*(data[f.name] for f in dataclasses.fields(TeacherForced))),
            reference=Reference.from_json(data),
            greedy=RolloutResult.from_json(data),
            sampled=sampled,
            samples=[Sample.from_json(s, modes) for s in data["samples"]],
            attention=AttentionResult.from_json(data["attention"]),
        )


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

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
