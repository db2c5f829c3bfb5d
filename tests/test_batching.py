"""Batch arithmetic in units (STYLE.md habit 7): one module, used by the loop, lr_find and the scaling study."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import TrainConfig
from pipeline.errors import UsageError
from pipeline.train.batching import plan_batches, split_batch, steps_for_tokens


def test_plan_counts_sequences_and_tokens_per_step():
    train = TrainConfig(micro_batch_size=4, grad_accum_steps=3, max_steps=10)
    plan = plan_batches(train, seq_len=16, world_size=2, train_tokens=16 * 1001)
    assert plan.sequences_per_step == 4 * 3 * 2 and plan.tokens_per_step == 24 * 16
    assert plan.windows_per_epoch == 1000 and plan.total_steps == 10
    assert plan.epoch(plan.total_steps) == pytest.approx(10 * 24 / 1000)
    assert "4 sequences x 3 accumulation x 2 processes = 24 sequences = 384 tokens" in plan.describe()


def test_the_first_budget_reached_stops_the_run():
    tokens = 32 * 10_001  # 10,000 windows of 32
    steps = dict(max_steps=500)
    by_tokens = dict(max_tokens=64_000)  # 64,000 / (8 x 32) = 250 steps
    by_epochs = dict(max_epochs=0.1)  # 1,000 windows / 8 per step = 125 steps
    for budget, expected in ((steps, 500), (by_tokens, 250), (by_epochs, 125), (steps | by_tokens, 250)):
        plan = plan_batches(TrainConfig(micro_batch_size=8, **budget), 32, 1, tokens)
        assert plan.total_steps == expected, budget
    plan = plan_batches(TrainConfig(micro_batch_size=8, max_steps=500, max_epochs=0.1), 32, 1, tokens)
    assert plan.total_steps == 125


def test_a_token_budget_rounds_up_to_whole_steps():
    assert steps_for_tokens(1000, 100) == 10
    assert steps_for_tokens(1001, 100) == 11
    assert steps_for_tokens(1, 100) == 1


@given(
    sequences=st.integers(1, 512),
    max_micro=st.integers(1, 64),
    world=st.sampled_from([1, 2, 4, 8]),
)
def test_split_batch_keeps_the_global_batch_exactly(sequences, max_micro, world):
    if sequences % world:
        with pytest.raises(UsageError, match="not a multiple of the"):
            split_batch(sequences, max_micro, world)
        return
    micro, accum = split_batch(sequences, max_micro, world)
    assert micro * accum * world == sequences
    assert 1 <= micro <= max_micro
    # the largest micro-batch that fits: no bigger divisor of the per-process share is allowed
    share = sequences // world
    assert not any(share % d == 0 for d in range(micro + 1, min(max_micro, share) + 1))


def test_split_batch_examples():
    assert split_batch(64, 16, 1) == (16, 4)
    assert split_batch(48, 32, 2) == (24, 1)
    assert split_batch(12, 8, 1) == (6, 2)
