"""The teacher as a frozen function: frozen, checked against the data, its layers mapped and its heads ranked by ablation."""

from __future__ import annotations

import copy
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from pipeline.data.shards import TokenData
from pipeline.data.vocab import VocabMap
from pipeline.errors import UsageError
from pipeline.eval.teacher_forced import evaluate_lm
from pipeline.model.gpt import GPT
from pipeline.run.checkpoint import Export


def freeze(model: GPT) -> GPT:
    """A frozen function: eval mode, no gradients (so no optimizer can ever step it)."""
    model.eval()
    model.requires_grad_(False)
    return model


def _tokenizer_identity(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "path"}  # a .tiktoken file is known by its sha256


def check_teacher_data(export: Export, data: TokenData) -> None:
    """Refuse data tokenized differently from the teacher, before any work."""
    teacher_spec = _tokenizer_identity(export.tokenizer.spec)
    data_spec = _tokenizer_identity(data.meta["tokenizer"])
    if teacher_spec != data_spec or export.vocab.full_size != data.vocab_size:
        trained_on = export.info.data.dir if export.info.data is not None else "?"
        raise UsageError(
            f"the teacher {export.path} uses tokenizer {export.tokenizer.name} ({export.vocab.full_size:,} ids) but "
            f"{data.dir} is tokenized with {data.meta['encoding']} ({data.vocab_size:,} ids); teacher and student "
            f"must share the tokenizer: pass the teacher's data folder ({trained_on}) "
            f"or tokenize the teacher's corpus with recipes/tokenize.py --encoding {export.tokenizer.name}"
        )


def layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layer behind each student layer: evenly spaced, first and last kept (one layer: the first)."""
    if n_student > n_teacher:
        raise ValueError(f"a student of {n_student} layers cannot be mapped onto a teacher of {n_teacher}")
    if n_student == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def ablate_head(state: dict[str, Tensor], layer: int, head: int, n_heads: int) -> dict[str, Tensor]:
    """The state with one head's output removed: its columns of the output projection zeroed.

    This removes the head's whole contribution, its value bias included (attention rows sum to 1,
    so the value bias reaches the output through the same columns).
    """
    key = f"blocks.{layer}.attn.proj.weight"
    weight = state[key].clone()
    width = weight.shape[1] // n_heads
    weight[:, head * width : (head + 1) * width] = 0
    return {**state, key: weight}


@torch.no_grad()
def head_importance(
    teacher: GPT,
    batches: list[tuple[Tensor, Tensor]],
    accelerator: Accelerator,
    vocab: VocabMap,
    bytes_per_token: float,
) -> tuple[float, Tensor]:
    """(teacher val loss, (layers, heads) increase of val loss when each head alone is ablated)."""
    base = evaluate_lm(teacher, batches, accelerator, vocab, bytes_per_token)["val_loss"]
    probe = freeze(copy.deepcopy(teacher))
    state = teacher.state_dict()
    cfg = teacher.cfg
    scores = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            probe.load_state_dict(ablate_head(state, layer, head, cfg.n_heads), strict=True)
            scores[layer, head] = (
                evaluate_lm(probe, batches, accelerator, vocab, bytes_per_token)["val_loss"] - base
            )
    return base, scores


def head_importance_scalars(scores: Tensor) -> dict[str, float]:
    return {
        f"head_importance/layer{layer}_head{head}": float(scores[layer, head])
        for layer in range(scores.shape[0])
        for head in range(scores.shape[1])
    }


def describe_importance(scores: Tensor) -> str:
    rows = [f"  layer {i}: " + "  ".join(f"{v:+.4f}" for v in row) for i, row in enumerate(scores.tolist())]
    return "teacher head importance (val loss increase when the head is ablated):\n" + "\n".join(rows)
