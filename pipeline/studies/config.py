"""Configuration of the studies: the benchmark, the batch-size scaling study, comparisons and the learning-rate range test."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    TrainConfig,
    non_negative,
    positive,
    require,
    require_windows,
)


@dataclass
class BenchmarkConfig:
    """The benchmark: naive reference vs the pipeline, full vs compacted vocabulary, training and generation."""

    data: DataConfig = field(default_factory=DataConfig)
    """Tokenized data (windows come from its train split; the compact vocabulary from its counts)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape (from the preset; dropout 0 in every case)."""
    batch: int = 32
    """Sequences per training step."""
    impls: tuple[Literal["naive", "pipeline"], ...] = ("naive", "pipeline")
    """Implementations: naive (the sheet's textbook code, fp32) and pipeline (fused loss, SDPA, mixed precision)."""
    vocabs: tuple[Literal["full", "compact"], ...] = ("full", "compact")
    """Vocabularies: the encoding's full vocabulary and the compacted one (ids seen in train + other)."""
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Mixed precision of the pipeline path (auto: as pretrain decides for this device)."""
    warmup: int = 1
    """Untimed steps before measuring."""
    repeats: int = 3
    """Timed steps (the table shows the median and the min-max range)."""
    case_seconds: float = 30.0
    """No further timed repetition of a case starts once its timed ones took this long (at least one runs); 0: all --repeats.
    A warm-up step longer than this is the measurement (`1 step*`). It keeps the run within ~5 minutes
    on a 2-core CPU, where one textbook step at full vocabulary takes 35-50 s, while the pipeline's
    fp32 step there (15-20 s) is still timed after its warm-up."""
    rounds: int = 1
    """Runs of the whole list of cases, in alternating order (ABBA: forward, then backward, ...).
    Each row reports the median over rounds, and `vs textbook` the median of each round's ratio of
    cases that ran minutes apart at most: on a shared machine whose speed wanders, ratios to trust
    need 3 or more (the char preset: ~25 s a round on 2 cores)."""
    min_case_seconds: float = 2.0
    """Short steps repeat past --repeats until their timed total reaches this (and warm up for a quarter of it)."""
    gen_tokens: int = 128
    """New tokens per generation measurement (batch 1); 0: skip generation. The textbook loop's cost
    grows with its square (every step re-runs the whole context through the full head)."""
    max_mem_gib: float = 0.0
    """Memory a CPU case may take before it counts as not fitting; 0: available memory minus 1 GiB."""
    threads: int = 0
    """CPU threads per case; 0: torch's default (all cores)."""
    compile: bool = False
    """Also torch.compile the pipeline model."""
    variants: tuple[Literal["eager", "compiled", "eager-foreach", "compiled-foreach"], ...] = ()
    """Settings of the pipeline to compare in one run, a row each: eager or torch.compile'd, with the
    fused AdamW the pipeline trains with or the foreach one (-foreach). Each row's `vs first` is its
    speed over the first variant's on the same vocabulary (with --rounds, the median of each round's
    ratio). Empty: one pipeline row, compiled with --compile."""
    profile: bool = False
    """After timing each training case, profile one more step (torch.profiler) and print the ops
    that took most of it, with their share of its time (`profile` in benchmark.json's rows)."""
    out: str = ""
    """Output folder; empty: runs/benchmark/<preset>-<time>."""
    preset: str = "seed"
    """Teacher preset whose model, data and batch size are measured (see teachers/)."""
    config: str = ""
    """TOML or YAML file of settings, applied on top of the preset (command-line flags win)."""

    def __post_init__(self) -> None:
        positive(self, "benchmark", "batch", "repeats", "rounds")
        non_negative(
            self,
            "benchmark",
            "warmup",
            "gen_tokens",
            "max_mem_gib",
            "threads",
            "case_seconds",
            "min_case_seconds",
        )
        require(
            bool(self.impls) and bool(self.vocabs), "benchmark.impls and benchmark.vocabs must not be empty"
        )
        require(
            not (self.compile and self.variants),
            "benchmark.compile and benchmark.variants are both set: name the compiled rows in "
            "--variants (compiled, compiled-foreach) and drop --compile",
        )
        require(
            len(set(self.variants)) == len(self.variants),
            f"benchmark.variants names a variant twice: {' '.join(self.variants)}",
        )
        require(
            not self.variants or "pipeline" in self.impls,
            "benchmark.variants are settings of the pipeline: add pipeline to --impls",
        )
        positive(self.data, "data", "seq_len")
        require(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )
        # Settings the cases do not take, refused rather than ignored (the presets set them so).
        require(
            self.model.dropout == 0.0,
            f"model.dropout={self.model.dropout}: every case is timed without dropout, as the textbook code; drop "
            "--model.dropout",
        )
        require(
            self.data.compact_vocab == "auto",
            f"data.compact_vocab={self.data.compact_vocab!r}: --vocabs full compact picks the vocabularies measured; "
            "drop --data.compact-vocab",
        )


@dataclass
class ScalingConfig:
    """A batch-size study: one real pretrain (or distill) run per global batch size, then a summary."""

    stage: Literal["pretrain", "distill"] = "pretrain"
    """Recipe of every run: pretrain (--preset names a teacher) or distill (a student; needs --teacher)."""
    teacher: str = ""
    """Exported teacher for --stage distill, passed to recipes/distill.py --teacher."""
    data: str = ""
    """Tokenized data folder of every run; empty: the preset's default folder (tokenized first when missing)."""
    out: str = ""
    """Study folder (one run folder bs<B> per batch size in it); empty: runs/scaling/<preset>-<time>."""
    batch_sizes: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    """Global batch sizes in sequences, one run each."""
    micro_batch_size: int = 0
    """Sequences per forward pass per process in every run; 0: the preset's, at most the batch per process."""
    max_steps: int = 0
    """Optimizer steps of every run (larger batches then see more tokens); 0: use --max-tokens."""
    max_tokens: int = 0
    """Training tokens of every run: the same token budget whatever the batch size; 0: use --max-steps."""
    target_loss: float = 0.0
    """Val loss whose steps, tokens and time to reach are compared; 0: the lowest val loss every run reached."""
    lr_rule: Literal["none", "linear", "sqrt"] = "sqrt"
    """Learning rate per batch size B: base_lr, base_lr x B/reference, or base_lr x sqrt(B/reference)."""
    base_lr: float = 0.0
    """Learning rate at the reference batch size; 0: the preset's optim.lr."""
    reference_batch_size: int = 0
    """Batch size (sequences) at which base_lr applies; 0: the preset's sequences per step."""
    warmup: Literal["tokens", "steps"] = "tokens"
    """Warmup of each run: as many tokens as the preset's warmup at the reference batch size, or as many steps."""
    evals: int = 20
    """Evaluations per run, evenly spaced (sets --train.eval-interval): the resolution of steps-to-target."""
    seed: int = 1337
    """--train.seed of every run: the same initial weights and data order."""
    noise_scale: bool = True
    """Estimate the gradient noise scale B_simple in every run that accumulates gradients."""
    run_args: str = ""
    """Extra flags for every run, split like a shell line: --run-args='--model.dropout 0 --train.precision bf16'."""
    launch_config: str = ""
    """Accelerate launch YAML of every run (accelerate launch --config_file FILE); empty: a plain python process."""
    parallel: int = 1
    """Runs at once (each its own process); pair with --gpu-ids to give each its devices."""
    gpu_ids: tuple[str, ...] = ()
    """accelerate launch --gpu_ids of each parallel slot, one entry per slot, e.g. 0 1 2 3 or 0,1 2,3."""
    progress: bool = True
    """Show a progress bar over all runs' steps."""
    preset: str = "shakespeare"
    """Teacher preset (--stage pretrain) or student preset (--stage distill) of every run."""
    config: str = ""
    """TOML, YAML or JSON file of these settings, applied on top of the defaults (command-line flags win)."""

    def __post_init__(self) -> None:
        require(
            bool(self.batch_sizes), "--batch-sizes needs at least one batch size, e.g. --batch-sizes 8 16 32"
        )
        require(
            all(b > 0 for b in self.batch_sizes) and len(set(self.batch_sizes)) == len(self.batch_sizes),
            f"--batch-sizes must be distinct positive numbers of sequences, got {list(self.batch_sizes)}",
        )
        require(
            not (self.max_steps and self.max_tokens),
            "set one budget for every run, not both: --max-steps N or --max-tokens T (the same tokens per run)",
        )
        non_negative(self, "scaling", "micro_batch_size", "max_steps", "max_tokens", "target_loss", "base_lr")
        non_negative(self, "scaling", "reference_batch_size", "seed")
        positive(self, "scaling", "evals", "parallel")
        require(
            (self.stage == "distill") == bool(self.teacher),
            "--stage distill needs --teacher EXPORT_DIR, and --teacher only applies to --stage distill",
        )
        require(
            not self.gpu_ids or len(self.gpu_ids) == self.parallel,
            f"--gpu-ids gives {len(self.gpu_ids)} slots but --parallel is {self.parallel}: give one entry per slot",
        )


@dataclass
class CompareConfig:
    """A comparison: one pretrain run per variant (same preset, data, seed and steps), then one table."""

    variants: tuple[str, ...] = ()
    """Variants as NAME=FLAGS, FLAGS being pretrain flags split like a shell line: 'h4=' 'h8=--model.n-heads 8'."""
    data: str = ""
    """Tokenized data folder of every variant; empty: the preset's default folder (tokenized first when missing)."""
    out: str = ""
    """Comparison folder (one run folder per variant name in it); empty: runs/compare/<preset>-<time>."""
    max_steps: int = 0
    """Optimizer steps of every variant (required; the only training budget)."""
    run_args: str = ""
    """Pretrain flags every variant gets before its own, split like a shell line: '--data.compact-vocab on'."""
    seed: int = 1337
    """--train.seed of every variant: the same data order and, for equal shapes, the same initial weights."""
    evals: int = 10
    """Evaluations per variant, evenly spaced (sets --train.eval-interval; a variant's own flag wins)."""
    launch_config: str = ""
    """Accelerate launch YAML of every variant (accelerate launch --config_file FILE); empty: a plain python process."""
    parallel: int = 1
    """Variants trained at once, each its own process."""
    dry_run: bool = False
    """Check the variants and print each one's command; train nothing and write nothing."""
    progress: bool = True
    """Show one progress bar over all variants' steps."""
    preset: str = "shakespeare"
    """Teacher preset of every variant (see teachers/)."""
    config: str = ""
    """TOML, YAML or JSON file of these settings, applied on top of the defaults (command-line flags win)."""

    def __post_init__(self) -> None:
        non_negative(self, "compare", "max_steps", "seed")
        positive(self, "compare", "evals", "parallel")


@dataclass
class LRFindConfig:
    """A learning-rate range test (Smith 2017): train with an exponentially rising learning rate."""

    data: DataConfig = field(default_factory=DataConfig)
    """Tokenized data."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer (its lr, schedule and warmup are unused: the test sets the learning rate)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100))
    """Batch sizes, precision and seed; --max-steps is the number of learning rates tried."""
    start_lr: float = 1e-6
    """First learning rate."""
    end_lr: float = 1.0
    """Last learning rate (the test stops earlier when the loss diverges)."""
    smoothing: float = 0.9
    """Weight of the past in the smoothed loss (a bias-corrected exponential moving average)."""
    diverge: float = 4.0
    """Stop once the smoothed loss exceeds this multiple of its lowest value."""
    rule: Literal["steepest", "valley"] = "steepest"
    """Suggestion: where the smoothed loss falls fastest per log-LR, or the LR of its minimum / 10."""
    out: str = ""
    """Run folder; empty: runs/lr_find/<preset>-<time>."""
    preset: str = "shakespeare"
    """Teacher preset whose model, data and batch the test uses (see teachers/)."""
    config: str = ""
    """TOML, YAML or JSON file of settings, applied on top of the preset (command-line flags win)."""

    def __post_init__(self) -> None:
        positive(self, "lr_find", "start_lr", "end_lr")
        require(
            self.start_lr < self.end_lr,
            f"--start-lr {self.start_lr} must be below --end-lr {self.end_lr}",
        )
        require(0.0 <= self.smoothing < 1.0, f"--smoothing must be in [0, 1), got {self.smoothing}")
        require(
            self.diverge > 1.0, f"--diverge must be > 1 (a multiple of the lowest loss), got {self.diverge}"
        )
        require(
            self.train.max_steps >= 10,
            f"--max-steps {self.train.max_steps}: the range test needs at least 10 learning rates",
        )
        # Settings the range test does not take, refused rather than ignored.
        require(
            not (self.train.max_tokens or self.train.max_epochs),
            "train.max_tokens and train.max_epochs do not apply: --max-steps is the number of learning rates tried",
        )
        require(
            not self.train.resume,
            f"train.resume={self.train.resume!r}: a range test does not resume (a new run folder each time); "
            "drop --train.resume",
        )
        require_windows(self.data, self.train)
        require(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
            f"lower --data.seq-len or raise --model.max-seq-len",
        )

    @classmethod
    def from_pretrain(cls, cfg: PretrainConfig, steps: int = 100) -> LRFindConfig:
        """The range test of a teacher preset: its data, model, optimizer and batch; `steps` LRs."""
        train = dataclasses.replace(cfg.train, max_steps=steps, max_epochs=0.0, max_tokens=0)
        return cls(data=cfg.data, model=cfg.model, optim=cfg.optim, train=train, preset=cfg.preset)


@dataclass
class SummaryConfig:
    """Summarise a teacher, its student and their evaluation in a few lines and one JSON file (the quickstart's last step)."""

    teacher: str = ""
    """The teacher's pretrain run folder."""
    student: str = ""
    """The student's distill run folder."""
    evaluate: str = ""
    """The evaluate run folder that compared them (metrics.json, report.md)."""
    out: str = ""
    """The JSON file written; empty: summary.json beside the three run folders."""
    seconds: tuple[str, ...] = ()
    """Wall seconds of each stage of this invocation, NAME=SECONDS (e.g. pretrain=190)."""
    skipped: tuple[str, ...] = ()
    """Stages this invocation skipped as finished: their seconds are kept from the summary file's earlier version."""
    preset: str = "default"
    """Preset (only `default`)."""
    config: str = ""
    """TOML or YAML file of settings, applied on top of the preset (command-line flags win)."""
