"""Training and evaluation windows: deterministic, disjoint per rank, resumable by step."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.shards import TokenData, TrainWindows, eval_batches, eval_starts
from pipeline.data.vocab import VocabMap
from pipeline.errors import UsageError

TOKENS = np.arange(10_000, dtype=np.uint32) % 997


def windows(**kw) -> TrainWindows:
    args = dict(tokens=TOKENS, seq_len=16, micro_batch_size=4, grad_accum_steps=2, seed=7)
    return TrainWindows(**(args | kw))


def test_same_seed_same_batches_other_seed_other_batches():
    a, b, c = windows(), windows(), windows(seed=8)
    assert np.array_equal(a.starts(5, 1), b.starts(5, 1))
    assert not np.array_equal(a.starts(5, 1), c.starts(5, 1))


def test_targets_are_inputs_shifted_by_one():
    x, y = windows().batch(3, 0)
    assert x.shape == y.shape == (4, 16)
    assert np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())
    start = windows().starts(3, 0)[0]
    assert np.array_equal(x[0].numpy(), TOKENS[start : start + 16])


@pytest.mark.parametrize("sampling", ["random", "epochs", "grid"])
def test_two_ranks_see_the_windows_of_one_rank_with_twice_the_micro_batch(sampling):
    one = windows(micro_batch_size=8, grad_accum_steps=2, sampling=sampling)
    ranks = [
        windows(micro_batch_size=4, grad_accum_steps=2, rank=r, world_size=2, sampling=sampling)
        for r in range(2)
    ]
    for step in range(6):
        for micro in range(2):
            both = np.concatenate([r.starts(step, micro) for r in ranks])
            assert np.array_equal(both, one.starts(step, micro))
            assert not set(ranks[0].starts(step, micro)) & set(ranks[1].starts(step, micro))


def test_an_epoch_visits_every_window_once():
    w = windows(micro_batch_size=1, grad_accum_steps=1, sampling="epochs")
    starts = np.concatenate([w.starts(s, 0) for s in range(w.n_windows)])
    assert len(set(starts.tolist())) == w.n_windows  # every window once
    assert np.all(np.diff(np.sort(starts)) == 16)  # non-overlapping, one shift per epoch
    assert w.epoch_of(w.n_windows) == pytest.approx(1.0)
    next_epoch = np.concatenate([w.starts(s, 0) for s in range(w.n_windows, 2 * w.n_windows)])
    assert not np.array_equal(next_epoch, starts)  # a new order (and shift) each epoch


@pytest.mark.parametrize("sampling", ["random", "epochs", "grid"])
def test_window_order_does_not_depend_on_the_batch_size(sampling):
    """Window i is a function of (seed, i): a scaling study's runs all read the same sequence."""
    small = windows(micro_batch_size=4, grad_accum_steps=1, sampling=sampling)
    big = windows(micro_batch_size=16, grad_accum_steps=1, sampling=sampling)
    seq = np.concatenate([small.starts(s, 0) for s in range(8)])
    assert np.array_equal(seq, np.concatenate([big.starts(s, 0) for s in range(2)]))


def test_random_windows_cover_any_offset_and_grid_windows_stay_on_the_grid():
    random = np.concatenate([windows(sampling="random").starts(s, m) for s in range(50) for m in range(2)])
    assert random.min() >= 0 and random.max() <= len(TOKENS) - 17
    assert len(set((random % 16).tolist())) == 16  # every position within a window occurs
    grid = np.concatenate([windows(sampling="grid").starts(s, m) for s in range(50) for m in range(2)])
    assert np.all(grid % 16 == 0)


def test_resume_needs_only_the_step():
    a = windows()
    first = [a.starts(s, m) for s in range(10) for m in range(2)]
    b = windows()  # a fresh loader "resumed" at step 5
    assert all(np.array_equal(first[2 * s + m], b.starts(s, m)) for s in range(5, 10) for m in range(2))


def test_vocab_map_is_applied_to_batches():
    kept = np.arange(0, 997, 2)
    vocab = VocabMap(997, kept)
    x, _ = windows(vocab=vocab).batch(0, 0)
    raw_x, _ = windows().batch(0, 0)
    expected = np.where(raw_x.numpy() % 2 == 0, raw_x.numpy() // 2, vocab.other)
    assert np.array_equal(x.numpy(), expected)


def test_eval_windows_are_fixed_and_shared_out_evenly():
    starts = eval_starts(1_000, 16, 160)
    assert len(starts) == 10 and np.array_equal(starts, eval_starts(1_000, 16, 160))
    one = eval_batches(TOKENS[:1000], 16, 160, 4)
    two = [eval_batches(TOKENS[:1000], 16, 160, 4, rank=r, world_size=2) for r in range(2)]
    assert sum(len(b[0]) for b in one) == 10
    assert sum(len(b[0]) for r in two for b in r) == 10 and len(two[0]) == len(two[1])


def test_too_short_splits_are_refused():
    with pytest.raises(UsageError, match="seq-len"):
        TrainWindows(TOKENS[:20], 16, 1, 1, 0)
    with pytest.raises(UsageError, match="seq-len"):
        eval_starts(10, 16, 100)


def test_open_validates_dtype_and_size(char_data):
    data = TokenData.open(char_data)
    assert data.train.dtype == np.uint16 and len(data.train) == data.meta["train_tokens"]
    assert data.bytes_per_token == pytest.approx(1.0)  # ASCII, one char per token
