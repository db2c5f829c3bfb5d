"""Student presets and init_from_teacher: shapes, key maps, and what each strategy computes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import trained_looking

from pipeline import cli
from pipeline.config import ModelConfig
from pipeline.data.vocab import VocabMap
from pipeline.distill.config import DistillConfig, StudentConfig
from pipeline.distill.teacher import ablate_head, freeze, head_importance, layer_map
from pipeline.errors import ConfigError
from pipeline.model.gpt import GPT, rope_cos_sin
from students import PRESETS, student_model_config
from students.init import (
    check_compatible,
    chosen_heads,
    copy_map,
    head_slots,
    init_from_teacher,
    load_student,
    random_state,
)
from teachers import PRESETS as TEACHERS


def teacher_cfg(positions: str = "learned", **changes) -> ModelConfig:
    base = ModelConfig(n_layers=2, n_heads=4, d_model=16, max_seq_len=12, vocab_size=11, positions=positions)
    return dataclasses.replace(base, **changes)


def student_of(cfg: ModelConfig, **changes) -> ModelConfig:
    return student_model_config(StudentConfig(**changes), cfg)


def logits(model: GPT, seed: int = 1) -> torch.Tensor:
    idx = torch.randint(
        0, model.cfg.vocab_size, (2, model.cfg.max_seq_len), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        return model(idx)


# --------------------------------------------------------------------------------------------------
# Presets and shapes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_parses_and_gives_a_one_head_student(name):
    cfg = cli.parse(DistillConfig, PRESETS, ["--preset", name])
    assert isinstance(cfg, DistillConfig) and cfg.preset == name
    teacher = "tiny" if name == "tiny" else "shakespeare"
    model = dataclasses.replace(TEACHERS[teacher]().model, vocab_size=100)
    student = student_model_config(cfg.student, model)
    assert student.n_heads == 1 and student.d_model == model.d_model
    assert student.n_layers == {"one_head": 4, "one_head_small": 2, "quick": 4, "tiny": 1}[name]
    assert cfg.data.seq_len <= student.max_seq_len
    # The mission's students train on their teacher's windows and batch (0: read from the teacher's run).
    windows = (cfg.data.seq_len, cfg.train.micro_batch_size)
    if name.startswith("one_head"):
        assert windows == (0, 0)
    else:
        assert all(w > 0 for w in windows)


@pytest.mark.parametrize("name", ["one_head", "one_head_small"])
@pytest.mark.parametrize("teacher_dropout", [0.0, 0.2])
def test_one_head_presets_train_without_dropout_whatever_the_teacher(name, teacher_dropout):
    # The README's distill table: the teacher's dropout 0.2 on top of its soft targets costs the
    # one-head student most of what 0 gains; the flag still sets any other value.
    teacher = dataclasses.replace(TEACHERS["shakespeare"]().model, vocab_size=100, dropout=teacher_dropout)
    cfg = cli.parse(DistillConfig, PRESETS, ["--preset", name])
    assert student_model_config(cfg.student, teacher).dropout == 0.0
    # A value neither the preset's nor the teacher's, so only a flag that works gives it.
    cfg = cli.parse(DistillConfig, PRESETS, ["--preset", name, "--student.dropout", "0.1"])
    assert student_model_config(cfg.student, teacher).dropout == 0.1


def test_zero_fields_take_the_teachers_values():
    cfg = teacher_cfg("rope", dropout=0.1, ffn_mult=2)
    student = student_of(cfg)
    assert dataclasses.replace(student, n_heads=4) == cfg
    narrow = student_of(cfg, n_layers=1, d_model=8, ffn_mult=3, dropout=0.0)
    assert (narrow.n_layers, narrow.d_model, narrow.ffn_mult, narrow.dropout) == (1, 8, 3, 0.0)
    with pytest.raises(ConfigError, match="--student"):
        student_of(cfg, n_heads=3)


def test_layer_map_keeps_first_and_last():
    assert layer_map(4, 4) == [0, 1, 2, 3]
    assert layer_map(4, 2) == [0, 3]
    assert layer_map(4, 1) == [0]
    assert layer_map(6, 3) == [0, 2, 5]
    with pytest.raises(ValueError):
        layer_map(2, 3)


# --------------------------------------------------------------------------------------------------
# random and copy
# --------------------------------------------------------------------------------------------------


def test_random_is_the_students_seeded_initialisation_and_leaves_the_rng_alone():
    cfg = student_of(teacher_cfg())
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    state = init_from_teacher("random", {}, teacher_cfg(), cfg, seed=7)
    assert torch.rand(1) == before
    torch.manual_seed(7)
    reference = GPT(cfg).state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)


def test_copy_takes_everything_but_attention_through_the_key_map():
    t_cfg = teacher_cfg(n_layers=4)
    teacher = trained_looking(t_cfg)
    s_cfg = student_of(t_cfg, n_layers=2)
    mapping = copy_map(t_cfg, s_cfg)
    assert mapping["blocks.1.ffn.fc.weight"] == "blocks.3.ffn.fc.weight"
    assert mapping["tok_emb.weight"] == "tok_emb.weight" and mapping["head.weight"] == "head.weight"
    assert not any(".attn." in k for k in mapping)
    state = init_from_teacher("copy", teacher.state_dict(), t_cfg, s_cfg, seed=3)
    fresh = random_state(s_cfg, seed=3)
    for key, value in state.items():
        expected = teacher.state_dict()[mapping[key]] if key in mapping else fresh[key]
        assert torch.equal(value, expected), key
    load_student(GPT(s_cfg), state)  # strict


# --------------------------------------------------------------------------------------------------
# best_head and merged_heads
# --------------------------------------------------------------------------------------------------


def only_heads(teacher: GPT, keep: list[int]) -> GPT:
    """The teacher with every head but keep[layer] ablated in each layer."""
    state = teacher.state_dict()
    for layer, head in enumerate(keep):
        for other in range(teacher.cfg.n_heads):
            if other != head:
                state = ablate_head(state, layer, other, teacher.cfg.n_heads)
    model = GPT(teacher.cfg)
    model.load_state_dict(state)
    return freeze(model)


@pytest.mark.parametrize("positions", ["learned", "rope", "none"])
def test_best_head_student_is_the_teacher_with_only_that_head(positions):
    t_cfg = teacher_cfg(positions)
    teacher = trained_looking(t_cfg)
    importance = torch.tensor([[0.1, 0.5, 0.2, 0.0], [0.3, 0.0, 0.1, 0.9]])
    s_cfg = student_of(t_cfg)
    assert chosen_heads(importance, t_cfg, s_cfg) == [1, 3]
    state = init_from_teacher("best_head", teacher.state_dict(), t_cfg, s_cfg, importance)
    student = freeze(load_student(GPT(s_cfg), state))
    torch.testing.assert_close(logits(student), logits(only_heads(teacher, [1, 3])), rtol=1e-4, atol=1e-5)


def test_best_head_leaves_no_dimension_without_gradient():
    t_cfg = teacher_cfg("rope")
    teacher = trained_looking(t_cfg)
    s_cfg = student_of(t_cfg)
    state = init_from_teacher("best_head", teacher.state_dict(), t_cfg, s_cfg, torch.rand(2, 4))
    student = load_student(GPT(s_cfg), state)
    idx = torch.randint(0, 11, (2, 12))
    student(idx).logsumexp(-1).sum().backward()
    D = t_cfg.d_model
    slots = head_slots(D, 4, 0, rope=True)
    others = torch.ones(D, dtype=torch.bool)
    others[slots] = False
    attn = student.blocks[0].attn
    assert (state["blocks.0.attn.qkv.weight"][D : 2 * D][others] == 0).all()  # keys start at zero...
    assert (attn.qkv.weight.grad[D : 2 * D][others].abs().sum(-1) > 0).all()  # ...but they learn
    assert (attn.proj.weight.grad[:, others].abs().sum(0) > 0).all()


def test_merged_heads_of_identical_attention_patterns_is_the_teacher():
    # When every head of a layer has the same queries and keys, they share one attention pattern:
    # the merged student (mean scores, every head's values) then computes exactly the teacher.
    t_cfg = teacher_cfg("learned")
    teacher = trained_looking(t_cfg)
    state = teacher.state_dict()
    d = t_cfg.head_dim
    for layer in range(t_cfg.n_layers):
        for kind in ("weight", "bias"):
            qkv = state[f"blocks.{layer}.attn.qkv.{kind}"]
            for part in (0, 1):  # queries, keys
                block = qkv[part * 16 : (part + 1) * 16]
                block[:] = block[:d].repeat(4, *([1] * (block.dim() - 1)))
    teacher.load_state_dict(state)
    s_cfg = student_of(t_cfg)
    student = load_student(GPT(s_cfg), init_from_teacher("merged_heads", state, t_cfg, s_cfg))
    torch.testing.assert_close(logits(freeze(student)), logits(teacher), rtol=1e-4, atol=1e-5)


def test_rope_slots_keep_each_heads_frequencies():
    D, H = 16, 4
    d = D // H
    teacher_freq = rope_cos_sin(torch.tensor([1]), d, 10000.0)[0].acos()[0]  # (d/2,) angles at position 1
    student_freq = rope_cos_sin(torch.tensor([1]), D, 10000.0)[0].acos()[0]  # (D/2,)
    slots = head_slots(D, H, 0, rope=True)
    torch.testing.assert_close(student_freq[slots[: d // 2]], teacher_freq)
    assert torch.equal(slots[d // 2 :], slots[: d // 2] + D // 2)  # pairs stay pairs
    every = torch.cat([head_slots(D, H, h, rope=True) for h in range(H)])
    assert sorted(every.tolist()) == list(range(D))  # merged_heads: a permutation


# --------------------------------------------------------------------------------------------------
# Checks and strict loading
# --------------------------------------------------------------------------------------------------


def test_incompatible_students_are_refused_with_the_flag_to_change():
    t_cfg = teacher_cfg()
    with pytest.raises(ValueError, match=r"--student\.d-model"):
        check_compatible(t_cfg, student_of(t_cfg, d_model=8), "copy")
    check_compatible(t_cfg, student_of(t_cfg, d_model=8), "random")
    with pytest.raises(ValueError, match="best_head needs"):
        init_from_teacher("best_head", trained_looking(t_cfg).state_dict(), t_cfg, student_of(t_cfg))
    with pytest.raises(ConfigError, match=r"--student\.n-heads 1"):
        StudentConfig(n_heads=2, init="merged_heads")


def test_shapes_are_checked_and_loading_is_strict():
    t_cfg = teacher_cfg()
    s_cfg = student_of(t_cfg)
    state = trained_looking(t_cfg).state_dict()
    state["blocks.0.ffn.fc.weight"] = state["blocks.0.ffn.fc.weight"][:, :8]
    with pytest.raises(ValueError, match=r"shape mismatch: student blocks.0.ffn.fc.weight"):
        init_from_teacher("copy", state, t_cfg, s_cfg)
    good = init_from_teacher("random", {}, t_cfg, s_cfg)
    good.pop("head.weight")
    with pytest.raises(RuntimeError, match=r"head\.weight"):
        load_student(GPT(s_cfg), good)


def test_head_importance_is_the_val_loss_increase_of_each_ablation():
    from pipeline.accel import build_accelerator

    accelerator = build_accelerator("no")
    t_cfg = teacher_cfg()
    teacher = trained_looking(t_cfg)
    with torch.no_grad():  # a dead head: its output columns are already zero
        teacher.blocks[0].attn.proj.weight[:, 4:8] = 0
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 11, (4, 12), generator=g), torch.randint(0, 11, (4, 12), generator=g))]
    _, scores = head_importance(teacher, batches, accelerator, VocabMap.identity(11), 1.0)
    assert scores.shape == (2, 4)
    assert scores[0, 1] == 0.0
    assert (scores.flatten()[[0, 2, 3, 4, 5, 6, 7]] != 0).all()
    assert all(p.requires_grad is False for p in teacher.parameters())
