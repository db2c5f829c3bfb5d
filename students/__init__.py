"""Student presets (plain functions returning a `DistillConfig`) and the student's shape.

A student is described relative to the teacher known only at run time: `StudentConfig` fields left
at 0 (or unset) take the teacher's value, and `student_model_config` resolves them. `PRESETS` maps
the names that `--preset` accepts to the preset functions; init strategies live in students/init.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace

from pipeline.config import ModelConfig, OptimConfig, ProbeConfig, TrainConfig
from pipeline.distill.config import DistillConfig, DistillDataConfig, KDConfig, OnPolicyConfig, StudentConfig
from pipeline.errors import ConfigError


def student_model_config(student: StudentConfig, teacher: ModelConfig) -> ModelConfig:
    """The student's ModelConfig: the teacher's, with the fields the StudentConfig sets (0: the teacher's)."""
    changes = {
        name: getattr(student, name) for name in ("n_layers", "d_model", "ffn_mult") if getattr(student, name)
    }
    changes["n_heads"] = student.n_heads
    if student.dropout is not None:
        changes["dropout"] = student.dropout
    try:
        return dataclasses.replace(teacher, **changes)  # ModelConfig checks d_model % n_heads, RoPE sizes
    except ConfigError as err:
        raise ConfigError(f"student shape (--student.*) from the teacher's: {err}") from err


def one_head() -> DistillConfig:
    """Exercise H10.4: the teacher's shape with one attention head, the best of the README's distill table.

    best_head init (the teacher with only its most important head per layer), then a layer-wise phase of
    15% of the steps (each block learns its teacher layer on the teacher's residual stream), then forward
    KL at T = 1, alpha 0.5. No dropout, whatever the teacher's: the teacher's soft targets already
    regularise the student, and on top of them the teacher's dropout 0.2 only slows it (README, distill:
    at equal budget val loss 5.6414 with dropout 0 against 5.7106 with 0.2; the teacher 5.6748).
    Trained on the teacher's windows and batch (data.seq_len and train.micro_batch_size 0: read from the
    teacher's run) for 8 epochs, the table's budget (12 epochs overfit without dropout: 5.6543 at step
    120, 5.7058 at the last), so a scratch run of the same student (`--kd.alpha 1 --student.init
    random`, with `--student.dropout 0.2` for the teacher's recipe) sees the same steps and tokens,
    whatever the teacher.
    """
    return DistillConfig(
        data=DistillDataConfig(seq_len=0),
        student=StudentConfig(n_heads=1, init="best_head", dropout=0.0),
        kd=KDConfig(alpha=0.5, temperature=1.0, loss="forward_kl", layerwise_share=0.15),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=50, weight_decay=0.1),
        train=TrainConfig(micro_batch_size=0, max_epochs=8, eval_interval=40),
    )


def one_head_small() -> DistillConfig:
    """One head and two layers (a 4-layer teacher's first and last), the teacher's width."""
    base = one_head()
    return replace(base, student=replace(base.student, n_layers=2))


def quick() -> DistillConfig:
    """The quickstart's student (`bash launch/quickstart.sh`): the `quick` teacher with one head.

    best_head init (the student starts as the teacher with only its most important head per layer),
    forward KL at T = 1, alpha 0.5, the teacher's windows (64 characters) and batch (12), 600 steps.
    """
    return DistillConfig(
        data=DistillDataConfig(seq_len=64),
        student=StudentConfig(n_heads=1, init="best_head", importance_tokens=2048),
        kd=KDConfig(alpha=0.5, temperature=1.0, loss="forward_kl"),
        optim=OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=50, beta2=0.99, weight_decay=0.1),
        train=TrainConfig(
            micro_batch_size=12,
            max_steps=600,
            eval_interval=200,
            eval_tokens=8192,
            log_interval=50,
            probe=ProbeConfig(importance_tokens=1024, map_tokens=24),
        ),
    )


def tiny() -> DistillConfig:
    """A one-layer, one-head student of a `tiny` teacher for tests: seconds on one CPU core."""
    return DistillConfig(
        data=DistillDataConfig(seq_len=32),
        student=StudentConfig(n_layers=1, n_heads=1, init="copy", importance_tokens=512),
        kd=KDConfig(alpha=0.5, temperature=2.0, loss="forward_kl", top_k=8),
        on_policy=OnPolicyConfig(prompt_len=8),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2),
        train=TrainConfig(
            micro_batch_size=4,
            max_steps=20,
            eval_interval=10,
            eval_tokens=1024,
            log_interval=5,
            sample_tokens=16,
            projector_tokens=50,
        ),
    )


PRESETS = {"one_head": one_head, "one_head_small": one_head_small, "quick": quick, "tiny": tiny}
