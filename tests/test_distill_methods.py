"""The one-head student's methods below the recipe: the layer-wise phase, hidden-state matching, schedules.

What each computes on small GPTs: the residual stream and blocks fed their own inputs, the relative
state error, the phase and the alpha/temperature schedules as functions of the step, and that the
layer-wise and hidden-state losses lower the errors they name.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import trained_looking

from pipeline.config import ModelConfig
from pipeline.distill.config import KDConfig, OnPolicyConfig
from pipeline.distill.divergences import relative_state_error
from pipeline.distill.objective import DistillLoss, per_token_means
from pipeline.distill.teacher import layer_map
from pipeline.model.gpt import GPT
from pipeline.train.losses import IGNORE

TEACHER = ModelConfig(n_layers=4, n_heads=4, d_model=32, max_seq_len=16, vocab_size=23, positions="rope")


def tokens(seed: int = 1, batch: int = 3, T: int = 16) -> torch.Tensor:
    return torch.randint(0, TEACHER.vocab_size, (batch, T), generator=torch.Generator().manual_seed(seed))


def student(n_layers: int = 4, seed: int = 2) -> GPT:
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(TEACHER, n_heads=1, n_layers=n_layers))


def loss_fn(n_student: int = 4, total_steps: int = 100, **kd) -> DistillLoss:
    teacher = trained_looking(TEACHER)
    layers = layer_map(TEACHER.n_layers, n_student)
    cfg = KDConfig(**kd)
    return DistillLoss(
        None,
        teacher,
        cfg,
        OnPolicyConfig(),
        layers,
        total_steps=total_steps,
        layerwise_steps=cfg.layerwise_steps,
    )


# --------------------------------------------------------------------------------------------------
# The model's residual stream and blocks on given inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "rope", "alibi"])
def test_blocks_on_their_own_stream_give_the_stream_back(positions):
    model = trained_looking(dataclasses.replace(TEACHER, positions=positions))
    x = tokens()
    states = model.residual_stream(x)
    assert len(states) == TEACHER.n_layers + 1
    outputs = model(x, block_inputs=states[:-1])
    for out, expected in zip(outputs, states[1:]):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    hidden, _ = model.hidden_states(x)
    torch.testing.assert_close(model.ln_f(states[-1]), hidden)
    logits, streamed = model(x, need_states=True)
    torch.testing.assert_close(logits, model(x))
    assert all(torch.equal(a, b) for a, b in zip(streamed, states))


def test_blocks_on_gives_every_parameter_a_gradient_and_only_blocks_a_nonzero_one():
    model = student()
    states = trained_looking(TEACHER).residual_stream(tokens())
    outputs = model(tokens(), block_inputs=states[:-1])
    sum(o.square().sum() for o in outputs).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name  # none unused: DDP's find_unused_parameters=False holds
        assert (p.grad.abs().sum() > 0) == name.startswith("blocks."), name
    with pytest.raises(ValueError, match="one input per block"):
        model(tokens(), block_inputs=states[:2])


# --------------------------------------------------------------------------------------------------
# The relative state error
# --------------------------------------------------------------------------------------------------


def test_relative_state_error_is_zero_when_right_one_when_standing_still_and_scale_free():
    torch.manual_seed(0)
    inputs = [torch.randn(2, 5, 8) for _ in range(3)]
    targets = [h + torch.randn(2, 5, 8) for h in inputs]
    valid = torch.ones(2, 5, dtype=torch.bool)
    n = valid.sum()
    assert float(relative_state_error(targets, targets, inputs, valid)) == 0.0
    assert float(relative_state_error(inputs, targets, inputs, valid)) == pytest.approx(float(n), rel=1e-6)
    guess = [t + 0.3 * torch.randn_like(t) for t in targets]
    base = relative_state_error(guess, targets, inputs, valid)
    scaled = relative_state_error(*([10 * s for s in group] for group in (guess, targets, inputs)), valid)
    assert float(scaled) == pytest.approx(float(base), rel=1e-5)
    valid[1] = False  # ignored tokens count nothing
    half = relative_state_error(inputs, targets, inputs, valid)
    assert float(half) == pytest.approx(float(valid.sum()), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Phase and schedules
# --------------------------------------------------------------------------------------------------


def test_phase_and_linear_schedules_are_functions_of_the_step():
    fn = loss_fn(
        total_steps=22, layerwise_steps=5, alpha=0.5, alpha_end=0.1, temperature=2.0, temperature_end=1.0
    )
    assert [fn.phase(s) for s in (0, 4, 5, 21)] == ["layerwise"] * 2 + ["end_to_end"] * 2
    assert fn.schedule(5) == (0.5, 2.0)
    assert fn.schedule(21) == pytest.approx((0.1, 1.0))
    assert fn.schedule(13) == pytest.approx((0.3, 1.5))  # halfway through the end-to-end steps
    assert loss_fn(total_steps=22, alpha=0.5).schedule(13) == (0.5, 1.0)  # unset ends: constant


def test_per_token_means_give_each_phase_its_own_tokens():
    # 10 tokens: 4 in the layer-wise phase, 6 end to end, the loop dividing every sum by 10.
    values = {"loss": 1.0, "ce": 6 * 3.0 / 10, "soft": 6 * 0.5 / 10, "block_error": 4 * 0.2 / 10}
    out = per_token_means(values | {"layerwise_share": 0.4})
    assert out["ce"] == pytest.approx(3.0) and out["soft"] == pytest.approx(0.5)
    assert out["block_error"] == pytest.approx(0.2)
    only = per_token_means({"loss": 0.2, "ce": 0.0, "soft": 0.0, "block_error": 0.2, "layerwise_share": 1.0})
    assert only["ce"] is None and only["soft"] is None and only["block_error"] == pytest.approx(0.2)


# --------------------------------------------------------------------------------------------------
# What the losses optimise
# --------------------------------------------------------------------------------------------------


def block_error_of(fn: DistillLoss, model: GPT, x: torch.Tensor) -> float:
    states = fn.teacher.residual_stream(x)
    inputs, targets = fn._targets(states)
    with torch.no_grad():
        outputs = model(x, block_inputs=inputs)
    return (
        float(relative_state_error(outputs, targets, inputs, torch.ones(x.shape, dtype=torch.bool)))
        / x.numel()
    )


@pytest.mark.parametrize("n_student", [4, 2])
def test_the_layerwise_phase_lowers_the_block_error(n_student):
    fn = loss_fn(n_student, layerwise_steps=50)
    model = student(n_student)
    x, y = tokens(3), tokens(4)
    held_out = tokens(9)
    before = block_error_of(fn, model, held_out)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(40):
        fn.at_step(step)
        total, extras = fn(model, (x, y))
        assert torch.equal(total, extras["block_error"]) and float(extras["ce"]) == 0.0
        assert float(extras["layerwise_share"]) == y.numel()
        optimizer.zero_grad()
        (total / y.numel()).backward()
        optimizer.step()
    assert block_error_of(fn, model, held_out) < 0.5 * before


def test_hidden_state_matching_adds_its_weighted_error_and_lowers_it():
    fn = loss_fn(hidden_weight=1.0)
    plain = loss_fn()
    model = student()
    x, y = tokens(3), tokens(4)
    y[0, :5] = IGNORE
    total, extras = fn(model, (x, y))
    plain_total, plain_extras = plain(model, (x, y))
    assert "hidden" in extras and "hidden" not in plain_extras
    torch.testing.assert_close(total, plain_total + extras["hidden"])
    first = float(extras["hidden"].detach())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        total, extras = fn(model, (x, y))
        optimizer.zero_grad()
        (total / (y != IGNORE).sum()).backward()
        optimizer.step()
    assert float(extras["hidden"].detach()) < 0.5 * first
