"""The fused (chunked) LM-head cross-entropy and vocabulary compaction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import ModelConfig
from pipeline.data.vocab import VocabMap
from pipeline.distill.config import KDConfig
from pipeline.distill.head import DistillHead, TeacherOutputs, Weights
from pipeline.model.gpt import GPT
from pipeline.train.losses import (
    GRAD_W_TILE,
    HEAD_TILE,
    IGNORE,
    CrossEntropyHead,
    balanced_rows,
    head_tile,
    token_stats,
)


@pytest.mark.parametrize("chunk", [7, 64, None])
def test_fused_loss_and_gradients_equal_the_plain_path(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(4, 50, 32, requires_grad=True)
    weight = torch.randn(1000, 32, requires_grad=True)
    targets = torch.randint(0, 1000, (4, 50))
    targets[0, :5] = IGNORE
    results = []
    for fused in (False, True):
        hidden.grad = weight.grad = None
        loss = CrossEntropyHead(targets, fused=fused, chunk=chunk)(hidden, weight)
        (loss * 0.37).backward()  # a non-unit upstream gradient
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    (plain_loss, plain_h, plain_w), (fused_loss, fused_h, fused_w) = results
    torch.testing.assert_close(fused_loss, plain_loss, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(fused_h, plain_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_w, plain_w, atol=1e-5, rtol=1e-5)
    assert torch.all(fused_h[0, :5] == 0)  # ignored targets get no gradient


def test_fused_loss_under_no_grad_and_bf16_autocast():
    torch.manual_seed(0)
    hidden, weight = torch.randn(64, 16), torch.randn(300, 16)
    targets = torch.randint(0, 300, (64,))
    exact = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    with torch.no_grad():
        torch.testing.assert_close(
            CrossEntropyHead(targets, chunk=10)(hidden, weight), exact, atol=1e-4, rtol=1e-5
        )
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = CrossEntropyHead(targets, chunk=10)(h, w)
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - exact.item()) / exact.item() < 0.02
    assert h.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_bf16_head_gradient_accumulates_in_fp32_over_tiles_and_chunks():
    """More classes than one gradient tile and several chunks: every tile and chunk lands once, in fp32.

    The reference is fp32 arithmetic on the same bf16-rounded inputs, so what remains is the
    rounding of bf16 probabilities; a lost, doubled or misplaced tile would be off by whole units.
    """
    torch.manual_seed(0)
    V = GRAD_W_TILE * 2 + 123  # three tiles, the last one partial
    hidden = torch.randn(96, 16).bfloat16().float().requires_grad_()
    weight = (torch.randn(V, 16) * 0.5).bfloat16().float().requires_grad_()
    targets = torch.randint(0, V, (96,))
    targets[:3] = IGNORE
    targets[3:6] = torch.tensor([5, GRAD_W_TILE + 7, V - 1])  # a target in every tile
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = CrossEntropyHead(targets, chunk=40)(hidden, weight)  # chunks of 40, 40 and 16 rows
    loss.backward()
    assert weight.grad.dtype == torch.float32
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    F.cross_entropy(h @ w.T, targets, ignore_index=IGNORE, reduction="sum").backward()
    scale = w.grad.abs().max()
    assert (weight.grad - w.grad).abs().max() < 0.02 * scale
    torch.testing.assert_close(hidden.grad, h.grad, atol=0.02 * h.grad.abs().max().item(), rtol=0.02)
    assert torch.all(hidden.grad[:3] == 0)


def test_fp32_head_tiles_cover_every_class_once():
    """In fp32 on a CPU the head's matmuls run HEAD_TILE classes at a time (the last tile partial),
    the hidden-state gradient summed over the tiles: a lost, doubled or misplaced tile would be off
    by whole units, not rounding."""
    torch.manual_seed(0)
    V = HEAD_TILE * 2 + 77
    assert head_tile(torch.device("cpu"), torch.float32, V) == HEAD_TILE
    hidden = torch.randn(3, 30, 16, requires_grad=True)
    weight = torch.randn(V, 16, requires_grad=True)
    targets = torch.randint(0, V, (3, 30))
    targets[0, :3] = IGNORE
    targets[1, :3] = torch.tensor([7, HEAD_TILE + 3, V - 1])  # a target in every tile
    results = []
    for fused in (False, True):
        hidden.grad = weight.grad = None
        loss = CrossEntropyHead(targets, fused=fused, chunk=32)(hidden, weight)  # 3 chunks of 30
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    (plain_loss, plain_h, plain_w), (fused_loss, fused_h, fused_w) = results
    torch.testing.assert_close(fused_loss, plain_loss, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(fused_h, plain_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_w, plain_w, atol=1e-5, rtol=1e-5)
    assert torch.all(fused_h[0, :3] == 0)


def test_head_tiles_only_in_fp32_on_a_cpu():
    """bf16 (oneDNN) measured slower tiled, and a GPU runs one large kernel faster: one tile there."""
    assert head_tile(torch.device("cpu"), torch.bfloat16, 200_019) == 200_019
    assert head_tile(torch.device("cuda"), torch.float32, 200_019) == 200_019
    assert head_tile(torch.device("cpu"), torch.float32, 500) == 500


@pytest.mark.parametrize(
    ("n_rows", "chunk", "rows"),
    [(8192, 209, 205), (8192, 256, 256), (8192, 262, 256), (100, 40, 34), (10, 64, 10), (7, 1, 1)],
)
def test_chunks_are_balanced(n_rows, chunk, rows):
    """As many chunks as `chunk` rows need, of equal size but the last: no small tail chunk."""
    got = balanced_rows(n_rows, chunk)
    assert got == rows and got <= chunk
    n_chunks = -(-n_rows // got)
    last = n_rows - (n_chunks - 1) * got
    assert n_chunks == -(-n_rows // chunk) and got - n_chunks < last <= got


def test_compacted_likelihood_equals_brute_force_over_the_full_vocabulary():
    torch.manual_seed(0)
    V, kept = 50, np.array([1, 4, 7, 9, 20, 33])
    vocab = VocabMap(V, kept)
    logits = torch.randn(10, vocab.n_classes)
    full = vocab.full_log_probs(logits)
    assert full.shape == (10, V)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(10))  # a proper distribution over all V ids
    # Brute force: an unseen id gets p(other) / (V - K).
    p = logits.softmax(-1)
    for row in range(10):
        for token in range(V):
            expected = p[row, vocab.to_compact(np.array([token]))[0]]
            if token not in kept:
                expected = expected / (V - len(kept))
            assert math.isclose(full[row, token].exp().item(), expected.item(), rel_tol=1e-5)


def test_token_stats_charge_unseen_ids_their_share():
    torch.manual_seed(0)
    vocab = VocabMap(100, np.arange(10))
    hidden, weight = torch.randn(8, 4), torch.randn(vocab.n_classes, 4)
    full_targets = torch.tensor([0, 3, 50, 99, 9, 10, 2, 75])
    targets = torch.as_tensor(vocab.to_compact(full_targets.numpy()))
    nll, top1, _, _ = token_stats(hidden, weight, targets, vocab.other, vocab.log_unseen)
    brute = -vocab.full_log_probs(hidden @ weight.T).gather(1, full_targets[:, None]).squeeze(1)
    torch.testing.assert_close(nll, brute, atol=1e-5, rtol=1e-5)
    assert not top1[targets == vocab.other].any()


def test_vocab_map_round_trip_and_serialisation():
    vocab = VocabMap(200_019, np.array([5, 17, 199_962]))
    ids = np.array([17, 5, 199_962, 42])
    compact = vocab.to_compact(ids)
    assert compact.tolist() == [1, 0, 2, vocab.other]
    back = vocab.to_full(compact, generator=torch.Generator().manual_seed(0))
    assert back[:3].tolist() == [17, 5, 199_962] and back[3] not in (5, 17, 199_962)
    assert VocabMap.from_json(vocab.to_json()) == vocab
    assert VocabMap.identity(65).n_classes == 65 and VocabMap.identity(65).other is None


def test_auto_compaction_only_when_under_half_the_vocabulary_is_used():
    meta = {"vocab_size": 100, "token_counts": {"ids": list(range(40)), "counts": [1] * 40}}
    assert VocabMap.from_meta(meta, "auto").compact
    assert not VocabMap.from_meta(
        meta | {"token_counts": {"ids": list(range(60)), "counts": [1] * 60}}, "auto"
    ).compact
    assert not VocabMap.from_meta(meta, "off").compact


def _compiled_step(head_for, chunk: int) -> tuple[int, float, list[Tensor]]:
    """(ops dynamo captured, loss, gradients) of a compiled tiny model's step whose head makes
    `chunk`-row chunks; a subgraph (an autograd.Function traced as one node) counts in full."""
    import torch._dynamo

    torch._dynamo.reset()
    captured: list[torch.fx.GraphModule] = []

    def backend(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    model, idx, targets = _head_model()
    loss = torch.compile(model, backend=backend)(idx, head_for(targets, model, chunk))
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    graphs = [g for gm in captured for g in gm.modules() if isinstance(g, torch.fx.GraphModule)]
    return sum(len(g.graph.nodes) for g in graphs), loss.item(), [p.grad for p in model.parameters()]


def _head_model() -> tuple[GPT, Tensor, Tensor]:
    torch.manual_seed(0)
    cfg = ModelConfig(
        block="attention_only", n_layers=1, n_heads=2, d_model=16, max_seq_len=16, vocab_size=97
    )
    idx, targets = torch.randint(0, 97, (2, 2, 16))
    return GPT(cfg), idx, targets


def _distill_head(targets: Tensor, model: GPT, chunk: int) -> DistillHead:
    teacher = TeacherOutputs(
        hidden=torch.randn(targets.numel(), 16, generator=torch.Generator().manual_seed(1)),
        weight=model.head_weight.detach() * 2,
    )
    return DistillHead(targets, teacher, KDConfig(alpha=0.5), Weights(0.5, 0.5), chunk=chunk)


@pytest.mark.parametrize(
    "head_for",
    [lambda targets, model, chunk: CrossEntropyHead(targets, chunk=chunk), _distill_head],
    ids=["cross_entropy", "distill"],
)
def test_compile_keeps_the_chunked_head_out_of_the_graph(head_for):
    """--train.compile traces the blocks only: the fused head's chunk loop does not unroll into the
    graph (at 200k classes, thousands of matmuls inductor had not compiled after 400 s), and the
    compiled step computes what the eager one does."""
    few_ops, loss, grads = _compiled_step(head_for, chunk=16)  # 2 chunks of the 32 rows
    many_ops, loss_many, grads_many = _compiled_step(head_for, chunk=2)  # 16 chunks
    assert few_ops > 0  # the blocks were captured: the step did not simply fall back to eager
    assert many_ops == few_ops, (few_ops, many_ops)
    model, idx, targets = _head_model()
    eager = model(idx, head_for(targets, model, 2))
    eager = eager[0] if isinstance(eager, tuple) else eager
    eager.backward()
    assert loss == pytest.approx(eager.item(), rel=1e-5)
    assert loss_many == pytest.approx(eager.item(), rel=1e-5)
    for p, g, g_many in zip(model.parameters(), grads, grads_many, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g_many, p.grad, rtol=1e-4, atol=1e-6)
