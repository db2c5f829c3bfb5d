"""Typed configuration of the shared concerns (data, model, optim, train, sampling) and the stages built only from them.

Every field carries a one-line docstring; `tyro` turns these into `--help`. Checks that involve one
concern live in that dataclass's `__post_init__`; checks that need the data (vocabulary size, token
counts) live where the data is opened. Stage-specific configs live with their stage
(`pipeline/distill/config.py`, `pipeline/eval/config.py`, `pipeline/studies/config.py`). Presets are
plain functions in `teachers/` and `students/`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

from pipeline.errors import ConfigError

# Short spellings that scripts outside the project rely on (the "command-line contract").
_DATA_DIR = tyro.conf.arg(aliases=("--data",))


_MAX_STEPS = tyro.conf.arg(aliases=("--max-steps",))


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def positive(obj: object, section: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        require(value > 0, f"{section}.{name} must be > 0, got {value}")


def non_negative(obj: object, section: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        require(value >= 0, f"{section}.{name} must be >= 0, got {value}")


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
    """Tokens per training window (at most model.max_seq_len); distill: 0 takes the teacher's training windows."""
    compact_vocab: Literal["auto", "on", "off"] = "auto"
    """Train on the ids seen in the train split plus one 'other' class; auto: when under half the vocabulary is used."""
    sampling: Literal["random", "epochs", "grid"] = "random"
    """Training windows: random offsets (nanoGPT's), epochs of shuffled non-overlapping windows, or a fixed grid."""

    def __post_init__(self) -> None:
        non_negative(
            self, "data", "seq_len"
        )  # 0 (distill): the teacher's; every other stage: require_windows


PositionKind = Literal["learned", "sinusoidal", "rope", "alibi", "none"]
# A switch written `--model.causal False` (the command-line contract), not tyro's --model.no-causal.
_VALUE_FLAG = tyro.conf.FlagConversionOff


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
    causal: Annotated[bool, _VALUE_FLAG] = True
    """Mask attention to later positions; False: position t sees the future (train loss collapses through leakage). A KV cache attends causally either way."""
    attention: Annotated[bool, _VALUE_FLAG] = True
    """Attention sublayers; False: FFN-only blocks. Same size: ffn_mult + 2 (attention_only: --model.ffn True --model.ffn-mult 2) replaces attention's 4d^2+4d per layer, to within biases and a LayerNorm (4d or d per layer)."""
    mask_value: float | None = None
    """Added to masked attention scores; unset: -inf (exact, fused SDPA); a finite value (--model.mask-value=-1e9) takes explicit matmul attention."""
    score_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Dtype of QK^T, the mask addition and the softmax; auto: the compute dtype (fused SDPA); others: explicit matmul attention."""
    activation: Literal["gelu", "relu"] = "gelu"
    """Nonlinearity of the FFN."""
    sinusoidal_scale: Literal["matched", "unit"] = "matched"
    """positions=sinusoidal: matched multiplies the sin/cos table by init_std*sqrt(2), so each position's RMS is init_std like a learned table's at init; unit: amplitude 1."""

    def __post_init__(self) -> None:
        positive(self, "model", "n_layers", "n_heads", "d_model", "max_seq_len", "ffn_mult")
        non_negative(self, "model", "vocab_size")
        require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.d_model % self.n_heads:
            divisors = [h for h in range(1, min(self.d_model, 64) + 1) if self.d_model % h == 0]
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                f"pick n_heads among {divisors} or change d_model"
            )
        if self.positions == "rope":
            require(
                self.head_dim % 2 == 0,
                f"model.positions=rope needs an even head size, got d_model/n_heads = {self.head_dim}",
            )
        self._check_attention()

    def _check_attention(self) -> None:
        require(
            self.attention or self.use_ffn,
            "model.attention=False leaves blocks with no sublayer: pass --model.ffn True "
            "(with --model.ffn-mult 2 for the parameter count attention had)",
        )
        require(
            self.mask_value is None or self.mask_value < 0,
            f"model.mask_value must be negative, got {self.mask_value}: leave --model.mask-value unset "
            "(-inf, the default) or a large negative number such as --model.mask-value=-1e9",
        )

    @property
    def mask(self) -> float:
        """The value added to masked scores: mask_value, or -inf when unset."""
        return -math.inf if self.mask_value is None else self.mask_value

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
        for name in ("lr", "min_lr", "eps", "grad_clip"):
            value = getattr(self, name)
            flag = f"--optim.{name.replace('_', '-')}"
            require(
                math.isfinite(value),
                f"optim.{name} must be a finite number, got {value}: pass a finite {flag}",
            )
        positive(self, "optim", "lr", "eps")
        non_negative(self, "optim", "min_lr", "warmup_steps", "decay_steps", "weight_decay", "grad_clip")
        require(self.min_lr <= self.lr, f"optim.min_lr={self.min_lr} must not exceed optim.lr={self.lr}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"optim.{name} must be in [0, 1), got {value}")
        for f in dataclasses.fields(self):
            if f.name.startswith("lr_mult_"):
                require(getattr(self, f.name) >= 0, f"optim.{f.name} must be >= 0")

    def lr_mult(self, group: str) -> float:
        return getattr(self, f"lr_mult_{group}")


@dataclass
class ProbeConfig:
    """Per-head attention diagnostics logged at every evaluation (and step 0), rank 0, on the probe batch."""

    scores: bool = True
    """Std and range of the QK^T scores per head, before and after the 1/sqrt(d_head) scaling."""
    entropy_by_context: bool = True
    """Attention entropy by the number of visible keys (power-of-two buckets), and its figure."""
    prev_token: bool = True
    """Share of attention each head puts on the previous token."""
    similarity: bool = True
    """Cosine similarity between the heads' attention maps of each layer (matrix image, max scalar)."""
    maps: bool = True
    """An image per layer of its heads' attention maps over the first map_tokens positions."""
    map_tokens: int = 32
    """Positions shown in the attention-map images."""
    importance: bool = True
    """Val-loss increase when each head alone is ablated (only with more than one head in the model)."""
    importance_tokens: int = 2048
    """Val tokens of the ablation; it costs (layers x heads + 1) forward passes over them per evaluation."""

    def __post_init__(self) -> None:
        positive(self, "train.probe", "map_tokens", "importance_tokens")


@dataclass
class TrainConfig:
    """Batch sizes, budget, precision, evaluation, checkpoints and logging of a training run."""

    micro_batch_size: int = 32
    """Sequences per forward pass on each process; distill: 0 takes the teacher's micro-batch and accumulation."""
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
    amend: tuple[str, ...] = ()
    """Settings a resumed run changes on purpose (dotted, e.g. optim.lr data.dir); recorded in the run's amendments.json."""
    sample_tokens: int = 64
    """Tokens generated for the text sample logged at each evaluation; 0: none."""
    sample_prompt: str = "ROMEO:"
    """Prompt of the logged text samples."""
    projector_tokens: int = 1000
    """Most frequent tokens in TensorBoard's embedding projector (step 0, every evaluation, the end) and the embedding probes; 0: none."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    noise_scale: bool = False
    """Estimate the gradient noise scale B_simple during training (needs grad_accum_steps >= 2; see pipeline/train/noise_scale.py)."""
    dist_timeout: float = 1800.0
    """Seconds a process waits for the others at a collective before the run fails naming the rank (a stalled rank)."""
    nonfinite: Literal["skip", "stop"] = "skip"
    """A non-finite gradient norm: skip the step (stop after max_skipped_steps in a row), or stop at once (nonfinite.json)."""
    max_skipped_steps: int = 10
    """Consecutive skipped steps after which --train.nonfinite skip stops the run."""
    eval_at_start: bool = True
    """Evaluate (and probe) a fresh run at step 0, before its first update: the initial loss beside ln V (not on resume)."""
    clean_train_tokens: int = -1
    """Train tokens (fixed windows) whose eval-mode loss is logged as train_clean_loss at each evaluation; -1: --train.eval-tokens, 0: off."""
    grad_stats: bool = True
    """Per-group gradient RMS, weight norms, update/weight ratios and per-layer gradient norms at each log step."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """Attention and per-head diagnostics at each evaluation (--train.probe.*)."""

    def __post_init__(self) -> None:
        non_negative(self, "train", "micro_batch_size")  # 0 (distill): the teacher's; see require_windows
        positive(self, "train", "grad_accum_steps", "eval_interval", "eval_tokens")
        positive(self, "train", "log_interval", "keep_states", "max_skipped_steps")
        require(
            self.clean_train_tokens >= -1,
            f"train.clean_train_tokens must be -1 (as --train.eval-tokens), 0 (off) or a token count, "
            f"got {self.clean_train_tokens}: set --train.clean-train-tokens",
        )
        require(
            math.isfinite(self.dist_timeout) and self.dist_timeout > 0,
            f"train.dist_timeout must be a finite number of seconds > 0, got {self.dist_timeout}: set --train.dist-timeout",
        )
        non_negative(self, "train", "max_steps", "max_epochs", "max_tokens", "early_stop_patience")
        non_negative(
            self, "train", "histogram_interval", "sample_tokens", "projector_tokens", "stop_at", "threads"
        )
        require(
            self.max_steps or self.max_epochs or self.max_tokens,
            "no training budget: set one of --max-steps N, --train.max-epochs E or --train.max-tokens T",
        )


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
        require(
            0.0 < self.val_fraction < 1.0,
            f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}",
        )
        require(bool(self.input.strip()), "input must name a corpus, e.g. --input tinyshakespeare")
        require(bool(self.encoding.strip()), "encoding must name a tokenizer, e.g. --encoding o200k_base")
        non_negative(self, "tokenize", "num_proc")


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
    init_from: str = ""
    """A transformers GPT-2 folder to initialise from (exercise H6.4); empty: the random init. Recorded in init_from.json."""
    init_parts: Literal["all", "embeddings"] = "all"
    """With init_from: all weights (shapes must match the model config) or only the token and learned position embeddings."""

    def __post_init__(self) -> None:
        require_windows(self.data, self.train)
        require(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
            f"lower --data.seq-len or raise --model.max-seq-len",
        )
        require_lr_mults_apply(self.optim, self.model)


def require_lr_mults_apply(optim: OptimConfig, model: ModelConfig) -> None:
    """A learning-rate multiplier of a part the model does not have would change nothing: refuse it."""
    missing = {
        "head": (model.tie_head, "the head is tied to the token embedding: --optim.lr-mult-tok-emb sets "
                 "both, or untie it with --model.no-tie-head"),
        "pos_emb": (model.positions != "learned", f"positions are {model.positions}, not a learned table"),
    }  # fmt: skip
    for part, (absent, why) in missing.items():
        value = optim.lr_mult(part)
        require(not absent or value == 1.0, f"optim.lr_mult_{part}={value} applies to no parameter: {why}")


def require_windows(data: DataConfig, train: TrainConfig) -> None:
    """Window length and micro-batch set (> 0): only distill reads a 0 as "the teacher's"."""
    for name, value in (("data.seq_len", data.seq_len), ("train.micro_batch_size", train.micro_batch_size)):
        require(
            value > 0,
            f'{name} must be > 0, got {value} (0 means "the teacher\'s" in the distill stage only); '
            f"set --{name.replace('_', '-')}",
        )


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
        non_negative(self, "sampling", "max_new_tokens", "temperature", "top_k")
        positive(self, "sampling", "repetition_penalty", "num_beams")
        require(0.0 < self.top_p <= 1.0, f"sampling.top_p must be in (0, 1], got {self.top_p}")


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
        positive(self, "generate", "num_samples")
