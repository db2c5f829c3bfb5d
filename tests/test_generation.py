"""Generation: strategies agree where they must, the KV cache changes nothing, long contexts work."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from known_models import copy_model, uniform_model

from pipeline.config import ModelConfig, SamplingConfig
from pipeline.data.tokenizer import Tokenizer
from pipeline.data.vocab import VocabMap
from pipeline.model.generation import (
    PAD,
    Decoder,
    StopStrings,
    beam_search,
    filter_logits,
    generate,
    next_token,
    repetition_penalty,
    to_text,
    truncate_at_stop,
)
from pipeline.model.gpt import GPT

POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "none"]
GREEDY = SamplingConfig(temperature=0.0)


def random_model(
    positions: str = "learned", n_layers: int = 2, vocab: int = 13, max_seq_len: int = 12
) -> GPT:
    """A random GPT with large weights, so that its logits are far from ties."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layers=n_layers,
        n_heads=2,
        d_model=16,
        max_seq_len=max_seq_len,
        vocab_size=vocab,
        positions=positions,
        init_std=0.5,
    )
    return GPT(cfg).eval()


def run(model: GPT, prompt: torch.Tensor, n: int, seed: int | None = None, **overrides) -> torch.Tensor:
    cfg = SamplingConfig(max_new_tokens=n, **({"temperature": 0.0} | overrides))
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return generate(model, prompt, cfg, generator)


def prompts(vocab: int = 13, rows: int = 3, length: int = 5) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------------
# The KV cache and long contexts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", POSITIONS)
def test_greedy_with_and_without_cache_is_identical(positions):
    model = random_model(positions)
    p = prompts()
    with_cache = run(model, p, 12 - 5)  # within max_seq_len: the cache must be exact for every encoding
    without = run(model, p, 12 - 5, use_cache=False)
    assert torch.equal(with_cache, without)
    assert len(set(with_cache[:, 5:].flatten().tolist())) > 1  # not a degenerate constant output


@pytest.mark.parametrize("positions", POSITIONS)
def test_generation_runs_far_past_max_seq_len(positions):
    model = random_model(positions, max_seq_len=8)
    out = run(model, prompts(), 30)  # almost 4 windows
    assert out.shape == (3, 35)
    assert bool(((out >= 0) & (out < 13)).all())


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_absolute_positions_slide_the_window_exactly(positions):
    """Past max_seq_len the cache is rebuilt from the last window: identical to recomputing it."""
    model = random_model(positions, max_seq_len=8)
    assert torch.equal(run(model, prompts(), 30), run(model, prompts(), 30, use_cache=False))


@pytest.mark.parametrize("positions", ["rope", "alibi", "none"])
def test_relative_positions_shift_the_cache_exactly_for_one_layer(positions):
    """Dropping the oldest keys is exact for one layer (keys depend on their own token only)."""
    model = random_model(positions, n_layers=1, max_seq_len=8)
    assert torch.equal(run(model, prompts(), 30), run(model, prompts(), 30, use_cache=False))


def test_cache_never_holds_more_than_max_seq_len():
    model = random_model("rope", max_seq_len=8)
    decoder = Decoder(model, use_cache=True)
    tokens = prompts()
    for _ in range(20):
        logits = decoder.logits(tokens)
        tokens = torch.cat((tokens, logits.argmax(-1, keepdim=True)), dim=1)
        assert decoder.cache.length <= 8
        assert decoder.cache.keys[0].shape[2] == decoder.cache.length
    assert decoder.cache.next_pos == tokens.shape[1] - 1  # positions keep growing


def test_prompt_longer_than_max_seq_len():
    model = random_model("learned", max_seq_len=8)
    long_prompt = prompts(length=20)
    out = run(model, long_prompt, 4)
    assert torch.equal(out[:, :20], long_prompt)
    assert torch.equal(out[:, 20:], run(model, long_prompt[:, -8:], 4)[:, 8:])  # only the window matters


# --------------------------------------------------------------------------------------------------
# Strategies that must equal greedy
# --------------------------------------------------------------------------------------------------


def test_beam_width_one_equals_greedy():
    model = random_model("rope")
    p = prompts()
    assert torch.equal(
        beam_search(model, p, SamplingConfig(max_new_tokens=15, num_beams=1)), run(model, p, 15)
    )


def test_top_k_one_equals_greedy():
    model = random_model("alibi")
    p = prompts()
    assert torch.equal(run(model, p, 15, seed=3, temperature=1.0, top_k=1), run(model, p, 15))


def test_tiny_top_p_equals_greedy():
    model = random_model("learned")
    p = prompts()
    assert torch.equal(run(model, p, 15, seed=3, temperature=1.5, top_p=1e-6), run(model, p, 15))


def test_batch_generation_equals_one_row_at_a_time():
    model = random_model("rope")
    p = prompts(rows=4)
    batch = run(model, p, 10)
    for i in range(4):
        assert torch.equal(batch[i : i + 1], run(model, p[i : i + 1], 10))


def test_beam_search_finds_the_most_likely_sequence():
    """With as many beams as prefixes, beam search is exhaustive: it must find the argmax sequence."""
    vocab, n = 5, 3
    model = random_model("learned", vocab=vocab)
    prompt = torch.tensor([[1, 2, 3]])
    best, best_lp = None, -math.inf
    for cont in itertools.product(range(vocab), repeat=n):
        seq = torch.cat((prompt, torch.tensor([cont])), dim=1)
        logp = model(seq[:, :-1]).log_softmax(-1)[0, 2:].gather(1, seq[0, 3:, None]).sum().item()
        if logp > best_lp:
            best, best_lp = cont, logp
    found = beam_search(model, prompt, SamplingConfig(max_new_tokens=n, num_beams=vocab ** (n - 1)))
    assert tuple(found[0, 3:].tolist()) == best
    greedy = run(model, prompt, n)
    greedy_lp = model(greedy[:, :-1]).log_softmax(-1)[0, 2:].gather(1, greedy[0, 3:, None]).sum().item()
    assert best_lp >= greedy_lp - 1e-6


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def test_seed_makes_sampling_repeatable():
    model = random_model("rope")
    p = prompts()
    a = run(model, p, 20, seed=7, temperature=1.0)
    assert torch.equal(a, run(model, p, 20, seed=7, temperature=1.0))
    assert not torch.equal(a, run(model, p, 20, seed=8, temperature=1.0))


def test_sampling_follows_the_model_distribution():
    """The uniform model, sampled at temperature 1, picks every token about equally often."""
    model = uniform_model(4)
    out = run(model, torch.zeros(400, 1, dtype=torch.long), 10, seed=0, temperature=1.0)
    counts = np.bincount(out[:, 1:].flatten().numpy(), minlength=4) / 4000
    assert np.allclose(counts, 0.25, atol=0.03)


def test_filter_logits_keeps_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, 1.0, **kw))[0].tolist()  # noqa: E731
    assert kept(top_k=2, top_p=1.0) == [True, True, False, False]
    assert kept(top_k=0, top_p=0.5) == [True, False, False, False]  # 0.5 reached by the first token
    assert kept(top_k=0, top_p=0.8) == [True, True, False, False]
    assert kept(top_k=0, top_p=0.81) == [True, True, True, False]
    probs = filter_logits(logits, 2.0, 0, 1.0).softmax(-1)
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    assert torch.allclose(probs, expected / expected.sum())


def test_repetition_penalty_on_seen_tokens_only():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    out = repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 3.0, 0.5]]))
    assert repetition_penalty(logits, torch.tensor([[0]]), 1.0) is logits


def test_repetition_penalty_breaks_a_copy_loop():
    model = copy_model(4)
    prompt = torch.tensor([[0, 1, 2, 3, 2]])
    assert run(model, prompt, 3)[0, 5:].tolist() == [2, 2, 2]
    # Copying scores 20 and every other token 1: a penalty of 30 brings seen tokens below fresh ones.
    model.head.weight.data = 19.0 * torch.eye(4) + 1.0
    assert run(model, torch.tensor([[0, 0, 0]]), 3)[0, 3:].tolist() == [0, 0, 0]
    assert run(model, torch.tensor([[0, 0, 0]]), 3, repetition_penalty=30.0)[0, 3:].tolist() == [1, 2, 3]


def test_generate_restores_training_mode():
    model = random_model()
    model.train()
    run(model, prompts(), 3)
    assert model.training


# --------------------------------------------------------------------------------------------------
# Compacted vocabularies
# --------------------------------------------------------------------------------------------------


def compact_vocab() -> VocabMap:
    return VocabMap(100, np.array([0, 1, 2]))  # 3 kept ids + other (97 unseen ids): 4 classes


def test_greedy_ranks_other_as_one_unseen_id():
    vocab = compact_vocab()
    logits = torch.log(torch.tensor([[0.2, 0.1, 0.1, 0.6]]))  # p(other) = 0.6: 0.6/97 per unseen id
    assert next_token(logits, torch.zeros(1, 1, dtype=torch.long), GREEDY, None, vocab).item() == 0
    assert next_token(logits, torch.zeros(1, 1, dtype=torch.long), GREEDY, None, None).item() == 3
    top2 = SamplingConfig(temperature=1.0, top_k=2)
    draws = [
        next_token(logits, torch.zeros(1, 1, dtype=torch.long), top2, None, vocab).item() for _ in range(50)
    ]
    assert set(draws) <= {0, 1, 2} and 3 not in draws


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_plain_sampling_gives_other_its_tempered_full_vocabulary_mass(temperature):
    vocab = compact_vocab()
    probs = torch.tensor([0.2, 0.1, 0.1, 0.6])
    full = torch.cat((probs[:3], (probs[3] / 97).repeat(97))) ** (1 / temperature)
    expected_other = float(full[3:].sum() / full.sum())
    cfg = SamplingConfig(temperature=temperature)
    logits = probs.log().repeat(20000, 1)
    draws = next_token(
        logits, torch.zeros(20000, 1, dtype=torch.long), cfg, torch.Generator().manual_seed(0), vocab
    )
    assert abs(float((draws == 3).float().mean()) - expected_other) < 0.015


def test_other_decodes_to_an_unseen_id():
    vocab = compact_vocab()
    tokenizer = Tokenizer.char([chr(ord("a") + i % 26) if i < 26 else chr(0x100 + i) for i in range(100)])
    text = to_text(torch.tensor([0, 3, 1, PAD]), tokenizer, vocab, torch.Generator().manual_seed(0))
    assert len(text) == 3 and text[0] == "a" and text[2] == "b"
    assert tokenizer.encode(text[1])[0] not in (0, 1, 2)


# --------------------------------------------------------------------------------------------------
# Stop strings
# --------------------------------------------------------------------------------------------------


def test_stop_strings_end_only_the_rows_that_hit_them():
    tokenizer = Tokenizer.char("abcd")
    vocab = VocabMap.identity(4)
    model = copy_model(4)
    stop = StopStrings(["bbb"], tokenizer, vocab)
    out = generate(
        model, torch.tensor([[0, 1], [1, 0]]), SamplingConfig(max_new_tokens=6, temperature=0.0), stop=stop
    )
    assert out.shape == (2, 8)
    assert out[0].tolist() == [0, 1, 1, 1, 1, PAD, PAD, PAD]  # 'ab' + 'bbb', then stopped
    assert out[1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]  # 'ba' + 'aaaaaa' never contains 'bbb'
    assert truncate_at_stop(to_text(out[0, 2:], tokenizer, vocab), ["bbb"]) == ""
    assert truncate_at_stop("to be or not", ["or", " "]) == "to"


def test_beam_search_finishes_beams_at_stop_strings():
    tokenizer = Tokenizer.char("abcd")
    vocab = VocabMap.identity(4)
    stop = StopStrings(["bb"], tokenizer, vocab)
    out = beam_search(
        copy_model(4), torch.tensor([[0, 1]]), SamplingConfig(max_new_tokens=6, num_beams=3), stop=stop
    )
    assert out[0].tolist() == [0, 1, 1, 1, PAD, PAD, PAD, PAD]
