"""Distillation losses: closed-form values, the JSD endpoints, fused vs reference, gradient checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pipeline.distill.config import KDConfig
from pipeline.distill.divergences import attention_transfer, divergence, teacher_topk
from pipeline.distill.head import AgreementHead, DistillHead, TeacherOutputs, Weights
from pipeline.distill.objective import per_token_means
from pipeline.train.losses import IGNORE

KINDS = ("forward_kl", "reverse_kl", "jsd", "topk_kl")


def logs(*probs: float) -> torch.Tensor:
    return torch.tensor([probs], dtype=torch.float64).log()


def identity_head(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, weight) whose product is `logits` (n, V): hidden = logits, weight = identity."""
    return logits.clone(), torch.eye(logits.shape[-1], dtype=logits.dtype)


def soft_of(student_logits, teacher_logits, kd, targets=None) -> float:
    h, w = identity_head(student_logits)
    th, tw = identity_head(teacher_logits)
    t = torch.zeros(len(h), dtype=torch.long) if targets is None else targets
    head = DistillHead(t, TeacherOutputs(hidden=th, weight=tw), kd, Weights(0.0, 1.0, kd.temperature))
    return float(head(h, w)[2])


# --------------------------------------------------------------------------------------------------
# Values against hand computation
# --------------------------------------------------------------------------------------------------


def test_kl_matches_closed_form():
    p, q = logs(0.5, 0.5), logs(0.9, 0.1)
    forward = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # = 0.5 ln(25/9)
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert float(divergence(p, q, "forward_kl")) == pytest.approx(forward, rel=1e-12)
    assert float(divergence(p, q, "reverse_kl")) == pytest.approx(reverse, rel=1e-12)
    assert forward == pytest.approx(0.5 * math.log(25 / 9))


def test_jsd_matches_definition_and_endpoints():
    p, q = logs(0.5, 0.5), logs(0.9, 0.1)
    beta = 0.25
    m = [beta * 0.5 + (1 - beta) * 0.9, beta * 0.5 + (1 - beta) * 0.1]
    kl_pm = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    kl_qm = 0.9 * math.log(0.9 / m[0]) + 0.1 * math.log(0.1 / m[1])
    assert float(divergence(p, q, "jsd", beta)) == pytest.approx(beta * kl_pm + (1 - beta) * kl_qm, rel=1e-12)
    forward, reverse = float(divergence(p, q, "forward_kl")), float(divergence(p, q, "reverse_kl"))
    # beta weighs the teacher: 0 is forward KL, 1 is reverse KL, and the limits approach them.
    assert float(divergence(p, q, "jsd", 0.0)) == forward
    assert float(divergence(p, q, "jsd", 1.0)) == reverse
    eps = 1e-5
    assert float(divergence(p, q, "jsd", eps)) / eps == pytest.approx(forward, rel=1e-3)
    assert float(divergence(p, q, "jsd", 1 - eps)) / eps == pytest.approx(reverse, rel=1e-3)


def test_topk_kl_puts_the_tail_in_one_bucket():
    teacher = logs(0.5, 0.3, 0.15, 0.05)
    student = logs(0.25, 0.25, 0.25, 0.25)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    kd = KDConfig(loss="topk_kl", top_k=2)
    assert soft_of(student, teacher, kd) == pytest.approx(expected, rel=1e-10)
    ids, buckets = teacher_topk(teacher, 2)
    assert ids.tolist() == [[0, 1]]
    assert buckets.exp().tolist()[0] == pytest.approx([0.5, 0.3, 0.2])


def test_temperature_softens_both_and_scales_by_t_squared():
    student, teacher = logs(0.7, 0.2, 0.1), logs(0.2, 0.5, 0.3)
    T = 2.0
    kd = KDConfig(loss="forward_kl", temperature=T)
    soft_t = (teacher / T).log_softmax(-1)
    soft_s = (student / T).log_softmax(-1)
    expected = float((soft_t.exp() * (soft_t - soft_s)).sum())
    h, w = identity_head(student)
    th, tw = identity_head(teacher)
    total, _, soft = DistillHead(
        torch.zeros(1, dtype=torch.long), TeacherOutputs(hidden=th, weight=tw), kd, Weights(0.0, 1.0, T)
    )(h, w)
    assert float(soft) == pytest.approx(expected, rel=1e-10)
    assert float(total) == pytest.approx(T**2 * expected, rel=1e-10)


def test_alpha_mixes_hard_and_soft_and_ignored_targets_count_nothing():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    targets = torch.tensor([1, IGNORE, 3, IGNORE])
    kd = KDConfig(loss="reverse_kl")
    h, w = identity_head(student)
    th, tw = identity_head(teacher)
    total, ce, soft = DistillHead(targets, TeacherOutputs(hidden=th, weight=tw), kd, Weights(0.3, 0.7))(h, w)
    ce_ref = torch.nn.functional.cross_entropy(student, targets, ignore_index=IGNORE, reduction="sum")
    soft_ref = sum(soft_of(student[i : i + 1], teacher[i : i + 1], kd) for i in (0, 2))
    assert float(ce) == pytest.approx(float(ce_ref), rel=1e-10)
    assert float(soft) == pytest.approx(soft_ref, rel=1e-10)
    assert float(total) == pytest.approx(0.3 * float(ce_ref) + 0.7 * soft_ref, rel=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_identical_copy_gives_zero_soft_loss_and_gradient(kind):
    torch.manual_seed(1)
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(0, 13, (2, 5))
    kd = KDConfig(loss=kind, temperature=1.5, top_k=4)
    teacher = TeacherOutputs(hidden=h.detach().reshape(-1, 8), weight=w.detach())
    total, _, soft = DistillHead(targets, teacher, kd, Weights(0.0, 1.0, 1.5), chunk=3)(h, w)
    total.backward()
    assert abs(float(soft)) < 1e-6
    assert h.grad.abs().max() < 1e-6 and w.grad.abs().max() < 1e-6


# --------------------------------------------------------------------------------------------------
# The fused (chunked) path against the reference (full logits, autograd), and gradient checks
# --------------------------------------------------------------------------------------------------


def _problem(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, C, V = 9, 6, 17
    h = torch.randn(N, C, dtype=dtype, generator=g)
    w = torch.randn(V, C, dtype=dtype, generator=g)
    th = torch.randn(N, 4, dtype=dtype, generator=g)
    tw = torch.randn(V, 4, dtype=dtype, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    t[[2, 7]] = IGNORE
    return h, w, t, TeacherOutputs(hidden=th, weight=tw)


def _cached(teacher: TeacherOutputs, kd: KDConfig) -> TeacherOutputs:
    logp = ((teacher.hidden @ teacher.weight.t()) / kd.temperature).log_softmax(-1)
    ids, buckets = teacher_topk(logp, kd.top_k)
    return TeacherOutputs(ids=ids, logp=buckets[:, :-1], tail=buckets[:, -1])


@pytest.mark.parametrize("kind,temperature,cached", list(itertools.product(KINDS, (1.0, 2.5), (False, True))))
def test_fused_matches_reference(kind, temperature, cached):
    h, w, t, teacher = _problem(torch.float32)
    kd = KDConfig(loss=kind, temperature=temperature, top_k=5, beta=0.3)
    if cached:
        teacher = _cached(teacher, kd)
    results = []
    for fused in (True, False):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        total, ce, soft = DistillHead(t, teacher, kd, Weights(0.4, 0.6, temperature), fused=fused, chunk=4)(
            hh, ww
        )
        total.backward()
        results.append((total, ce, soft, hh.grad, ww.grad))
    for fused_value, reference in zip(*results):
        torch.testing.assert_close(fused_value, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,cached", [*((k, False) for k in KINDS), ("jsd", True), ("reverse_kl", True)])
def test_gradcheck_float64(kind, cached):
    h, w, t, teacher = _problem(torch.float64, seed=3)
    kd = KDConfig(loss=kind, temperature=1.7, top_k=5, beta=0.6)
    if cached:
        teacher = _cached(teacher, kd)
    head = DistillHead(t, teacher, kd, Weights(0.25, 0.75, 1.7), chunk=4)
    assert torch.autograd.gradcheck(
        lambda hh, ww: head(hh, ww)[0], (h.requires_grad_(), w.requires_grad_()), eps=1e-6, atol=1e-6
    )


def test_no_grad_path_matches_training_path():
    h, w, t, teacher = _problem(torch.float32)
    kd = KDConfig(loss="jsd", temperature=2.0)
    head = DistillHead(t, teacher, kd, Weights(0.5, 0.5, 2.0), chunk=4)
    with torch.no_grad():
        plain = head(h, w)
    trained = head(h.clone().requires_grad_(), w)
    for a, b in zip(plain, trained):
        torch.testing.assert_close(a, b.detach())


def test_bf16_autocast_stays_close_to_fp32():
    h, w, t, teacher = _problem(torch.float32)
    kd = KDConfig(loss="forward_kl")
    head = DistillHead(t, teacher, kd, Weights(0.5, 0.5))
    exact = head(h.clone().requires_grad_(), w)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(h.clone().requires_grad_(), w)[0]
    assert mixed.dtype == torch.float32
    assert float(mixed.detach()) == pytest.approx(float(exact.detach()), rel=3e-2)


# --------------------------------------------------------------------------------------------------
# Attention transfer, agreement, logging
# --------------------------------------------------------------------------------------------------


def test_attention_transfer_against_hand_values():
    # Two teacher heads attending [1, 0] and [0, 1] average to [0.5, 0.5]; the second query row of a
    # causal 2-token window. The first row sees one key only, so every model agrees there.
    teacher = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]]])  # (1, 2, 2, 2)
    student = torch.tensor([[[[1.0, 0.0], [0.9, 0.1]]]], requires_grad=True)  # (1, 1, 2, 2)
    valid = torch.tensor([[True, True]])
    loss = attention_transfer([student], [teacher], [0], valid)
    assert float(loss.detach()) == pytest.approx(
        0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-6
    )
    loss.backward()
    assert torch.isfinite(student.grad).all()  # zero probabilities (masked keys) give no NaN
    same = attention_transfer([teacher.mean(1, keepdim=True)], [teacher], [0], valid)
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    assert float(attention_transfer([student], [teacher], [0], torch.tensor([[True, False]])).detach()) == 0.0


def test_agreement_head_of_identical_models():
    torch.manual_seed(0)
    h, w = torch.randn(3, 4, 8), torch.randn(11, 8)
    agree, kl = AgreementHead(h, w)(h, w)
    assert float(agree) == 12 and abs(float(kl)) < 1e-5
    agree, kl = AgreementHead(h, w)(-h, w)
    assert float(agree) < 12 and float(kl) > 0


def test_per_token_means_undo_the_loops_normalisation():
    # 100 tokens: 75 off-policy with CE 2.0 each, 25 on-policy with soft 0.4 each.
    values = {"loss": 1.0, "ce": 75 * 2.0 / 100, "soft": 75 * 0.1 / 100, "soft_on_policy": 25 * 0.4 / 100}
    values["on_policy_share"] = 0.25
    out = per_token_means(values)
    assert out["ce"] == pytest.approx(2.0) and out["soft"] == pytest.approx(0.1)
    assert out["soft_on_policy"] == pytest.approx(0.4) and out["loss"] == 1.0
    assert (
        per_token_means({"ce": 1.0, "soft_on_policy": 0.0, "on_policy_share": 0.0})["soft_on_policy"] is None
    )
