"""The memory account of one training step: analytic bytes of weights, optimizer state, attention, logits, activations.

Pure arithmetic on a ModelConfig (exercises H1.1, H1.3, H1.4, H10.3): no tensors, no devices. Each
row is one term with its byte count, its formula (B batch, T seq_len, C d_model, H heads, L layers,
F FFN width, V output classes, P parameters) and its factor when T, d_model or n_heads doubles.
Activations are counted from what this code's autograd graph keeps (checked against
torch.autograd.graph.saved_tensors_hooks in tests/test_memory.py). The total adds every counted
term: an upper bound on the peak, since the attention's and the loss's transients never coexist and
gradients fill in during the backward pass while activations are freed. Per process, unsharded.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError

DTYPE_BYTES = {"no": 4, "fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZER_MOMENTS = {"adamw": 2, "sgd": 0}  # fp32 tensors the optimizer keeps per parameter
KERNELS = ("sdpa", "matmul")
SCALED = ("T", "d_model", "n_heads")
SYMBOLS = (
    "B batch, T seq_len, C d_model, H heads, D head size, L layers, F FFN width, V classes, P parameters"
)


@dataclass(frozen=True)
class MemoryRow:
    """One term of the account."""

    name: str
    bytes: int
    formula: str
    counted: bool  # part of the total on this path (e.g. full logits are not, with a chunked loss)
    note: str
    scales: dict[str, float | None] = field(default_factory=dict)  # factor when T / d_model / n_heads doubles


@dataclass(frozen=True)
class MemoryAccount:
    """The rows, the activations' breakdown, and the shape they were computed for."""

    rows: tuple[MemoryRow, ...]
    activations: tuple[tuple[str, int], ...]  # (what, bytes) of the `activations` row
    shape: dict[str, Any]
    total_scales: dict[str, float | None] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(r.bytes for r in self.rows if r.counted)

    def row(self, name: str) -> MemoryRow:
        return next(r for r in self.rows if r.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "symbols": SYMBOLS,
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "activations": dict(self.activations),
            "total_bytes": self.total,
            "total_scales": self.total_scales,
            "total_note": "sum of the counted rows: an upper bound on the peak (see pipeline/model/memory.py)",
        }


@dataclass(frozen=True)
class _Step:
    """What one account is computed for (the arguments of memory_account, checked)."""

    cfg: ModelConfig
    batch: int
    seq_len: int
    a: int  # compute dtype bytes
    s: int  # attention score dtype bytes
    chunk_rows: int
    checkpointing: bool
    moments: int
    materialised: bool  # the (B, H, T, T) scores and probabilities exist (explicit matmul attention)

    @property
    def mixed(self) -> bool:
        return self.a != 4


def memory_account(
    cfg: ModelConfig,
    batch: int,
    seq_len: int,
    *,
    precision: str = "no",
    chunk_rows: int = 0,
    checkpointing: bool = False,
    optimizer: str = "adamw",
    attention_kernel: str = "sdpa",
) -> MemoryAccount:
    """The account of one training step of `batch` sequences of `seq_len` tokens.

    precision: Accelerate's mixed_precision ('no', 'bf16', 'fp16'); chunk_rows: rows of logits the
    fused loss computes at a time (pipeline.train.losses.chunk_rows), 0: the full logits at once
    (the textbook loss); attention_kernel: 'sdpa' (fused, no (T, T) tensors) or 'matmul' (explicit;
    a score_dtype or finite mask_value forces it, as in the model).
    """
    step = _step(cfg, batch, seq_len, precision, chunk_rows, checkpointing, optimizer, attention_kernel)
    rows, parts = _rows(step)
    variants = {name: _doubled(step, name) for name in SCALED}
    computed = {name: _rows(v)[0] if v is not None else None for name, v in variants.items()}
    scaled_rows = []
    for i, r in enumerate(rows):
        scales = {n: _factor(r.bytes, c[i].bytes) if c else None for n, c in computed.items()}
        scaled_rows.append(dataclasses.replace(r, scales=scales))
    base_total = sum(r.bytes for r in rows if r.counted)
    total_scales = {
        n: _factor(base_total, sum(r.bytes for r in c if r.counted)) if c else None
        for n, c in computed.items()
    }
    shape = {
        "B": batch, "T": seq_len, "C": cfg.d_model, "H": cfg.n_heads, "L": cfg.n_layers, "V": cfg.vocab_size,
        "P": parameter_count(cfg), "precision": precision, "compute_bytes": step.a, "score_bytes": step.s,
        "attention": "materialised (matmul)" if step.materialised else "fused (sdpa)",
        "chunk_rows": chunk_rows, "checkpointing": checkpointing, "optimizer": optimizer,
    }  # fmt: skip
    return MemoryAccount(tuple(scaled_rows), tuple(parts), shape, total_scales)


def _step(cfg, batch, seq_len, precision, chunk_rows, checkpointing, optimizer, kernel) -> _Step:
    if cfg.vocab_size <= 0:
        raise ConfigError(
            "the memory account needs the vocabulary size: pass --model.vocab-size N or data with a meta.json"
        )
    if precision not in DTYPE_BYTES or optimizer not in OPTIMIZER_MOMENTS or kernel not in KERNELS:
        raise ValueError(
            f"precision {precision!r} (one of {list(DTYPE_BYTES)}), optimizer {optimizer!r} "
            f"(one of {list(OPTIMIZER_MOMENTS)}), attention kernel {kernel!r} (one of {list(KERNELS)})"
        )
    if batch <= 0 or seq_len <= 0 or chunk_rows < 0:
        raise ValueError(f"batch {batch} and seq_len {seq_len} must be > 0, chunk_rows {chunk_rows} >= 0")
    a = DTYPE_BYTES[precision]
    score = getattr(cfg, "score_dtype", "auto")
    explicit = score != "auto" or cfg.mask != float("-inf")
    return _Step(
        cfg, batch, seq_len, a, _score_bytes(cfg, a, precision, score), chunk_rows, checkpointing,
        OPTIMIZER_MOMENTS[optimizer], kernel == "matmul" or explicit,
    )  # fmt: skip


def _score_bytes(cfg: ModelConfig, a: int, precision: str, score: str) -> int:
    """Bytes per softmax element. Under autocast QK^T runs in the compute dtype whatever score_dtype
    says (autocast recasts matmul operands); adding the mask in score_dtype then promotes the scores."""
    if score == "auto" or score == precision:
        return a
    if precision == "no":
        return DTYPE_BYTES[score]
    masked = getattr(cfg, "causal", True) or cfg.positions == "alibi"
    return 4 if masked else a  # bf16 + fp32, or bf16 + fp16, promote to fp32


def _doubled(step: _Step, name: str) -> _Step | None:
    """The same step with T, d_model or n_heads doubled; None when the config cannot have it."""
    cfg = step.cfg
    try:
        if name == "T":
            longer = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, 2 * step.seq_len))
            return dataclasses.replace(step, cfg=longer, seq_len=2 * step.seq_len)
        changed = {"d_model": cfg.d_model * 2} if name == "d_model" else {"n_heads": cfg.n_heads * 2}
        return dataclasses.replace(step, cfg=dataclasses.replace(cfg, **changed))
    except ConfigError:  # e.g. d_model not divisible by the doubled heads
        return None


def _factor(old: int, new: int) -> float:
    return new / old if old else (1.0 if new == 0 else float("inf"))


def model_account(model: Any, batch: int, seq_len: int, precision: str, chunk_rows: int) -> MemoryAccount:
    """The account of a built GPT as it will train: its config, checkpointing switch and attention kernel."""
    kernels = [b.attn.kernel for b in model.blocks if getattr(b, "attn", None) is not None]
    return memory_account(
        model.cfg, batch, seq_len, precision=precision, chunk_rows=chunk_rows,
        checkpointing=bool(model.activation_checkpointing), attention_kernel=kernels[0] if kernels else "sdpa",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


def parameter_count(cfg: ModelConfig) -> int:
    """GPT(cfg)'s parameter count, from the shape alone."""
    return sum(_parameters(cfg).values())


def _parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by kind: embeddings, block Linear weights, biases and norms, the untied head."""
    C, V, F = cfg.d_model, cfg.vocab_size, cfg.ffn_mult * cfg.d_model
    bias, ln = int(cfg.bias), cfg.use_layernorm
    attention = getattr(cfg, "attention", True)
    linear = small = 0
    for _ in range(cfg.n_layers):
        if attention:
            linear += 4 * C * C
            small += bias * 4 * C + (ln * C * (1 + bias))
        if cfg.use_ffn:
            linear += 2 * C * F
            small += bias * (F + C) + (ln * C * (1 + bias))
    small += ln * C * (1 + bias)  # the final LayerNorm
    positions = cfg.max_seq_len * C if cfg.positions == "learned" else 0
    return {
        "embeddings": V * C + positions,
        "linear": linear,
        "small": small,
        "head": 0 if cfg.tie_head else V * C,
    }


# --------------------------------------------------------------------------------------------------
# The rows
# --------------------------------------------------------------------------------------------------


def _rows(step: _Step) -> tuple[list[MemoryRow], list[tuple[str, int]]]:
    cfg, a, s = step.cfg, step.a, step.s
    B, T, H, L = step.batch, step.seq_len, cfg.n_heads, cfg.n_layers
    P = parameter_count(cfg)
    attention = getattr(cfg, "attention", True)
    scores = B * H * T * T * s if attention else 0
    kept_layers = 1 if step.checkpointing else L
    on_attention = step.materialised and attention
    fused_note = "" if step.materialised else "; not materialised: fused SDPA works in tiles"
    parts, tally = _activations(step)
    mixed = "mixed precision: " if step.mixed else ""
    rows = [
        MemoryRow("weights", P * 4, "P*4", True, f"{mixed}fp32 weights (Accelerate keeps fp32 masters and casts per op)"),
        MemoryRow("gradients", P * 4, "P*4", True, "fp32, one per weight"),
        MemoryRow(
            "optimizer", step.moments * P * 4, f"{step.moments}*P*4", True,
            "AdamW: exp_avg and exp_avg_sq, fp32" if step.moments == 2 else "no optimizer state",
        ),
        MemoryRow(
            "weight_casts", _parameters(cfg)["linear"] * a if step.mixed else 0, f"P_linear*{a}", step.mixed,
            "block Linear weights in the compute dtype: autocast's cache, saved for backward"
            if step.mixed else "none in fp32",
        ),
        MemoryRow("attention_scores", scores, f"B*H*T^2*{s}", on_attention,
                  f"QK^T of one layer (B, H, T, T): transient; its gradient in backward{fused_note}"),
        MemoryRow("attention_probs", kept_layers * scores, f"{'' if step.checkpointing else 'L*'}B*H*T^2*{s}",
                  on_attention, f"softmax output saved for backward, {'one recomputed layer' if step.checkpointing else 'every layer'}{fused_note}"),
        *_logit_rows(step),
        MemoryRow("activations", sum(b for _, b in parts), _formula(tally), True,
                  "other tensors saved for backward" + (": block inputs + one recomputed block" if step.checkpointing else "")),
    ]  # fmt: skip
    return rows, parts


GRAD_W_TILE = 16384
"""Head rows per tile of the fused loss's head gradient in a lower compute dtype (pipeline/train/losses.py
uses it and HEAD_TILE; they live here, the lower layer, so the account and the loss share one value)."""

HEAD_TILE = 1024
"""Classes per tile of the fused loss's fp32 matmuls with the head on a CPU (no buffer of its own)."""


def _logit_rows(step: _Step) -> list[MemoryRow]:
    cfg, a = step.cfg, step.a
    N, V, C = step.batch * step.seq_len, cfg.vocab_size, cfg.d_model
    full, chunked = step.chunk_rows == 0, step.chunk_rows > 0
    rows = min(step.chunk_rows, N) if chunked else 0
    chunks = 1  # the loss drops each chunk's logits before the next chunk's exist
    hidden = 4 if cfg.use_layernorm else a  # the final LayerNorm's output is fp32 under autocast
    if chunked:
        tile = min(V, GRAD_W_TILE)
        buffers = N * C * hidden + (2 * N * C * a + V * C * a + tile * C * (a + 4) if step.mixed else 0)
        formula = f"B*T*C*{hidden}" + (f" + 2*B*T*C*{a} + V*C*{a} + {tile}*C*{a + 4}" if step.mixed else "")
        note = "fused loss: hidden-state gradient" + (
            f"; hidden cast, head cast, and a {tile}-row tile of a chunk's head gradient in the compute"
            " dtype and in fp32 (added to the fp32 head gradient)"
            if step.mixed
            else ""
        )
    else:
        buffers, formula, note = (
            N * C * a,
            f"B*T*C*{a}",
            "textbook loss: the head's input saved by its Linear",
        )
    return [
        MemoryRow("logits_full", N * V * 4, "B*T*V*4", full, "(B*T, V) fp32 logits of the textbook loss"),
        MemoryRow("logits_full_loss", 2 * N * V * 4, "2*B*T*V*4", full,
                  "textbook loss: log-softmax saved by cross_entropy + the logits' gradient"),
        MemoryRow("logits_chunk", chunks * rows * V * a, f"{'2*' if chunks == 2 else ''}rows*V*{a}", chunked,
                  f"fused loss: rows={step.chunk_rows} of logits at a time (pipeline/train/losses.py)"),
        MemoryRow("loss_buffers", buffers, formula, True, note),
    ]  # fmt: skip


def _formula(tally: Counter) -> str:
    """B*T*(bytes per token by symbol) + T*(bytes per position); tally keys 'T*...' are per position."""

    def term(c: int, symbol: str) -> str:
        return str(c) if symbol in ("", "1") else f"{c}*{symbol}"

    per_token = " + ".join(term(c, k) for k, c in tally.items() if c and not k.startswith("T*"))
    per_pos = " + ".join(term(c, k[2:]) for k, c in tally.items() if c and k.startswith("T*"))
    return f"B*T*({per_token})" + (f" + T*({per_pos})" if per_pos else "")


# --------------------------------------------------------------------------------------------------
# Activations saved for backward
# --------------------------------------------------------------------------------------------------


def _activations(step: _Step) -> tuple[list[tuple[str, int]], Counter]:
    """(what, bytes) of the tensors autograd keeps besides the attention probabilities and the loss's.

    Each block's terms come from `_block`, as (what, symbol, bytes per token per symbol unit).
    With checkpointing every block keeps only its input, and one block is recomputed at a time.
    """
    cfg = step.cfg
    B, T, C, H = step.batch, step.seq_len, cfg.d_model, cfg.n_heads
    unit = {"C": C, "F": cfg.ffn_mult * C, "H": H, "H*T": H * T, "1": 1}
    terms: list[tuple[str, str, int]] = [("token ids (int64)", "1", 8)]
    blocks = [_block(step, i) for i in range(cfg.n_layers)]
    if step.checkpointing:
        inputs = [
            ("block inputs (kept by checkpoint)", "C", _stream_in(step, i)) for i in range(cfg.n_layers)
        ]
        recomputed = max(blocks, key=lambda b: sum(unit[k] * n for _, k, n in b[1]))
        terms += inputs + [(f"recomputed block: {w}", k, n) for w, k, n in recomputed[1]]
    else:
        terms += [t for b in blocks for t in (*b[0], *b[1])]
    if cfg.use_layernorm:
        out = 4 if cfg.use_residual else step.a
        terms += [("final LayerNorm input", "C", out), ("LayerNorm mean and 1/std", "1", 8)]
    bytes_by_what: dict[str, int] = {}
    tally: Counter = Counter()
    for what, sym, n in terms:
        bytes_by_what[what] = bytes_by_what.get(what, 0) + B * T * unit[sym] * n
        tally[sym] += n
    for what, sym, n in _per_position(step):
        bytes_by_what[what] = bytes_by_what.get(what, 0) + T * n * (C // H if sym == "D" else 1)
        tally["T*" + ("D" if sym == "D" else "")] += n
    return list(bytes_by_what.items()), tally


def _per_position(step: _Step) -> list[tuple[str, str, int]]:
    cfg = step.cfg
    out = [("position ids (int64)", "1", 8)] if cfg.positions == "learned" else []
    if cfg.positions == "rope" and getattr(cfg, "attention", True):
        out.append(("RoPE cos and sin tables (fp32)", "D", 4))
    return out


def _stream_in(step: _Step, layer: int) -> int:
    """Bytes per element of block `layer`'s input: fp32 embeddings or residual stream, else the compute dtype."""
    return 4 if layer == 0 or step.cfg.use_residual else step.a


def _block(step: _Step, layer: int) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]:
    """(the block input as saved, the block's other saved tensors) as (what, symbol, bytes per token)."""
    cfg, a = step.cfg, step.a
    ln, res = cfg.use_layernorm, cfg.use_residual
    x_in = _stream_in(step, layer)
    head: list[tuple[str, str, int]] = []
    inner: list[tuple[str, str, int]] = []
    attention = getattr(cfg, "attention", True)
    if attention:
        if ln:
            head.append(("block input (LayerNorm input)", "C", x_in))
            inner += [("LayerNorm mean and 1/std", "1", 8), ("LayerNorm output (qkv input)", "C", a)]
        else:
            (head if x_in == a else inner).append(("block input (qkv input)", "C", a))
        inner += _attention(step)
    if cfg.use_ffn:
        mid = (4 if res else a) if attention else x_in
        if ln:
            where = inner if attention else head
            where.append(("FFN LayerNorm input" if attention else "block input (LayerNorm input)", "C", mid))
            inner += [("LayerNorm mean and 1/std", "1", 8), ("LayerNorm output (fc input)", "C", a)]
        else:
            (head if not attention and x_in == a else inner).append(("fc input", "C", a))
        if getattr(cfg, "activation", "gelu") != "relu":  # GELU keeps its input; ReLU only its output
            inner.append(("FFN hidden before the activation", "F", a))
        inner.append(("FFN hidden after the activation (fc2 input)", "F", a))
    if cfg.dropout > 0:  # one mask per nn.Dropout (the CPU's in the tensor's dtype); approximate
        inner.append(("dropout masks", "C", (int(attention) + int(cfg.use_ffn)) * a))
    return head, inner


def _attention(step: _Step) -> list[tuple[str, str, int]]:
    """Saved tensors of one attention sublayer besides its input and its (B, H, T, T) probabilities."""
    cfg, a, s = step.cfg, step.a, step.s
    rope = cfg.positions == "rope"
    if not step.materialised:  # SDPA keeps q, k, v, its output and the logsumexp (B, H, T) fp32
        out = [("q, k, v (qkv output)", "C", 3 * a), ("attention logsumexp (fp32)", "H", 4)]
        if rope:  # rotated q, k are new tensors, and SDPA's output then needs its own copy
            out += [("rotated q, k", "C", 2 * a), ("attention output (SDPA's)", "C", a)]
    else:  # matmul: q, k (in the score dtype) and v as bmm operands; probabilities cast for @ V
        qk = a if step.mixed else s  # autocast recasts the matmul's operands to the compute dtype
        out = [("q, k (bmm operands)", "C", 2 * qk), ("v (bmm operand)", "C", a)]
        if s != a:
            out.append(("probabilities cast for @ V", "H*T", a))
        if cfg.dropout > 0:
            out.append(("attention dropout (mask and dropped probabilities)", "H*T", 2 * s))
    return [*out, ("attention output, heads merged (proj input)", "C", a)]


# --------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------


def human(n: float) -> str:
    """Bytes in GiB, MiB or KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def account_lines(
    account: MemoryAccount, scaling: bool = True, breakdown: bool = False, all_rows: bool = True
) -> list[str]:
    """The account as a table: bytes, formula, counted or not (-), and (scaling) x-factors per doubling.

    breakdown: the activations' tensors one per line; all_rows=False: only the counted rows and
    the attention scores (the start-up summary).
    """
    sh = account.shape
    precision = "fp32" if sh["precision"] == "no" else sh["precision"]
    lines = [
        f"memory account (analytic, per process): B={sh['B']} T={sh['T']} C={sh['C']} H={sh['H']} L={sh['L']} "
        f"V={sh['V']:,} P={sh['P']:,}; {precision} ({sh['compute_bytes']}-byte compute), attention "
        f"{sh['attention']}, loss {'chunked: ' + str(sh['chunk_rows']) + ' rows' if sh['chunk_rows'] else 'full logits'}"
        + (", activation checkpointing" if sh["checkpointing"] else "")
    ]
    factors = "  x2 T / x2 d_model / x2 heads" if scaling else ""
    lines.append(f"  {'term':17} {'bytes':>15} {'':>11}  {'formula':32}{factors}")
    for r in account.rows:
        if not (all_rows or r.counted or r.name == "attention_scores"):
            continue
        mark = " " if r.counted else "-"
        scales = "  " + " ".join(f"{_x(r.scales.get(n)):>6}" for n in SCALED) if scaling else ""
        lines.append(f" {mark}{r.name:17} {r.bytes:>15,} {human(r.bytes):>11}  {r.formula:32}{scales}")
        if breakdown and r.name == "activations":
            lines += [f"      {what}: {n:,}" for what, n in account.activations]
    scales = "  " + " ".join(f"{_x(account.total_scales.get(n)):>6}" for n in SCALED) if scaling else ""
    lines.append(
        f"  {'total':17} {account.total:>15,} {human(account.total):>11}  {'(counted rows; - not on this path)':32}{scales}"
    )
    return [line.rstrip() for line in lines]


def _x(f: float | None) -> str:
    return "-" if f is None else f"x{f:.2f}"
