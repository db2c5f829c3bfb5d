"""Per-head diagnostics: QK^T score statistics, entropy by context length, previous-token share, head similarity, ablation.

The statistics are pure functions of tensors (raw scores and attention probabilities per layer),
so they can be checked on hand-built inputs; `capture_attention` gets those tensors from one
forward pass without changing the model: a forward hook on each block's `attn.qkv` rebuilds q and
k (RoPE applied with the model's own functions; an ALiBi bias is not part of QK^T). Allowed
positions follow the model's mask: key s <= query t, or every key when `cfg.causal` is False.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from torch import Tensor

from pipeline.data.vocab import VocabMap
from pipeline.eval.plots import color
from pipeline.eval.teacher_forced import evaluate_lm
from pipeline.model.gpt import apply_rope, rope_cos_sin
from pipeline.train.losses import token_stats

# --------------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------------


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks' attention modules (none in an FFN-only model)."""
    return [b.attn for b in model.blocks if getattr(b, "attn", None) is not None]


def is_causal(model: torch.nn.Module) -> bool:
    """Whether the model masks future keys now (GPT.set_causal may have changed cfg.causal's choice)."""
    layers = attention_layers(model)
    return bool(getattr(layers[0], "causal", getattr(model.cfg, "causal", True))) if layers else True


@torch.no_grad()
def capture_attention(model: torch.nn.Module, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """(raw scores q·k before the 1/sqrt(d_head) scaling, probabilities), each (B, H, T, T) fp32 per layer, on the CPU.

    `model` is the plain GPT (not a DDP wrapper): its blocks are hooked for one eval-mode pass.
    """
    cfg = model.cfg
    positions = torch.arange(x.shape[1], device=x.device)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_base)
    raw: list[Tensor] = []

    def hook(module: torch.nn.Module, inputs: tuple[Tensor, ...], out: Tensor, attn=None) -> None:
        B, T, C = out.shape
        q, k, _ = out.float().split(C // 3, dim=2)
        q = q.view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
        if attn.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        raw.append((q @ k.transpose(-2, -1)).cpu())  # (B, H, T, T)

    handles = [
        attn.qkv.register_forward_hook(lambda m, i, o, a=attn: hook(m, i, o, a))
        for attn in attention_layers(model)
    ]
    was_training = model.training
    model.eval()
    try:
        _, probs = model(x, need_weights=True, last_only=True)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return raw, [p.float().cpu() for p in probs]  # on the CPU: the statistics reduce in float64


def allowed_positions(T: int, causal: bool, device: torch.device | None = None) -> Tensor:
    """(T, T) bool: which keys each query may see."""
    full = torch.ones(T, T, dtype=torch.bool, device=device)
    return full.tril() if causal else full


# --------------------------------------------------------------------------------------------------
# Statistics (pure functions; (L, H) tensors per statistic)
# --------------------------------------------------------------------------------------------------


def score_stats(raw: list[Tensor], head_dim: int, causal: bool = True) -> dict[str, Tensor]:
    """Std and range (max - min) of QK^T over allowed positions per layer and head, before and after scaling.

    Pooled over the batch and every allowed (query, key) pair; the scaled scores are raw / sqrt(d_head),
    what the softmax sees (before any ALiBi bias).
    """
    out: dict[str, list[Tensor]] = {
        "score_std_raw": [],
        "score_std": [],
        "score_range_raw": [],
        "score_range": [],
    }
    for s in raw:  # (B, H, T, T)
        allowed = allowed_positions(s.shape[-1], causal, s.device)
        values = s.double().transpose(0, 1)[:, :, allowed]  # (H, B, N)
        values = values.reshape(values.shape[0], -1)
        scaled = values * (1.0 / math.sqrt(head_dim))
        for suffix, v in (("_raw", values), ("", scaled)):
            out[f"score_std{suffix}"].append(v.std(dim=1, correction=0))
            out[f"score_range{suffix}"].append(v.max(dim=1).values - v.min(dim=1).values)
    return {name: torch.stack(rows) for name, rows in out.items()}


def visible_keys(T: int, S: int, causal: bool) -> Tensor:
    """(T,) number of keys each query row sees."""
    return torch.arange(1, T + 1) if causal else torch.full((T,), S)


def entropy_by_row(probs: list[Tensor]) -> Tensor:
    """(L, H, T) attention entropy (nats) of each query row, averaged over the batch."""
    rows = []
    for p in probs:  # (B, H, T, S)
        ent = -(p * p.clamp_min(1e-12).log()).sum(-1)  # (B, H, T)
        rows.append(ent.mean(dim=0).double().cpu())
    return torch.stack(rows)


def context_buckets(visible: Tensor) -> dict[int, Tensor]:
    """Bucket start N -> bool mask of the rows whose visible-key count n is in [N, 2N), N = 1, 2, 4, ..."""
    starts = (2 ** torch.floor(torch.log2(visible.double()))).long()
    return {int(n): starts == n for n in torch.unique(starts)}


def entropy_by_context(row_entropy: Tensor, visible: Tensor) -> dict[int, Tensor]:
    """Bucket start N -> (L,) mean entropy over heads and the rows whose visible keys fall in [N, 2N)."""
    return {n: row_entropy[:, :, mask].mean(dim=(1, 2)) for n, mask in context_buckets(visible).items()}


def prev_token_share(probs: list[Tensor]) -> Tensor:
    """(L, H) mean probability a query at t >= 1 puts on key t - 1."""
    shares = []
    for p in probs:  # (B, H, T, S)
        diagonal = p.diagonal(offset=-1, dim1=-2, dim2=-1)  # (B, H, T - 1)
        shares.append(diagonal.double().mean(dim=(0, 2)))
    return torch.stack(shares)


def head_similarity(probs: Tensor) -> Tensor:
    """(H, H) cosine similarity between heads' attention maps of one layer, probs (B, H, T, S)."""
    flat = probs.double().transpose(0, 1).reshape(probs.shape[1], -1)  # (H, B*T*S)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return flat @ flat.T


def max_similarity(similarity: Tensor) -> float:
    """Largest cosine similarity between two different heads (nan with one head)."""
    H = similarity.shape[0]
    off = similarity[~torch.eye(H, dtype=torch.bool, device=similarity.device)]
    return float(off.max()) if len(off) else math.nan


def per_head_scalars(prefix: str, values: Tensor) -> dict[str, float]:
    """{prefix/layerL_headH: value} of an (L, H) tensor."""
    return {
        f"{prefix}/layer{layer}_head{head}": float(values[layer, head])
        for layer in range(values.shape[0])
        for head in range(values.shape[1])
    }


# --------------------------------------------------------------------------------------------------
# Head ablation
# --------------------------------------------------------------------------------------------------


def ablate_head(state: dict[str, Tensor], layer: int, head: int, n_heads: int) -> dict[str, Tensor]:
    """The state with one head's output removed: its columns of the output projection zeroed.

    This removes the head's whole contribution, its value bias included (attention rows sum to 1,
    so the value bias reaches the output through the same columns).
    """
    key = f"blocks.{layer}.attn.proj.weight"
    weight = state[key].clone()
    width = weight.shape[1] // n_heads
    weight[:, head * width : (head + 1) * width] = 0
    return {**state, key: weight}


@contextlib.contextmanager
def head_ablated(model: torch.nn.Module, layer: int, head: int) -> Iterator[None]:
    """Within the block, `model`'s head (layer, head) is ablated as `ablate_head` does, in place; restored exactly after."""
    weight = model.blocks[layer].attn.proj.weight
    width = weight.shape[1] // model.cfg.n_heads
    columns = slice(head * width, (head + 1) * width)
    with torch.no_grad():
        saved = weight[:, columns].clone()
        weight[:, columns] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            weight[:, columns] = saved


def ablation_scores(
    model: torch.nn.Module, loss_of: Callable[[torch.nn.Module], float]
) -> tuple[float, Tensor]:
    """(loss_of(model), (layers, heads) increase of that loss when each head alone is ablated)."""
    cfg = model.cfg
    base = loss_of(model)
    scores = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            with head_ablated(model, layer, head):
                scores[layer, head] = loss_of(model) - base
    return base, scores


@torch.no_grad()
def head_importance(
    teacher: torch.nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    accelerator: Accelerator,
    vocab: VocabMap,
    bytes_per_token: float,
) -> tuple[float, Tensor]:
    """(teacher val loss, (layers, heads) increase of val loss when each head alone is ablated), all ranks.

    The ablations run on a frozen copy, so the teacher itself is never touched.
    """
    probe = copy.deepcopy(teacher).eval().requires_grad_(False)
    return ablation_scores(
        probe, lambda m: evaluate_lm(m, batches, accelerator, vocab, bytes_per_token)["val_loss"]
    )


@torch.no_grad()
def local_val_loss(model: torch.nn.Module, batches: list[tuple[Tensor, Tensor]], vocab: VocabMap) -> float:
    """evaluate_lm's val loss (nats per token, full vocabulary) on this process alone: no collective."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        nll, *_ = model(x, head_fn=lambda h, w, y=y: token_stats(h, w, y, vocab.other, vocab.log_unseen))
        total += float(nll.double().sum())
        count += nll.numel()
    model.train(was_training)
    return total / max(count, 1)


def head_importance_scalars(scores: Tensor, prefix: str = "head_importance") -> dict[str, float]:
    return per_head_scalars(prefix, scores)


def describe_importance(scores: Tensor) -> str:
    rows = [f"  layer {i}: " + "  ".join(f"{v:+.4f}" for v in row) for i, row in enumerate(scores.tolist())]
    return "teacher head importance (val loss increase when the head is ablated):\n" + "\n".join(rows)


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


# Drawn at every evaluation, so kept cheap: no layout engine (constrained layout measures every tick
# label, most of a figure's cost on a CPU) and few ticks.


def _grid(fig: Figure, n: int, max_cols: int = 4):
    cols = min(n, max_cols)
    rows = -(-n // cols)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[n:]:
        ax.axis("off")
    return axes[:n]


def _ends(n: int) -> list[int]:
    return sorted({0, (n - 1) // 2, n - 1})


def plot_entropy_vs_context(row_entropy: Tensor, visible: Tensor) -> Figure:
    """A panel per layer: each head's mean row entropy against log2 of its visible keys, and ln(n) (uniform)."""
    L, H, _ = row_entropy.shape
    n = visible.double().numpy()
    order = np.argsort(n, kind="stable")
    log2n = np.log2(n[order])
    fig = Figure(figsize=(max(min(L, 4) * 3.2, 4.6) + 0.6, -(-L // 4) * 2.8 + 0.6))
    for layer, ax in enumerate(_grid(fig, L)):
        for head in range(H):
            entropy = row_entropy[layer, head].numpy()[order]
            ax.plot(log2n, entropy, color=color(head), linewidth=1.2, label=f"head {head}")
        ax.plot(log2n, np.log(n[order]), "k--", linewidth=1, label="ln n (uniform)")
        ax.set(xlabel="log2 visible keys n", title=f"layer {layer}")
        ax.grid(alpha=0.3)
    fig.axes[0].set_ylabel("entropy (nats)")
    fig.axes[0].legend(fontsize=7)
    fig.suptitle("Attention entropy against context length (probe batch)", fontsize=10)
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.15, top=0.82, wspace=0.25, hspace=0.5)
    return fig


def plot_similarity(similarity: Tensor, layer: int) -> Figure:
    """The (H, H) cosine similarity of one layer's heads, annotated."""
    sim = similarity.cpu().numpy()
    H = sim.shape[0]
    fig = Figure(figsize=(2.6 + 0.5 * H, 1.6 + 0.5 * H))
    fig.subplots_adjust(left=0.14, bottom=0.17, top=0.88)
    ax = fig.subplots()
    image = ax.imshow(sim, cmap="viridis", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(sim):
        shade = "white" if value < 0.6 else "black"
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=shade)
    ax.set(xlabel="head", ylabel="head", xticks=range(H), yticks=range(H))
    ax.set_title(f"Head similarity, layer {layer}", fontsize=9)
    fig.colorbar(image, ax=ax, label="cosine of attention maps")
    return fig


def plot_head_maps(maps: Tensor, layer: int) -> Figure:
    """One layer's heads as a grid of (query, key) maps, probe-batch average; square-root colour scale."""
    H, n = maps.shape[0], maps.shape[-1]
    # Two heads per row up to four heads: a near-square figure stays readable at TensorBoard's card width.
    cols = 1 if H == 1 else 2 if H <= 4 else 4
    rows = -(-H // cols)
    fig = Figure(figsize=(max(cols * 2.6 + 1.2, 4.2), rows * 2.6 + 0.8))
    axes = _grid(fig, H, max_cols=cols)
    image = None
    for head, ax in enumerate(axes):
        image = ax.imshow(maps[head].cpu().numpy(), cmap="magma", norm=PowerNorm(0.5, vmin=0, vmax=1))
        ax.set(xlabel="key", ylabel="query", xticks=_ends(n), yticks=_ends(n))
        ax.set_title(f"head {head}", fontsize=9)
    width, height = fig.get_figwidth(), fig.get_figheight()
    # Margins in inches, whatever the grid: the two-line title, the axis labels, the colour bar's label.
    top, bottom, right = 1 - 0.75 / height, 0.5 / height, 1 - 1.3 / width
    fig.subplots_adjust(left=0.6 / width, right=right, bottom=bottom, top=top, wspace=0.4, hspace=0.45)
    bar = fig.add_axes((1 - 1.05 / width, bottom + 0.05, 0.12 / width, top - bottom - 0.1))
    fig.colorbar(image, cax=bar, label="attention probability")
    fig.suptitle(f"Attention maps, layer {layer}\nfirst {n} positions, probe-batch mean", fontsize=9)
    return fig
