"""Configuration of the distill stage: the student's shape and init, the KD loss, on-policy batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import DataConfig, OptimConfig, TrainConfig, non_negative, positive, require

StudentInit = Literal["random", "copy", "best_head", "merged_heads"]


SoftLoss = Literal["forward_kl", "reverse_kl", "jsd", "topk_kl"]


@dataclass
class StudentConfig:
    """The student's shape relative to the teacher known at run time, and how its weights start.

    A 0 (or unset) field means "as the teacher"; everything not listed here (block style, positions,
    biases, tied head, vocabulary, max_seq_len) is always the teacher's.
    """

    n_layers: int = 0
    """Blocks; 0: the teacher's. Fewer take evenly spaced teacher layers (first and last kept) at init."""
    n_heads: int = 1
    """Attention heads per block (init best_head and merged_heads need 1)."""
    d_model: int = 0
    """Residual width; 0: the teacher's (every init but random needs the teacher's)."""
    ffn_mult: int = 0
    """FFN hidden width as a multiple of d_model; 0: the teacher's."""
    dropout: float | None = None
    """Dropout; unset: the teacher's."""
    init: StudentInit = "copy"
    """random | copy (all but attention) | best_head (the most important teacher head) | merged_heads; see students/init.py."""
    importance_tokens: int = 8192
    """Validation tokens per head-ablation evaluation of the teacher (head importance)."""
    init_from: str = ""
    """A transformers GPT-2 folder whose weights replace the init's (exercise H6.4); empty: none. Recorded in init_from.json."""
    init_parts: Literal["all", "embeddings"] = "all"
    """With init_from: all weights (shapes must match the student) or only the token and learned position embeddings."""

    def __post_init__(self) -> None:
        non_negative(self, "student", "n_layers", "d_model", "ffn_mult")
        positive(self, "student", "n_heads", "importance_tokens")
        require(
            self.dropout is None or 0.0 <= self.dropout < 1.0,
            f"student.dropout must be in [0, 1), got {self.dropout}",
        )
        require(
            self.init not in ("best_head", "merged_heads") or self.n_heads == 1,
            f"student.init={self.init} maps teacher heads into one student head; "
            f"use --student.n-heads 1 or --student.init copy",
        )


@dataclass
class KDConfig:
    """The distillation loss: alpha * CE(labels) + (1 - alpha) * T^2 * soft(teacher, student) per token."""

    alpha: float = 0.5
    """Weight of the hard-label cross-entropy; the soft loss gets 1 - alpha (1: no teacher, a scratch run).
    On-policy batches (on_policy.fraction) take the soft loss alone."""
    temperature: float = 1.0
    """Temperature T applied to teacher and student logits in the soft loss (scaled by T^2)."""
    loss: SoftLoss = "forward_kl"
    """forward_kl KL(teacher||student) | reverse_kl KL(student||teacher) | jsd | topk_kl (top-k + one tail bucket)."""
    beta: float = 0.5
    """jsd: teacher weight in the mixture beta*teacher + (1-beta)*student; beta 0 is forward KL, 1 reverse KL."""
    top_k: int = 64
    """Teacher classes kept per position by topk_kl and by the teacher cache; the rest form one tail bucket."""
    attention_weight: float = 0.0
    """Weight of the attention-transfer loss (teacher head-averaged attention vs the student's); 0: off."""
    cache: bool = False
    """Use an offline cache of the teacher's top-k log-probs (every soft loss then runs on top_k + 1 buckets)."""
    cache_dir: str = ""
    """Teacher cache folder; empty: <data>/teacher_cache/<hash of teacher, data and settings>."""
    layerwise_steps: int = 0
    """Steps of a layer-wise phase first: student block l learns the teacher's map between its mapped layers'
    residual states (fed the teacher's), loss `block_error`; end-to-end distillation follows. 0: off."""
    layerwise_share: float = 0.0
    """The layer-wise phase as a share of the run's steps (rounded down); a layerwise_steps > 0 wins;
    a scratch run (alpha 1: no teacher) has none."""
    hidden_weight: float = 0.0
    """Weight of hidden-state matching (end to end): the student's residual stream after each block vs the
    teacher's at the mapped layer, relative squared error (`hidden`); 0: off."""
    alpha_end: float | None = None
    """alpha at the last step, linear from `alpha` over the end-to-end steps; unset: constant alpha."""
    temperature_end: float | None = None
    """Temperature at the last step, linear from `temperature` over the end-to-end steps; unset: constant."""

    @property
    def uses_teacher(self) -> bool:
        """Whether the soft loss has weight at some step (alpha < 1 at the start or the end); False: a scratch run."""
        return self.alpha < 1.0 or (self.alpha_end is not None and self.alpha_end < 1.0)

    def __post_init__(self) -> None:
        require(0.0 <= self.alpha <= 1.0, f"kd.alpha must be in [0, 1], got {self.alpha}")
        require(0.0 <= self.beta <= 1.0, f"kd.beta must be in [0, 1], got {self.beta}")
        positive(self, "kd", "temperature", "top_k")
        non_negative(self, "kd", "attention_weight", "layerwise_steps", "hidden_weight")
        require(
            self.cache or not self.cache_dir,
            f"kd.cache_dir={self.cache_dir!r} names a teacher cache, but the cache is off: add --kd.cache "
            "(or drop --kd.cache-dir to distill from the live teacher)",
        )
        require(
            0.0 <= self.layerwise_share < 1.0,
            f"kd.layerwise_share must be in [0, 1) (a share of the run's steps), got {self.layerwise_share}",
        )
        require(
            self.alpha_end is None or 0.0 <= self.alpha_end <= 1.0,
            f"kd.alpha_end must be in [0, 1], got {self.alpha_end}",
        )
        require(
            self.temperature_end is None or self.temperature_end > 0,
            f"kd.temperature_end must be > 0, got {self.temperature_end}",
        )
        require(
            not (self.cache and self.temperature_end is not None),
            "the teacher cache holds log-probs at one temperature (kd.temperature); "
            "drop --kd.cache or --kd.temperature-end",
        )
        require(
            not (self.cache and self.attention_weight > 0),
            "kd.attention_weight needs the live teacher's attention, which the cache does not hold; "
            "drop --kd.cache or set --kd.attention-weight 0",
        )


@dataclass
class OnPolicyConfig:
    """On-policy distillation (GKD): some batches are the student's own generations, scored by the teacher."""

    fraction: float = 0.0
    """Share lambda of micro-batches whose continuations the student samples itself; 0: off. Such a
    batch trains on the soft loss alone (weight 1, GKD's rule): the sampled text has no true next
    token, so kd.alpha and its schedule weigh only the other batches."""
    prompt_len: int = 16
    """Tokens of a training window kept as the prompt; the student generates the rest of the window."""
    temperature: float = 1.0
    """Sampling temperature of the student's generations (0: greedy)."""

    def __post_init__(self) -> None:
        require(0.0 <= self.fraction <= 1.0, f"on_policy.fraction must be in [0, 1], got {self.fraction}")
        positive(self, "on_policy", "prompt_len")
        non_negative(self, "on_policy", "temperature")


@dataclass
class DistillDataConfig(DataConfig):
    """DataConfig whose corpus and tokenizer default to the teacher's (see teacher.distill_data)."""

    corpus: str = ""
    """Corpus to distill on, tokenized with the teacher's tokenizer (a file, glob or dataset, as
    recipes/tokenize.py --input); empty: the teacher's data folder."""
    encoding: str = ""
    """Empty: the teacher's. Teacher and student share one tokenizer, so any other is refused."""
    compact_vocab: Literal["teacher"] = "teacher"  # type: ignore[assignment]
    """The student predicts the teacher's classes: its vocabulary map, compacted or not, is the teacher's."""


@dataclass
class DistillConfig:
    """Distill a teacher export into a student: the distill stage's whole configuration.

    The student always uses the teacher's tokenizer and vocabulary map (data.compact_vocab can only
    be "teacher"); the data folder must be tokenized with the teacher's tokenizer.
    """

    teacher: str = ""
    """Teacher export folder (a run's best/ or last/, or a run folder); empty: the latest `shakespeare` teacher."""
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    """Tokenized data: --data.dir, else --data.corpus tokenized with the teacher's tokenizer, else the
    teacher's data folder."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """Student shape and initialisation."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Distillation loss."""
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    """On-policy batches."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1000))
    """Training loop."""
    out: str = ""
    """Run folder; empty: runs/distill/<preset>-<time>."""
    preset: str = "one_head"
    """Student preset the defaults come from (see students/)."""
    config: str = ""
    """TOML or YAML file of settings, applied on top of the preset (command-line flags win)."""

    def __post_init__(self) -> None:
        require(  # seq_len 0 (the teacher's) is checked again once resolved
            self.on_policy.fraction == 0
            or self.data.seq_len == 0
            or self.on_policy.prompt_len < self.data.seq_len,
            f"on_policy.prompt_len={self.on_policy.prompt_len} leaves nothing to generate in windows of "
            f"data.seq_len={self.data.seq_len}; lower --on-policy.prompt-len",
        )
        kd = self.kd
        scratch = not kd.uses_teacher
        require(
            not scratch
            or (
                self.on_policy.fraction == 0
                and not kd.cache
                and kd.attention_weight == 0
                and kd.layerwise_steps == 0
                and kd.hidden_weight == 0
            ),
            "kd.alpha=1 trains on the labels alone (a scratch run): set --on-policy.fraction 0, "
            "--kd.attention-weight 0, --kd.layerwise-steps 0, --kd.hidden-weight 0 and drop --kd.cache, "
            "or lower --kd.alpha",
        )
