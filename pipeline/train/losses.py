"""Losses computed from hidden states and the LM head, in chunks of tokens.

A 200k-way head at batch 32 x 256 has (8192, 200019) logits: 6.5 GB in fp32, and as much again for
their gradient. `LinearCrossEntropy` never holds more than one chunk of rows: its forward computes
each chunk's logits, loss and the gradients of that chunk (softmax minus one-hot, times the head and
the hidden states), and its backward only scales the stored gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.model.memory import GRAD_W_TILE, HEAD_TILE  # classes per tile of the head's matmuls

IGNORE = -100
CHUNK_BYTES = 200 * 2**20  # logits per chunk of an evaluation or distillation loss
LOSS_CHUNK_LOGITS = 100 * 2**20  # logits per chunk of the fused training loss, in any dtype
MAX_CHUNK_ROWS = 1024


def chunk_rows(n_classes: int, itemsize: int = 4, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk: logits of about chunk_bytes, at most MAX_CHUNK_ROWS rows. A bound on memory."""
    return int(min(MAX_CHUNK_ROWS, max(16, chunk_bytes // (itemsize * n_classes))))


def loss_chunk_rows(n_classes: int) -> int:
    """Rows per chunk of the fused training loss (LinearCrossEntropy): ~LOSS_CHUNK_LOGITS logits.

    At the seed preset's 200k classes and 8,192 rows, chunks of 512 rows (balanced_rows): 200 MiB
    of logits in bf16, 400 MiB in fp32. The rows are the inner dimension of the head's gradient
    matmul, and fewer of them run it slower: on a 2-core AVX512-BF16 EPYC the fp32 seed step took
    15.6-16.0 s at 512 rows against 18.1-19.0 s at 256 (the 200 MiB of before), peak 2.16 GiB
    against 1.97; in bf16 512 rows ran 3% faster than 410, and 1,024 rows took the process to 2.4 GiB.
    """
    return chunk_rows(n_classes, 1, LOSS_CHUNK_LOGITS)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls run in here: autocast's when it is on for x's device, else x's own."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def chunked_logits(
    hidden: Tensor, weight: Tensor, chunk: int | None = None
) -> Iterator[tuple[slice, Tensor]]:
    """(rows, fp32 logits of those rows) over (N, C) hidden states: the building block of every loss."""
    n = hidden.shape[0]
    chunk = chunk or chunk_rows(weight.shape[0])
    dtype = compute_dtype(hidden)
    w = weight.to(dtype)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        yield rows, (hidden[rows].to(dtype) @ w.t()).float()


def balanced_rows(n_rows: int, chunk: int) -> int:
    """Rows per chunk for `n_rows` in chunks of at most `chunk`, as even as possible.

    8,192 rows at 209 per chunk would leave a last chunk of 41, whose matmuls run far below the
    others' speed; 40 chunks of 205 do the same work at one speed.
    """
    chunk = max(1, min(chunk, n_rows))
    return -(-n_rows // -(-n_rows // chunk))


def head_tile(device: torch.device, dtype: torch.dtype, n_classes: int) -> int:
    """Classes per tile of the fused loss's forward and gradient matmuls with the head.

    In fp32 on a CPU, HEAD_TILE: a (rows, C) x (C, V) product over the whole 200k vocabulary
    streams the head and the (rows, V) result through the caches once per chunk, and tiles keep
    each tile's operands cache-resident (the seed preset's head 1.15-1.3x faster on a 2-core
    AVX512 EPYC). In bf16 (oneDNN) tiling measured 2-5% slower, and a GPU runs one large kernel
    faster than many small ones: one tile of every class there.
    """
    return min(HEAD_TILE, n_classes) if device.type == "cpu" and dtype == torch.float32 else n_classes


class LinearCrossEntropy(torch.autograd.Function):
    """sum over valid rows of CE(hidden @ weight.T, target), with gradients made chunk by chunk.

    Logits stay in the compute dtype (bf16 under autocast), in one (chunk, V) buffer that every chunk
    reuses: one fused softmax pass turns them into probabilities in place (the kernel accumulates in
    fp32), the loss is -log p(target), and probabilities minus one-hot is the logits' gradient, fed
    straight into the two gradient matmuls. No (rows, V) tensor is ever converted between dtypes.
    In fp32 the matmuls with the head run `head_tile` classes at a time, and the head's gradient
    matmul adds into its fp32 accumulator directly. In a lower compute dtype the head's gradient
    still accumulates in fp32 over the chunks: each chunk's share is made GRAD_W_TILE classes at a
    time into a small buffer, and added while it is still in cache.
    """

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, dtype: torch.dtype, chunk: int
    ) -> Tensor:
        h = hidden.to(dtype)
        w = weight.to(dtype)
        n_rows, n_classes = h.shape[0], w.shape[0]
        chunk = balanced_rows(n_rows, chunk)
        low = dtype != torch.float32
        tile = GRAD_W_TILE if low else head_tile(h.device, dtype, n_classes)
        tiles = [slice(v, min(v + tile, n_classes)) for v in range(0, n_classes, tile)]
        grad_h = torch.empty_like(h)
        grad_w = torch.empty_like(weight, dtype=torch.float32)  # the first chunk writes it, the others add
        logits = torch.empty(chunk, n_classes, dtype=dtype, device=h.device)
        part = torch.empty_like(w[:tile]) if low else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        tiny = torch.finfo(torch.float32).tiny
        for start in range(0, n_rows, chunk):
            rows = slice(start, min(start + chunk, n_rows))
            t = targets[rows]
            valid = t != IGNORE
            safe_t = t.clamp(min=0)
            probs = logits[: rows.stop - start]
            h_c = h[rows]
            if low:
                torch.mm(h_c, w.t(), out=probs)  # (n, V) logits
            else:
                for v in tiles:
                    torch.mm(h_c, w[v].t(), out=probs[:, v])
            torch.softmax(probs, dim=-1, out=probs)  # now probabilities, in place
            p_target = probs.gather(1, safe_t[:, None]).squeeze(1).float()
            total += -(p_target.clamp_min(tiny).log() * valid).sum()
            # d loss / d logits = probabilities - one_hot: touch only the target entries.
            flat = torch.arange(probs.shape[0], device=probs.device) * n_classes + safe_t
            probs.view(-1).index_add_(
                0, flat, torch.full(flat.shape, -1.0, dtype=probs.dtype, device=probs.device)
            )
            # Ignored rows get no gradient: zero them on the (n, C) sides, not the (n, V) one, and
            # without asking the host whether any exist (no sync per chunk).
            keep = valid[:, None].to(h.dtype)
            h_rows = h_c * keep
            grad_h_c = grad_h[rows]
            if low:
                torch.mm(probs, w, out=grad_h_c)  # one matmul: its fp32 accumulator sums every class
                for v in tiles:
                    share = part[: v.stop - v.start]
                    torch.mm(probs[:, v].t(), h_rows, out=share)
                    if start:
                        grad_w[v] += share  # accumulated in fp32
                    else:
                        grad_w[v].copy_(share)
            else:
                for i, v in enumerate(tiles):
                    p = probs[:, v]
                    if i:
                        grad_h_c.addmm_(p, w[v])
                    else:
                        torch.mm(p, w[v], out=grad_h_c)
                    if start:
                        grad_w[v].addmm_(p.t(), h_rows)
                    else:  # the first chunk ignores the empty buffer
                        torch.mm(p.t(), h_rows, out=grad_w[v])
            grad_h_c.mul_(keep)
        # Kept as plain attributes, not saved tensors: backward hands them over and drops its own
        # reference, so autograd can adopt the head's (large) gradient instead of copying it.
        ctx.grads = [grad_h.to(hidden.dtype), grad_w.to(weight.dtype)]
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_h, grad_w = ctx.grads
        ctx.grads = None  # this backward runs once; see forward
        return grad_h.mul_(grad_output), grad_w.mul_(grad_output), None, None, None


class CrossEntropyHead:
    """A `head_fn` for GPT.forward: summed next-token cross-entropy over valid targets (fp32).

    fused=True (default) uses LinearCrossEntropy; fused=False materialises the full logits, the
    textbook path, kept as the reference the fused path is tested against.

    Under --train.compile the head runs eagerly, after the compiled blocks. Traced, the chunk loop
    (and, below fp32, the tile loop of each chunk) would unroll into the graph: at the seed preset's
    200k classes thousands of matmuls, which inductor had not compiled after 400 s. Each iteration
    is already a large matmul, so compiling it wins nothing.
    """

    def __init__(self, targets: Tensor, fused: bool = True, chunk: int | None = None) -> None:
        self.targets, self.fused, self.chunk = targets, fused, chunk

    @torch.compiler.disable  # eager under --train.compile: see the class docstring
    def __call__(self, hidden: Tensor, weight: Tensor) -> Tensor:
        h = hidden.reshape(-1, hidden.shape[-1])  # (B*T, C)
        t = self.targets.reshape(-1)
        if not self.fused:
            logits = (h @ weight.to(h.dtype).t()).float()
            return F.cross_entropy(logits, t, ignore_index=IGNORE, reduction="sum")
        dtype = compute_dtype(h)
        chunk = self.chunk or loss_chunk_rows(weight.shape[0])
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            with torch.autocast(h.device.type, enabled=False):
                return LinearCrossEntropy.apply(h, weight, t, dtype, chunk)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for rows, logits in chunked_logits(h, weight, chunk):
            total += F.cross_entropy(logits, t[rows], ignore_index=IGNORE, reduction="sum")
        return total


def token_stats(
    hidden: Tensor, weight: Tensor, targets: Tensor, other: int | None = None, log_unseen: float = 0.0
):
    """Per-token NLL (full-vocabulary nats), top-1 and top-5 hits, and max probability, chunk by chunk.

    With a compacted vocabulary, a target of class `other` costs log(V - K) more nats than the
    class's own NLL: the model spreads p(other) evenly over the V - K unseen ids.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    nll = torch.empty(t.shape, dtype=torch.float32, device=h.device)
    top1 = torch.empty(t.shape, dtype=torch.bool, device=h.device)
    top5 = torch.empty(t.shape, dtype=torch.bool, device=h.device)
    pmax = torch.empty(t.shape, dtype=torch.float32, device=h.device)
    for rows, logits in chunked_logits(h, weight):
        logp = logits.log_softmax(dim=-1)
        nll[rows] = -logp.gather(1, t[rows, None]).squeeze(1)
        if other is not None:
            logp[:, other] -= log_unseen  # rank ids, not classes: one unseen id's share of p(other)
        best = logp.topk(min(5, logp.shape[-1]), dim=-1).indices
        hit = best == t[rows, None]
        if other is not None:
            hit &= t[rows, None] != other  # a named unseen id is (almost) never the top guess
        top1[rows] = hit[:, 0]
        top5[rows] = hit.any(dim=-1)
        pmax[rows] = logp.max(dim=-1).values.exp()
    if other is not None:
        nll = nll + (t == other).float() * log_unseen
    return nll, top1, top5, pmax


LN2 = math.log(2.0)
