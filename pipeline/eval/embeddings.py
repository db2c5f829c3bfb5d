"""Embedding geometry over training (H6.2, H6.5): nearest-neighbour cosine, effective rank, position similarity, projector snapshots.

Pure functions of a matrix, and a probe that logs them at step 0 and at every evaluation:
embedding/nn_cosine and embedding/effective_rank over the --train.projector-tokens most frequent
tokens' rows (the rows of tokens never seen stay at their random initialisation and would only
measure the initialisation), the image embedding/position_similarity (cosine similarity of the
position vectors: the learned table, or the sinusoidal one; none for rope, alibi or no positions),
and a projector snapshot per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pipeline.model.gpt import GPT, sinusoidal_table
from pipeline.train.stage import RunContext, frequent_tokens, write_projector


def cosine_matrix(matrix: Tensor) -> Tensor:
    """(N, N) cosine similarity of the rows of an (N, d) matrix (zero rows give 0)."""
    unit = torch.nn.functional.normalize(matrix.detach().float(), dim=1)
    return unit @ unit.T


def nn_cosine(matrix: Tensor) -> float:
    """Mean over rows of the cosine similarity to the nearest other row (1: duplicates, ~0: random in high d)."""
    if matrix.shape[0] < 2:
        return float("nan")
    sim = cosine_matrix(matrix)
    sim.fill_diagonal_(-float("inf"))
    return float(sim.max(dim=1).values.mean())


def effective_rank(matrix: Tensor) -> float:
    """exp(entropy of the singular values normalised to sum 1) (Roy & Vetterli 2007): n for n equal singular values."""
    s = torch.linalg.svdvals(matrix.detach().float())
    p = s / s.sum().clamp(min=1e-30)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def position_table(model: GPT) -> Tensor | None:
    """The (T, d) position vectors added to the embeddings; None for rope, alibi or no positions."""
    if model.pos_emb is not None:
        return model.pos_emb.weight.detach()
    if model.cfg.positions == "sinusoidal":
        positions = torch.arange(model.cfg.max_seq_len, device=model.tok_emb.weight.device)
        return sinusoidal_table(positions, model.cfg.d_model)
    return None


def embedding_scalars(matrix: Tensor) -> dict[str, float]:
    """embedding/nn_cosine and embedding/effective_rank of the given embedding rows."""
    return {"embedding/nn_cosine": nn_cosine(matrix), "embedding/effective_rank": effective_rank(matrix)}


def make_embedding_probe(ctx: RunContext, model: torch.nn.Module, n: int) -> Callable[[int], None] | None:
    """probe_fn: the geometry scalars, the position-similarity image and a projector snapshot (rank 0).

    `n` is --train.projector-tokens (0: no embedding probe). Deterministic: no random numbers drawn.
    """
    if n <= 0:
        return None
    accelerator, report = ctx.accelerator, ctx.report
    _, rows = frequent_tokens(ctx, n)

    @torch.no_grad()
    def probe(step: int) -> None:
        if not accelerator.is_main_process:
            return
        raw = accelerator.unwrap_model(model)
        weight = raw.tok_emb.weight.detach()
        report.scalars(step, embedding_scalars(weight[rows.to(weight.device)]), record=False)
        table = position_table(raw)
        if table is not None:
            report.heatmap("embedding/position_similarity", cosine_matrix(table), step)
        write_projector(ctx, raw, n, step)

    return probe
