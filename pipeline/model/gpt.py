"""One configurable GPT: the exercise sheet's attention-only model up to pre-LN transformers.

The model knows nothing of devices, precision or processes. `forward(idx)` returns logits;
`forward(idx, head_fn=f)` hands the final hidden states and the LM head's weight to `f` (a loss
that computes logits in chunks, so the full (B*T, V) logits never exist at once).

The exercise sheet's switches live in ModelConfig: causal (or not) attention, blocks without
attention, the mask value and the dtype of the attention scores, GELU or ReLU, and the amplitude
of the sinusoidal position table.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import ModelConfig

PARAM_GROUPS = ("tok_emb", "pos_emb", "attention", "ffn", "norm", "head")
SCORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu}


# --------------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------------


def sinusoidal_table(positions: Tensor, d_model: int) -> Tensor:
    """(T, d_model) sin/cos position codes of 'Attention Is All You Need'."""
    half = torch.arange(0, d_model, 2, dtype=torch.float32, device=positions.device)
    freq = torch.exp(-math.log(10000.0) * half / d_model)
    angles = positions.float()[:, None] * freq[None, :]  # (T, d/2)
    table = torch.zeros(len(positions), d_model, device=positions.device)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return table


def sinusoidal_amplitude(cfg: ModelConfig) -> float:
    """What multiplies the sin/cos table (ModelConfig.sinusoidal_scale).

    Each position's d/2 (sin, cos) pairs have sin^2 + cos^2 = 1, so the unit table's RMS over the
    coordinates of any position is exactly 1/sqrt(2); "matched" multiplies it by init_std*sqrt(2)
    to give the RMS of a learned table at init (std init_std); "unit" keeps amplitude 1 (RMS 0.71,
    35 times a learned table's at init_std=0.02).
    """
    return cfg.init_std * math.sqrt(2.0) if cfg.sinusoidal_scale == "matched" else 1.0


def rope_cos_sin(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin, each (T, head_dim/2), of RoPE's rotation angles at `positions`."""
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    )
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of each head's vector (GPT-NeoX layout). x: (B, H, T, D)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def alibi_slopes(n_heads: int) -> Tensor:
    """Per-head ALiBi slopes (Press et al. 2022), including the rule for non-powers of two."""

    def powers(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(closest)
    if closest < n_heads:
        slopes += powers(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes)


# --------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Keys and values of every layer for the tokens seen so far, with their absolute positions.

    `next_pos` is the absolute position of the next token. `drop_oldest(n)` forgets the first n
    cached tokens: valid for RoPE and ALiBi, whose scores depend on relative positions only.
    """

    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)
    positions: Tensor | None = None  # (S,) absolute positions of the cached keys
    next_pos: int = 0

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls([None] * n_layers, [None] * n_layers)

    @property
    def length(self) -> int:
        return 0 if self.positions is None else len(self.positions)

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def drop_oldest(self, n: int) -> None:
        if n <= 0:
            return
        self.keys = [None if k is None else k[:, :, n:] for k in self.keys]
        self.values = [None if v is None else v[:, :, n:] for v in self.values]
        if self.positions is not None:
            self.positions = self.positions[n:]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (beam search)."""
        self.keys = [None if k is None else k.index_select(0, index) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, index) for v in self.values]


@dataclass
class Positions:
    """Where the tokens of one forward pass sit: absolute query and key positions."""

    query: Tensor  # (T,)
    key: Tensor  # (S,), S >= T when a cache is in use
    cos: Tensor | None = None
    sin: Tensor | None = None


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.rope = cfg.positions == "rope"
        self.register_buffer(
            "alibi", alibi_slopes(cfg.n_heads) if cfg.positions == "alibi" else None, persistent=False
        )
        self.kernel = "sdpa"  # or "matmul"; see GPT.set_attention_kernel
        self.causal = cfg.causal  # see GPT.set_causal
        self.mask_value = cfg.mask
        self.score_dtype = SCORE_DTYPES.get(cfg.score_dtype)  # None: the compute dtype
        # SDPA masks with -inf in the compute dtype: another mask value or score dtype needs matmuls.
        self.explicit = self.score_dtype is not None or cfg.mask != -math.inf

    def forward(
        self,
        x: Tensor,
        pos: Positions,
        cache: KVCache | None = None,
        layer: int = 0,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if self.rope:
            q, k = apply_rope(q, pos.cos, pos.sin), apply_rope(k, pos.cos, pos.sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        causal = self.causal or cache is not None  # a cache holds only the past: causal by construction
        dropout = self.dropout if self.training else 0.0
        if need_weights or self.explicit or (self.kernel == "matmul" and T > 1):
            y, probs = self._explicit(q, k, v, pos, causal, need_weights, dropout)
        else:
            probs = None
            mask = self._mask(pos, q.dtype, causal)
            is_causal = causal and mask is None and T == k.shape[2] and T > 1
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y)), probs

    def _explicit(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pos: Positions,
        causal: bool,
        need_weights: bool,
        dropout: float,
    ) -> tuple[Tensor, Tensor | None]:
        """Matmuls and a softmax, with the probabilities (fp32) when `need_weights`.

        The scores' dtype: model.score_dtype when set; else fp32 for inspection and q's dtype for the
        "matmul" kernel. QK^T is formed unscaled, then scaled, then the mask is added: in fp16 an
        unscaled score past 65504 overflows, a +inf makes its row's softmax NaN, and the loss the
        training loop checks for non-finite values is NaN.
        """
        dtype = self.score_dtype or (torch.float32 if need_weights else q.dtype)
        mask = self._mask(pos, q.dtype if self.score_dtype is None else dtype, causal)
        if mask is None and causal:
            mask = _additive(_causal(pos), dtype, self.mask_value)
        # An asked-for dtype holds under mixed precision too: autocast would recast the matmul.
        pinned = self.score_dtype is not None or need_weights
        with torch.autocast(q.device.type, enabled=False) if pinned else contextlib.nullcontext():
            scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-2, -1)) * (
                1.0 / math.sqrt(self.head_dim)
            )  # (B, H, T, S)
            if mask is not None:
                scores = scores + mask.to(dtype)
            probs = scores.softmax(dim=-1)
        y = F.dropout(probs, dropout, self.training).to(v.dtype) @ v
        return y, (probs.float() if need_weights else None)

    def _mask(self, pos: Positions, dtype: torch.dtype, causal: bool = True) -> Tensor | None:
        """Additive (H or 1, T, S) mask when SDPA's is_causal cannot express it; None otherwise."""
        if self.alibi is None and (not causal or len(pos.query) == len(pos.key)):
            return None  # no mask, or plain causal self-attention: is_causal (or the explicit path's tril)
        if self.alibi is None and len(pos.query) == 1:
            return None  # one new token after its cache sees every cached key
        distance = (pos.query[:, None] - pos.key[None, :]).float()  # (T, S)
        if causal:
            bias = _additive(_causal(pos), torch.float32, self.mask_value)
        else:  # ALiBi without the mask: penalise distance either way
            bias, distance = torch.zeros_like(distance), distance.abs()
        if self.alibi is not None:
            bias = bias - self.alibi.float()[:, None, None] * distance  # (H, T, S)
        return bias.to(dtype)


def _causal(pos: Positions) -> Tensor:
    return pos.key[None, :] <= pos.query[:, None]  # (T, S)


def _additive(allowed: Tensor, dtype: torch.dtype, value: float = -math.inf) -> Tensor:
    """0 where allowed, `value` elsewhere; filled in fp32 and cast, so -1e9 becomes -inf in fp16."""
    zeros = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    return zeros.masked_fill(~allowed, value).to(dtype)


class FFN(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.ffn_mult * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.ffn_mult * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.residual = cfg.use_residual
        norm = (lambda: nn.LayerNorm(cfg.d_model, bias=cfg.bias)) if cfg.use_layernorm else nn.Identity
        self.ln1 = norm() if cfg.attention else None
        self.attn = Attention(cfg) if cfg.attention else None  # None: the FFN-only baseline
        self.ln2 = norm() if cfg.use_ffn else None
        self.ffn = FFN(cfg) if cfg.use_ffn else None

    def forward(
        self, x: Tensor, pos: Positions, cache: KVCache | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        probs = None
        if self.attn is not None:
            a, probs = self.attn(self.ln1(x), pos, cache, self.layer, need_weights)
            x = x + a if self.residual else a
        if self.ffn is not None:
            f = self.ffn(self.ln2(x))
            x = x + f if self.residual else f
        return x, probs


# --------------------------------------------------------------------------------------------------
# GPT
# --------------------------------------------------------------------------------------------------


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(
                "ModelConfig.vocab_size must be resolved (from the data) before building the model"
            )
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias) if cfg.use_layernorm else nn.Identity()
        self.head = None if cfg.tie_head else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False
        self.reset_parameters()

    # -- construction --------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                scaled = self.cfg.use_residual and name.endswith(".proj")
                nn.init.normal_(module.weight, 0.0, std / math.sqrt(2 * self.cfg.n_layers) if scaled else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @staticmethod
    def param_group(name: str) -> str:
        """Which of PARAM_GROUPS a parameter belongs to (learning-rate multipliers, norms, counts)."""
        if name.startswith("tok_emb"):
            return "tok_emb"
        if name.startswith("pos_emb"):
            return "pos_emb"
        if name.startswith("head"):
            return "head"
        if ".attn." in name:
            return "attention"
        if ".ffn." in name:
            return "ffn"
        return "norm"

    def param_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(PARAM_GROUPS, 0)
        for name, p in self.named_parameters():
            counts[self.param_group(name)] += p.numel()
        counts["total"] = sum(counts.values())
        return counts

    def set_attention_kernel(self, kernel: str) -> None:
        """'sdpa' (torch's fused scaled_dot_product_attention) or 'matmul' (matmuls and a softmax
        in the compute dtype). Both compute the same function; which is faster depends on where the
        model runs, which is for the caller (pipeline/accel.py) to know."""
        if kernel not in ("sdpa", "matmul"):
            raise ValueError(f"attention kernel must be 'sdpa' or 'matmul', got {kernel!r}")
        for block in self.blocks:
            if block.attn is not None:
                block.attn.kernel = kernel

    def set_causal(self, flag: bool) -> None:
        """Attend with (True) or without (False) the causal mask in every block, at run time.

        Evaluation uses it for the "causal view" of a model trained with --model.causal False.
        A forward with a KV cache is causal whatever the flag: a cached step's query sees only the
        keys computed before it, and a cached prefill is masked so the cache holds what step-by-step
        decoding would, so KV-cache generation is causal by construction.
        """
        for block in self.blocks:
            if block.attn is not None:
                block.attn.causal = flag

    def sinusoidal_positions(self, positions: Tensor) -> Tensor:
        """The (T, d_model) fixed codes a positions=sinusoidal model adds at `positions`."""
        table = sinusoidal_table(positions, self.cfg.d_model)
        return table if self.cfg.sinusoidal_scale == "unit" else table * sinusoidal_amplitude(self.cfg)

    @property
    def head_weight(self) -> Tensor:
        return self.tok_emb.weight if self.head is None else self.head.weight

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        idx: Tensor,
        head_fn: Callable[[Tensor, Tensor], Any] | None = None,
        *,
        cache: KVCache | None = None,
        need_weights: bool = False,
        last_only: bool = False,
        need_states: bool = False,
        block_inputs: list[Tensor] | None = None,
    ) -> Any:
        """idx (B, T) -> logits (B, T, V); or head_fn(hidden (B, T, C), head weight (V, C)).

        With `cache`, idx holds only the new tokens and keys/values accumulate in the cache. With
        `need_weights`, returns (output, [attention probabilities (B, H, T, S) per layer]); with
        `need_states` the residual stream after each block (`residual_stream`) comes last in the tuple.
        With `block_inputs` (one (B, T, C) tensor per block), each block runs on its own input alone
        and the list of block outputs is returned (layer-wise distillation feeds it the teacher's states).
        """
        if block_inputs is not None:
            return self.blocks_on(block_inputs)
        hidden, attn, states = self._stream(idx, cache, need_weights, need_states)
        if last_only:
            hidden = hidden[:, -1:]
        out = head_fn(hidden, self.head_weight) if head_fn is not None else F.linear(hidden, self.head_weight)
        extra = ((attn,) if need_weights else ()) + ((states,) if need_states else ())
        return (out, *extra) if extra else out

    def hidden_states(
        self, idx: Tensor, cache: KVCache | None = None, need_weights: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        """The final hidden states (after ln_f) and, with `need_weights`, each layer's attention probabilities."""
        hidden, attn, _ = self._stream(idx, cache, need_weights, False)
        return hidden, attn

    def residual_stream(self, idx: Tensor) -> list[Tensor]:
        """The residual stream at the input of each block and after the last (before ln_f): n_layers + 1 tensors."""
        x, pos = self._embed(idx, None)
        states = [x]
        for block in self.blocks:
            x, _ = self._block(block, x, pos, None, False)
            states.append(x)
        return states

    def blocks_on(self, inputs: list[Tensor]) -> list[Tensor]:
        """Block l applied to inputs[l] (each (B, T, C), positions 0..T-1): the block outputs.

        Only the blocks compute; every other parameter joins the graph with weight 0, so each gets
        a (zero) gradient as after a full forward and a data-parallel wrapper finds none unused.
        """
        if len(inputs) != len(self.blocks):
            raise ValueError(f"blocks_on needs one input per block ({len(self.blocks)}), got {len(inputs)}")
        pos = self._positions(inputs[0].shape[1], None, inputs[0].device)
        outputs = [self._block(block, x, pos, None, False)[0] for block, x in zip(self.blocks, inputs)]
        rest = [p for name, p in self.named_parameters() if not name.startswith("blocks.")]
        if rest:
            outputs[0] = outputs[0] + 0.0 * sum(p.sum() for p in rest).to(outputs[0].dtype)
        return outputs

    def _positions(self, T: int, cache: KVCache | None, device: torch.device) -> Positions:
        start = cache.next_pos if cache is not None else 0
        query = torch.arange(start, start + T, device=device)
        if self.pos_emb is not None and start + T > self.cfg.max_seq_len:
            raise ValueError(
                f"position {start + T - 1} is past max_seq_len={self.cfg.max_seq_len} of learned positions; "
                f"use a window of at most {self.cfg.max_seq_len} tokens (or rope/alibi positions)"
            )
        if cache is not None:
            cache.positions = query if cache.positions is None else torch.cat((cache.positions, query))
            cache.next_pos = start + T
        pos = Positions(query, cache.positions if cache is not None else query)
        if self.cfg.positions == "rope":
            pos.cos, pos.sin = rope_cos_sin(query, self.cfg.head_dim, self.cfg.rope_base)
        return pos

    def _embed(self, idx: Tensor, cache: KVCache | None) -> tuple[Tensor, Positions]:
        pos = self._positions(idx.shape[1], cache, idx.device)
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos.query)
        elif self.cfg.positions == "sinusoidal":
            x = x + self.sinusoidal_positions(pos.query).to(x.dtype)
        return self.drop(x), pos

    def _block(
        self, block: Block, x: Tensor, pos: Positions, cache: KVCache | None, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        if self.activation_checkpointing and self.training and cache is None and not need_weights:
            return checkpoint(block, x, pos, use_reentrant=False)
        return block(x, pos, cache, need_weights)

    def _stream(
        self, idx: Tensor, cache: KVCache | None, need_weights: bool, need_states: bool
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        x, pos = self._embed(idx, cache)
        attn: list[Tensor] = []
        states: list[Tensor] = [x] if need_states else []
        for block in self.blocks:
            x, probs = self._block(block, x, pos, cache, need_weights)
            if probs is not None:
                attn.append(probs)
            if need_states:
                states.append(x)
        return self.ln_f(x), attn, states
