"""Typed configuration: one dataclass per concern, composed per stage.

Every field carries a one-line docstring; `tyro` turns these into `--help`. Checks that involve one
concern live in that dataclass's `__post_init__`; checks that need the data (vocabulary size, token
counts) live where the data is opened. Presets are plain functions in `teachers/` and `students/`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

# Short spellings that scripts outside the project rely on (the "command-line contract").
_DATA_DIR = tyro.conf.arg(aliases=("--data",))
_MAX_STEPS = tyro.conf.arg(aliases=("--max-steps",))


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(obj: object, section: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value > 0, f"{section}.{name} must be > 0, got {value}")


def _non_negative(obj: object, section: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value >= 0, f"{section}.{name} must be >= 0, got {value}")


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Which tokenized data a training stage reads, and how it cuts windows."""

    dir: Annotated[str, _DATA_DIR] = ""
    """Tokenized data folder; empty: data/<corpus>-<encoding>, tokenized on first use."""
    corpus: str = "tinyshakespeare"
    """Corpus tokenized when `dir` is empty and the default folder is missing."""
    encoding: str = "o200k_base"
    """Tokenizer used when `dir` is empty (see recipes/tokenize.py --encoding)."""
    seq_len: int = 256
    """Tokens per training window (at most model.max_seq_len)."""
    compact_vocab: Literal["auto", "on", "off"] = "auto"
    """Train on the ids seen in the train split plus one 'other' class; auto: when under half the vocabulary is used."""
    sampling: Literal["random", "epochs", "grid"] = "random"
    """Training windows: random offsets (nanoGPT's), epochs of shuffled non-overlapping windows, or a fixed grid."""

    def __post_init__(self) -> None:
        _positive(self, "data", "seq_len")


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

PositionKind = Literal["learned", "sinusoidal", "rope", "alibi", "none"]


@dataclass
class ModelConfig:
    """The GPT's shape. `block` picks the style; residual/layernorm/ffn override it one by one."""

    block: Literal["transformer", "attention_only"] = "transformer"
    """transformer: pre-LN residual blocks with a GELU FFN; attention_only: the exercise sheet's model."""
    n_layers: int = 4
    """Number of blocks."""
    n_heads: int = 4
    """Attention heads per block (d_model must be divisible by it)."""
    d_model: int = 256
    """Width of the residual stream."""
    max_seq_len: int = 256
    """Longest context the position table covers (RoPE/ALiBi/sinusoidal extrapolate past it)."""
    vocab_size: int = 0
    """Vocabulary size; 0: taken from the data's meta.json."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and block outputs."""
    positions: PositionKind = "learned"
    """Position encoding: learned absolute, sinusoidal, rope, alibi, or none."""
    tie_head: bool = False
    """Share the LM head's weights with the token embedding."""
    bias: bool = True
    """Biases in the attention and FFN linear layers and LayerNorms."""
    residual: bool | None = None
    """Residual connections around attention and FFN; unset: as the block style says."""
    layernorm: bool | None = None
    """Pre-LayerNorms and a final LayerNorm; unset: as the block style says."""
    ffn: bool | None = None
    """A feed-forward network after attention in each block; unset: as the block style says."""
    ffn_mult: int = 4
    """FFN hidden width as a multiple of d_model."""
    rope_base: float = 10000.0
    """RoPE frequency base."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""

    def __post_init__(self) -> None:
        _positive(self, "model", "n_layers", "n_heads", "d_model", "max_seq_len", "ffn_mult")
        _non_negative(self, "model", "vocab_size")
        _require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.d_model % self.n_heads:
            divisors = [h for h in range(1, min(self.d_model, 64) + 1) if self.d_model % h == 0]
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                f"pick n_heads among {divisors} or change d_model"
            )
        if self.positions == "rope":
            _require(
                self.head_dim % 2 == 0,
                f"model.positions=rope needs an even head size, got d_model/n_heads = {self.head_dim}",
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def _style(self, switch: bool | None) -> bool:
        return self.block == "transformer" if switch is None else switch

    @property
    def use_residual(self) -> bool:
        return self._style(self.residual)

    @property
    def use_layernorm(self) -> bool:
        return self._style(self.layernorm)

    @property
    def use_ffn(self) -> bool:
        return self._style(self.ffn)


# --------------------------------------------------------------------------------------------------
# Optimisation and training
# --------------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    """AdamW with parameter groups, a warmup + decay schedule, and gradient clipping."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay after warmup."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many optimizer steps."""
    decay_steps: int = 0
    """Steps until min_lr is reached; 0: the run's total steps."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (never on biases and norms)."""
    decay_embeddings: bool = False
    """Apply weight decay to the token and position embeddings too."""
    lr_mult_tok_emb: float = 1.0
    """Learning-rate multiplier of the token embedding."""
    lr_mult_pos_emb: float = 1.0
    """Learning-rate multiplier of the learned position table."""
    lr_mult_attention: float = 1.0
    """Learning-rate multiplier of the attention projections."""
    lr_mult_ffn: float = 1.0
    """Learning-rate multiplier of the FFN."""
    lr_mult_norm: float = 1.0
    """Learning-rate multiplier of the LayerNorms."""
    lr_mult_head: float = 1.0
    """Learning-rate multiplier of the LM head."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value once per optimizer step; 0: no clipping."""

    def __post_init__(self) -> None:
        _positive(self, "optim", "lr", "eps")
        _non_negative(self, "optim", "min_lr", "warmup_steps", "decay_steps", "weight_decay", "grad_clip")
        _require(self.min_lr <= self.lr, f"optim.min_lr={self.min_lr} must not exceed optim.lr={self.lr}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"optim.{name} must be in [0, 1), got {value}")
        for f in dataclasses.fields(self):
            if f.name.startswith("lr_mult_"):
                _require(getattr(self, f.name) >= 0, f"optim.{f.name} must be >= 0")

    def lr_mult(self, group: str) -> float:
        return getattr(self, f"lr_mult_{group}")


@dataclass
class TrainConfig:
    """Batch sizes, budget, precision, evaluation, checkpoints and logging of a training run."""

    micro_batch_size: int = 32
    """Sequences per forward pass on each process."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_steps: Annotated[int, _MAX_STEPS] = 0
    """Stop after this many optimizer steps (0: no step limit). The first budget reached stops the run."""
    max_epochs: float = 0.0
    """Stop after this many passes over the train split (0: no epoch limit)."""
    max_tokens: int = 0
    """Stop after this many training tokens (0: no token limit)."""
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Mixed precision; auto: the Accelerate config's setting, else bf16 where the device runs it fast."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~30% more compute)."""
    compile: bool = False
    """torch.compile the model."""
    threads: int = 0
    """CPU threads per process; 0: OMP_NUM_THREADS if you set it, else the cores shared among this machine's processes."""
    attention_kernel: Literal["auto", "sdpa", "matmul"] = "auto"
    """Attention implementation: torch's fused SDPA, or matmuls + softmax; auto: the faster one for device and precision."""
    seed: int = 1337
    """Seed of the weight initialisation, dropout and data order."""
    eval_interval: int = 100
    """Optimizer steps between evaluations (and resumable states)."""
    eval_tokens: int = 32768
    """Validation tokens per evaluation (a fixed set of windows)."""
    early_stop_patience: int = 0
    """Stop when val loss has not improved for this many evaluations; 0: never."""
    early_stop_min_delta: float = 0.0
    """Smallest val-loss decrease that counts as an improvement."""
    log_interval: int = 10
    """Optimizer steps between train-loss logs (the only host syncs of the loop)."""
    histogram_interval: int = 0
    """Optimizer steps between weight/gradient histograms; 0: at every evaluation."""
    keep_states: int = 2
    """Resumable states kept in the run folder (older ones are deleted)."""
    resume: str = ""
    """'auto': continue the latest resumable state (of --out, else the latest run of this preset); or a state folder."""
    stop_at: int = 0
    """Stop after this step with a resumable state, as if interrupted (the schedule still spans the budget); 0: off."""
    sample_tokens: int = 64
    """Tokens generated for the text sample logged at each evaluation; 0: none."""
    sample_prompt: str = "ROMEO:"
    """Prompt of the logged text samples."""
    projector_tokens: int = 1000
    """Most frequent tokens written to TensorBoard's embedding projector at the end; 0: none."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    noise_scale: bool = False
    """Estimate the gradient noise scale B_simple during training (needs grad_accum_steps >= 2; see pipeline/noise_scale.py)."""

    def __post_init__(self) -> None:
        _positive(self, "train", "micro_batch_size", "grad_accum_steps", "eval_interval", "eval_tokens")
        _positive(self, "train", "log_interval", "keep_states")
        _non_negative(self, "train", "max_steps", "max_epochs", "max_tokens", "early_stop_patience")
        _non_negative(
            self, "train", "histogram_interval", "sample_tokens", "projector_tokens", "stop_at", "threads"
        )
        _require(
            self.max_steps or self.max_epochs or self.max_tokens,
            "no training budget: set one of --max-steps N, --train.max-epochs E or --train.max-tokens T",
        )


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenizeConfig:
    """The tokenize stage: corpus in, train.bin / val.bin / meta.json out."""

    input: str = "tinyshakespeare"
    """Corpus: 'tinyshakespeare', a UTF-8 text file, a folder, a glob, or hf:NAME (a Hugging Face dataset)."""
    encoding: str = "o200k_base"
    """Tokenizer: a tiktoken encoding name, a local .tiktoken file, or 'char' (character vocabulary)."""
    out: str = ""
    """Output folder; empty: data/<corpus>-<encoding>."""
    overwrite: bool = False
    """Replace an existing tokenization made with other settings."""
    val_fraction: float = 0.1
    """Share held out for validation: the last characters of one document, or a seeded share of documents."""
    split_seed: int = 0
    """Seed of the document-level train/val split of multi-document corpora."""
    hf_config: str = ""
    """Hugging Face dataset configuration name (hf: inputs)."""
    hf_split: str = "train"
    """Hugging Face split that holds the training documents (hf: inputs)."""
    hf_val_split: str = ""
    """Hugging Face split used for validation; empty: hold out val_fraction of the documents (hf: inputs)."""
    hf_data_files: tuple[str, ...] = ()
    """data_files for generic builders (hf:json, hf:text, hf:parquet): FILE ... or SPLIT=FILE ...."""
    text_column: str = "text"
    """Column holding the text (hf: inputs)."""
    streaming: bool = False
    """Stream the Hugging Face dataset instead of downloading it whole (large corpora)."""
    pattern_from: str = "cl100k_base"
    """For a custom .tiktoken file: the encoding whose split regex and special tokens it uses."""
    num_proc: int = 0
    """Worker threads/processes for large corpora; 0: all cores."""
    preset: str = "shakespeare"
    """Preset: tokenize the data a teacher preset trains on (see teachers/)."""
    config: str = ""
    """TOML or YAML file of settings, applied on top of the preset (command-line flags win)."""

    def __post_init__(self) -> None:
        _require(
            0.0 < self.val_fraction < 1.0,
            f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}",
        )
        _require(bool(self.input.strip()), "input must name a corpus, e.g. --input tinyshakespeare")
        _require(bool(self.encoding.strip()), "encoding must name a tokenizer, e.g. --encoding o200k_base")
        _non_negative(self, "tokenize", "num_proc")


@dataclass
class BenchmarkConfig:
    """The benchmark: naive reference vs the pipeline, full vs compacted vocabulary, training and generation."""

    data: DataConfig = field(default_factory=DataConfig)
    """Tokenized data (windows come from its train split; the compact vocabulary from its counts)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape (from the preset)."""
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
    case_seconds: float = 90.0
    """No further timed repetition of a case starts once its timed ones took this long (at least one runs); 0: all --repeats."""
    gen_tokens: int = 256
    """New tokens per generation measurement (batch 1); 0: skip generation."""
    max_mem_gib: float = 0.0
    """Memory a CPU case may take before it counts as not fitting; 0: available memory minus 1 GiB."""
    threads: int = 0
    """CPU threads per case; 0: torch's default (all cores)."""
    compile: bool = False
    """Also torch.compile the pipeline model."""
    out: str = ""
    """Output folder; empty: runs/benchmark/<preset>-<time>."""
    preset: str = "seed"
    """Teacher preset whose model, data and batch size are measured (see teachers/)."""
    config: str = ""
    """TOML or YAML file of settings, applied on top of the preset (command-line flags win)."""

    def __post_init__(self) -> None:
        _positive(self, "benchmark", "batch", "repeats")
        _non_negative(self, "benchmark", "warmup", "gen_tokens", "max_mem_gib", "threads", "case_seconds")
        _require(
            bool(self.impls) and bool(self.vocabs), "benchmark.impls and benchmark.vocabs must not be empty"
        )
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )


@dataclass
class PretrainConfig:
    """Pretrain a teacher: the pretrain stage's whole configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    """Tokenized data."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1000))
    """Training loop."""
    out: str = ""
    """Run folder; empty: runs/pretrain/<preset>-<time>."""
    preset: str = "shakespeare"
    """Teacher preset the defaults come from (see teachers/)."""
    config: str = ""
    """TOML or YAML file of settings, applied on top of the preset (command-line flags win)."""

    def __post_init__(self) -> None:
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
            f"lower --data.seq-len or raise --model.max-seq-len",
        )


# --------------------------------------------------------------------------------------------------
# Generation and evaluation
# --------------------------------------------------------------------------------------------------


@dataclass
class SamplingConfig:
    """How each next token is picked: greedy, temperature, top-k, top-p, or beam search."""

    max_new_tokens: int = 64
    """Tokens generated after the prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0: greedy (always the most likely token)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0: no limit (1 is greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the fewest tokens holding this much probability; 1: off."""
    repetition_penalty: float = 1.0
    """Divide the positive logits (multiply the negative ones) of tokens already in the context; 1: off."""
    num_beams: int = 1
    """Beam search with this many beams (deterministic: temperature, top-k and top-p are ignored); 1: off."""
    length_penalty: float = 1.0
    """Beam search ranks finished beams by log-probability / generated_length ** length_penalty."""
    use_cache: bool = True
    """Keep the keys and values of past tokens (KV cache) instead of recomputing the context every step."""

    def __post_init__(self) -> None:
        _non_negative(self, "sampling", "max_new_tokens", "temperature", "top_k")
        _positive(self, "sampling", "repetition_penalty", "num_beams")
        _require(0.0 < self.top_p <= 1.0, f"sampling.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerateConfig:
    """Continue a prompt with an exported model: recipes/generate.py."""

    model: str = ""
    """Exported model folder, or a run folder (its best/ export is used)."""
    prompt: str = "ROMEO:"
    """Text to continue; backslash escapes such as \\n are understood. Empty: start from a newline."""
    num_samples: int = 1
    """Continuations generated, as one batch."""
    seed: int = 1337
    """Seed of the sampler (the same seed gives the same text)."""
    stop: tuple[str, ...] = ()
    """Stop a continuation at the first of these strings (escapes understood); the text is cut before it."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.8, top_k=200))
    """How each next token is picked."""
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Mixed precision; auto: bf16 where the device runs it fast, else fp32."""
    show_prompt: bool = True
    """Print the prompt before each continuation."""
    preset: str = "default"
    """Sampler preset: default, greedy, nucleus or beam (see recipes/generate.py)."""
    config: str = ""
    """TOML or YAML file of settings, applied on top of the preset (command-line flags win)."""

    def __post_init__(self) -> None:
        _positive(self, "generate", "num_samples")


@dataclass
class EvaluateConfig:
    """Compare exported models: teacher-forced metrics, compounding errors, degeneration, attention."""

    models: tuple[str, ...] = ()
    """Exported models (or run folders: their best/) to compare, all of one tokenizer and vocabulary map."""
    names: tuple[str, ...] = ()
    """Display names, one per model; empty: from the folder names."""
    teacher: str = ""
    """Judge for the teacher-as-judge metrics; empty: the first of --models when its export is a teacher and other models follow."""
    data: str = ""
    """Tokenized data folder whose val split is measured; empty: the one the first model was trained on."""
    out: str = ""
    """Run folder; empty: runs/evaluate/<first model>-<time>."""
    overwrite: bool = False
    """Replace an evaluation already in --out."""
    prompts: int = 200
    """M: prompts drawn from the val split (fixed seed)."""
    prompt_tokens: int = 64
    """P: tokens per prompt."""
    new_tokens: int = 64
    """N: tokens generated per prompt and compared with the true continuation."""
    seed: int = 0
    """Seed of the prompt positions, the sampled rollouts and the bootstrap."""
    sampled: bool = True
    """Also measure sampled rollouts (greedy ones always are)."""
    temperature: float = 1.0
    """Temperature of the sampled rollouts."""
    top_k: int = 0
    """Top-k of the sampled rollouts; 0: off."""
    top_p: float = 1.0
    """Top-p of the sampled rollouts; 1: off."""
    gap_horizon: int = 8
    """Reference tokens scored after each prefix length j in the exposure-bias gap."""
    bootstrap: int = 1000
    """Bootstrap resamples over prompts for the 95% confidence intervals."""
    eval_tokens: int = 65536
    """Val tokens for the teacher-forced metrics (a fixed set of windows)."""
    seq_len: int = 0
    """Window of the teacher-forced metrics; 0: the smallest max_seq_len among the models."""
    batch_size: int = 32
    """Sequences per forward pass."""
    attention_windows: int = 8
    """Val windows for the attention entropy and the average attention maps."""
    map_tokens: int = 32
    """Positions shown in the average attention maps."""
    collapse_threshold: float = 0.9
    """Flag a head as collapsed when its mean max attention probability exceeds this."""
    samples: int = 3
    """Prompts whose continuations are shown as text in the report."""
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Mixed precision; auto: the Accelerate config's setting, else bf16 where the device runs it fast."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    preset: str = "default"
    """Preset: default or quick (see recipes/evaluate.py)."""
    config: str = ""
    """TOML or YAML file of settings, applied on top of the preset (command-line flags win)."""

    def __post_init__(self) -> None:
        _positive(self, "evaluate", "prompts", "prompt_tokens", "new_tokens", "gap_horizon", "bootstrap")
        _positive(
            self, "evaluate", "eval_tokens", "batch_size", "attention_windows", "map_tokens", "temperature"
        )
        _non_negative(self, "evaluate", "top_k", "seq_len", "samples")
        _require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _require(
            0.0 < self.collapse_threshold <= 1.0,
            f"collapse_threshold must be in (0, 1], got {self.collapse_threshold}",
        )
        _require(
            self.gap_horizon <= self.new_tokens,
            f"gap_horizon={self.gap_horizon} exceeds new_tokens={self.new_tokens}; lower --gap-horizon",
        )
        _require(
            not self.names or len(self.names) == len(self.models),
            f"--names gives {len(self.names)} names for {len(self.models)} models; give one per model or none",
        )


# --------------------------------------------------------------------------------------------------
# Studies: batch-size scaling and the learning-rate range test
# --------------------------------------------------------------------------------------------------


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
        _require(
            bool(self.batch_sizes), "--batch-sizes needs at least one batch size, e.g. --batch-sizes 8 16 32"
        )
        _require(
            all(b > 0 for b in self.batch_sizes) and len(set(self.batch_sizes)) == len(self.batch_sizes),
            f"--batch-sizes must be distinct positive numbers of sequences, got {list(self.batch_sizes)}",
        )
        _require(
            not (self.max_steps and self.max_tokens),
            "set one budget for every run, not both: --max-steps N or --max-tokens T (the same tokens per run)",
        )
        _non_negative(
            self, "scaling", "micro_batch_size", "max_steps", "max_tokens", "target_loss", "base_lr"
        )
        _non_negative(self, "scaling", "reference_batch_size", "seed")
        _positive(self, "scaling", "evals", "parallel")
        _require(
            (self.stage == "distill") == bool(self.teacher),
            "--stage distill needs --teacher EXPORT_DIR, and --teacher only applies to --stage distill",
        )
        _require(
            not self.gpu_ids or len(self.gpu_ids) == self.parallel,
            f"--gpu-ids gives {len(self.gpu_ids)} slots but --parallel is {self.parallel}: give one entry per slot",
        )


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
        _positive(self, "lr_find", "start_lr", "end_lr")
        _require(
            self.start_lr < self.end_lr,
            f"--start-lr {self.start_lr} must be below --end-lr {self.end_lr}",
        )
        _require(0.0 <= self.smoothing < 1.0, f"--smoothing must be in [0, 1), got {self.smoothing}")
        _require(
            self.diverge > 1.0, f"--diverge must be > 1 (a multiple of the lowest loss), got {self.diverge}"
        )
        _require(
            self.train.max_steps >= 10,
            f"--max-steps {self.train.max_steps}: the range test needs at least 10 learning rates",
        )
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
            f"lower --data.seq-len or raise --model.max-seq-len",
        )

    @classmethod
    def from_pretrain(cls, cfg: PretrainConfig, steps: int = 100) -> LRFindConfig:
        """The range test of a teacher preset: its data, model, optimizer and batch; `steps` LRs."""
        train = dataclasses.replace(cfg.train, max_steps=steps, max_epochs=0.0, max_tokens=0)
        return cls(data=cfg.data, model=cfg.model, optim=cfg.optim, train=train, preset=cfg.preset)


# --------------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------------

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

    def __post_init__(self) -> None:
        _non_negative(self, "student", "n_layers", "d_model", "ffn_mult")
        _positive(self, "student", "n_heads", "importance_tokens")
        _require(
            self.dropout is None or 0.0 <= self.dropout < 1.0,
            f"student.dropout must be in [0, 1), got {self.dropout}",
        )
        _require(
            self.init not in ("best_head", "merged_heads") or self.n_heads == 1,
            f"student.init={self.init} maps teacher heads into one student head; "
            f"use --student.n-heads 1 or --student.init copy",
        )


@dataclass
class KDConfig:
    """The distillation loss: alpha * CE(labels) + (1 - alpha) * T^2 * soft(teacher, student) per token."""

    alpha: float = 0.5
    """Weight of the hard-label cross-entropy; the soft loss gets 1 - alpha (1: no teacher, a scratch run)."""
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

    def __post_init__(self) -> None:
        _require(0.0 <= self.alpha <= 1.0, f"kd.alpha must be in [0, 1], got {self.alpha}")
        _require(0.0 <= self.beta <= 1.0, f"kd.beta must be in [0, 1], got {self.beta}")
        _positive(self, "kd", "temperature", "top_k")
        _non_negative(self, "kd", "attention_weight")
        _require(
            not (self.cache and self.attention_weight > 0),
            "kd.attention_weight needs the live teacher's attention, which the cache does not hold; "
            "drop --kd.cache or set --kd.attention-weight 0",
        )


@dataclass
class OnPolicyConfig:
    """On-policy distillation (GKD): some batches are the student's own generations, scored by the teacher."""

    fraction: float = 0.0
    """Share lambda of micro-batches whose continuations the student samples itself; 0: off."""
    prompt_len: int = 16
    """Tokens of a training window kept as the prompt; the student generates the rest of the window."""
    temperature: float = 1.0
    """Sampling temperature of the student's generations (0: greedy)."""

    def __post_init__(self) -> None:
        _require(0.0 <= self.fraction <= 1.0, f"on_policy.fraction must be in [0, 1], got {self.fraction}")
        _positive(self, "on_policy", "prompt_len")
        _non_negative(self, "on_policy", "temperature")


@dataclass
class DistillConfig:
    """Distill a teacher export into a student: the distill stage's whole configuration.

    The student always uses the teacher's tokenizer and vocabulary map (data.compact_vocab is not
    used); the data folder must be tokenized with the teacher's tokenizer.
    """

    teacher: str = ""
    """Teacher export folder (a run's best/ or last/, or a run folder); empty: the latest `shakespeare` teacher."""
    data: DataConfig = field(default_factory=DataConfig)
    """Tokenized data; an empty dir means the teacher's data folder."""
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
        _require(
            self.on_policy.fraction == 0 or self.on_policy.prompt_len < self.data.seq_len,
            f"on_policy.prompt_len={self.on_policy.prompt_len} leaves nothing to generate in windows of "
            f"data.seq_len={self.data.seq_len}; lower --on-policy.prompt-len",
        )
        scratch = self.kd.alpha == 1.0
        _require(
            not scratch
            or (self.on_policy.fraction == 0 and not self.kd.cache and self.kd.attention_weight == 0),
            "kd.alpha=1 trains on the labels alone (a scratch run): set --on-policy.fraction 0, "
            "--kd.attention-weight 0 and drop --kd.cache, or lower --kd.alpha",
        )
